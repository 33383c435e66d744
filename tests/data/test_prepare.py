"""prepare(): the shards hold exactly encode(doc) + [EOS] per document, in order; bad input is named."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from rat_lightning.data import DataError, TokenShards, prepare
from rat_lightning.data.prepare import _ShardWriter, token_dtype
from rat_lightning.data.tokenizer import EOS_TOKEN, tokenizer_fingerprint

MakeDocs = Callable[..., list[str]]
WriteTxt = Callable[..., list[Path]]


def expected_stream(tokenizer_path: Path, documents: list[str]) -> np.ndarray:
    tok = Tokenizer.from_file(str(tokenizer_path))
    tok.encode_special_tokens = True
    eos = tok.token_to_id(EOS_TOKEN)
    ids: list[int] = []
    for document in documents:
        ids += tok.encode(document, add_special_tokens=False).ids + [eos]
    return np.asarray(ids, dtype=np.int64)


def stream(data_dir: Path) -> np.ndarray:
    shards = TokenShards(data_dir)
    return shards.tokens(0, shards.num_tokens)


def write_jsonl(path: Path, documents: list[str], field: str = "text") -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for index, document in enumerate(documents):
            handle.write(json.dumps({"id": index, field: document, "meta": {"source": "test"}}) + "\n")
            if index == 0:
                # Blank lines are not documents.
                handle.write("\n")


@pytest.fixture(scope="module")
def tokenizer_file(prepared: Path) -> Path:
    return prepared / "tokenizer.json"


def test_txt_stream_manifest_and_shards(tmp_path: Path, make_docs: MakeDocs, write_txt: WriteTxt) -> None:
    documents = make_docs(12, seed=11)
    write_txt(tmp_path / "raw", documents)
    manifest_path = prepare([str(tmp_path / "raw" / "*.txt")], str(tmp_path / "out"), vocab_size=300, shard_tokens=1000)
    out = tmp_path / "out"
    assert manifest_path == out / "manifest.json"
    manifest = json.loads(manifest_path.read_text())

    expected = expected_stream(out / "tokenizer.json", documents)
    np.testing.assert_array_equal(stream(out), expected)

    assert manifest["num_documents"] == 12
    assert manifest["num_tokens"] == len(expected)
    assert manifest["eos_policy"] == "eos_after_document"
    assert manifest["eos_id"] == 0 and manifest["eos_token"] == EOS_TOKEN
    assert manifest["dtype"] == "uint16"
    assert manifest["format_version"] == 1
    assert manifest["tokenizer_fingerprint"] == tokenizer_fingerprint(Tokenizer.from_file(str(out / "tokenizer.json")))
    assert [Path(i["path"]).name for i in manifest["inputs"]] == [f"doc_{i:04d}.txt" for i in range(12)]
    assert [i["bytes"] for i in manifest["inputs"]] == [len(d.encode()) for d in documents]
    # Shards: all full but the last, raw little-endian uint16, checksums right.
    counts = [s["num_tokens"] for s in manifest["shards"]]
    assert len(counts) == -(-len(expected) // 1000) > 1
    assert all(c == 1000 for c in counts[:-1]) and sum(counts) == len(expected)
    for shard in manifest["shards"]:
        data = (out / shard["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"]
        assert len(data) == 2 * shard["num_tokens"]
    first = np.frombuffer((out / "shard_00000.bin").read_bytes(), dtype="<u2")
    np.testing.assert_array_equal(first, expected[:1000])
    # Nothing else is left in the folder: no temporary files, no datasets cache.
    names = sorted(p.name for p in out.iterdir())
    assert names == ["manifest.json", *[s["file"] for s in manifest["shards"]], "tokenizer.json"]


def test_jsonl_stream_with_extra_fields_and_custom_field(
    tmp_path: Path, tokenizer_file: Path, make_docs: MakeDocs
) -> None:
    documents = make_docs(9, seed=12)
    write_jsonl(tmp_path / "a.jsonl", documents[:4], field="content")
    write_jsonl(tmp_path / "b.json", documents[4:], field="content")
    prepare(
        [str(tmp_path / "a.jsonl"), str(tmp_path / "b.json")],
        str(tmp_path / "out"),
        tokenizer=str(tokenizer_file),
        text_field="content",
    )
    np.testing.assert_array_equal(stream(tmp_path / "out"), expected_stream(tokenizer_file, documents))


def test_parquet_stream(tmp_path: Path, tokenizer_file: Path, make_docs: MakeDocs) -> None:
    import datasets

    documents = make_docs(10, seed=13)
    datasets.Dataset.from_dict({"body": documents, "n": list(range(10))}).to_parquet(str(tmp_path / "d.parquet"))
    prepare([str(tmp_path / "d.parquet")], str(tmp_path / "out"), tokenizer=str(tokenizer_file), text_field="body")
    np.testing.assert_array_equal(stream(tmp_path / "out"), expected_stream(tokenizer_file, documents))
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["num_documents"] == 10


def test_mixed_formats_keep_input_order(tmp_path: Path, tokenizer_file: Path, make_docs: MakeDocs) -> None:
    import datasets

    documents = make_docs(8, seed=14)
    (tmp_path / "1.txt").write_text(documents[0], encoding="utf-8")
    write_jsonl(tmp_path / "2.jsonl", documents[1:4])
    datasets.Dataset.from_dict({"text": documents[4:7]}).to_parquet(str(tmp_path / "3.parquet"))
    (tmp_path / "4.txt").write_text(documents[7], encoding="utf-8")
    inputs = [str(tmp_path / n) for n in ("1.txt", "2.jsonl", "3.parquet", "4.txt")]
    prepare(inputs, str(tmp_path / "out"), tokenizer=str(tokenizer_file))
    np.testing.assert_array_equal(stream(tmp_path / "out"), expected_stream(tokenizer_file, documents))


def test_literal_eos_text_is_not_a_document_boundary(tmp_path: Path, tokenizer_file: Path) -> None:
    documents = ["before <|endoftext|> after", "second document"]
    write_jsonl(tmp_path / "a.jsonl", documents)
    prepare([str(tmp_path / "a.jsonl")], str(tmp_path / "out"), tokenizer=str(tokenizer_file))
    tokens = stream(tmp_path / "out")
    assert (tokens == 0).sum() == 2 and tokens[-1] == 0
    np.testing.assert_array_equal(tokens, expected_stream(tokenizer_file, documents))


def test_given_tokenizer_is_copied(
    tmp_path: Path, tokenizer_file: Path, make_docs: MakeDocs, write_txt: WriteTxt
) -> None:
    write_txt(tmp_path / "raw", make_docs(2, seed=15))
    prepare([str(tmp_path / "raw")], str(tmp_path / "out"), tokenizer=str(tokenizer_file))
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == tokenizer_file.read_bytes()
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["tokenizer_fingerprint"] == tokenizer_fingerprint(Tokenizer.from_file(str(tokenizer_file)))


def test_num_proc_gives_the_same_stream(
    tmp_path: Path, tokenizer_file: Path, make_docs: MakeDocs, write_txt: WriteTxt
) -> None:
    documents = make_docs(16, seed=16)
    write_txt(tmp_path / "raw", documents)
    prepare(
        [str(tmp_path / "raw" / "*.txt")],
        str(tmp_path / "out"),
        tokenizer=str(tokenizer_file),
        num_proc=2,
        batch_size=3,
    )
    np.testing.assert_array_equal(stream(tmp_path / "out"), expected_stream(tokenizer_file, documents))


def test_dtype_choice() -> None:
    assert token_dtype(4096) == np.dtype("<u2")
    assert token_dtype(65_536) == np.dtype("<u2")
    assert token_dtype(65_537) == np.dtype("<u4")
    assert token_dtype(200_000) == np.dtype("<u4")


def test_large_vocabulary_round_trips_through_uint32(tmp_path: Path) -> None:
    # A real >65K-id tokenizer without training one: the 256 byte symbols, EOS, filler entries,
    # and merges whose products get ids above 65,535.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {EOS_TOKEN: 0, **{symbol: i + 1 for i, symbol in enumerate(alphabet)}}
    for i in range(len(vocab), 70_000 - 2):
        vocab[f"<filler{i}>"] = i
    vocab["ab"] = 69_998
    vocab["abab"] = 69_999
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b"), ("ab", "ab")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS_TOKEN])
    tok.save(str(tmp_path / "big.json"))

    documents = ["abab ab xyz", "ab"]
    write_jsonl(tmp_path / "d.jsonl", documents)
    prepare([str(tmp_path / "d.jsonl")], str(tmp_path / "out"), tokenizer=str(tmp_path / "big.json"), shard_tokens=4)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["dtype"] == "uint32" and manifest["vocab_size"] == 70_000
    tokens = stream(tmp_path / "out")
    np.testing.assert_array_equal(tokens, expected_stream(tmp_path / "big.json", documents))
    assert tokens.max() == 69_999 and 69_998 in tokens
    assert (tmp_path / "out" / "shard_00000.bin").stat().st_size == 4 * 4
    assert TokenShards(tmp_path / "out").dtype == np.dtype("<u4")


def test_existing_output_needs_overwrite_and_overwrite_removes_stale_shards(
    tmp_path: Path, tokenizer_file: Path, make_docs: MakeDocs, write_txt: WriteTxt
) -> None:
    write_txt(tmp_path / "raw", make_docs(3, seed=17))
    inputs = [str(tmp_path / "raw" / "*.txt")]
    out = tmp_path / "out"
    prepare(inputs, str(out), tokenizer=str(tokenizer_file), shard_tokens=200)
    many = sorted(out.glob("shard_*.bin"))
    assert len(many) > 2
    total = sum(f.stat().st_size for f in many) // 2
    with pytest.raises(DataError, match=r"already holds prepared data .*manifest\.json.*--overwrite true"):
        prepare(inputs, str(out), tokenizer=str(tokenizer_file))
    prepare(inputs, str(out), tokenizer=str(tokenizer_file), overwrite=True)
    assert sorted(p.name for p in out.glob("shard_*.bin")) == ["shard_00000.bin"]
    assert len(stream(out)) == total


class _Crash(RuntimeError):
    pass


@pytest.mark.parametrize("where", ["mid_write", "second_shard_rename"])
def test_crash_leaves_no_manifest_and_no_partial_shard(
    tmp_path: Path,
    tokenizer_file: Path,
    make_docs: MakeDocs,
    write_txt: WriteTxt,
    monkeypatch: pytest.MonkeyPatch,
    where: str,
) -> None:
    documents = make_docs(10, seed=18)
    write_txt(tmp_path / "raw", documents)
    inputs = [str(tmp_path / "raw" / "*.txt")]
    out = tmp_path / "out"
    shard_tokens = 500
    if where == "mid_write":
        original_write = _ShardWriter.write

        def write(self: _ShardWriter, tokens: np.ndarray) -> None:
            # Part of the stream reaches disk (a full shard and part of the next), then the crash.
            original_write(self, tokens[: shard_tokens + 123])
            raise _Crash("disk full")

        monkeypatch.setattr(_ShardWriter, "write", write)
    else:
        original_finish = _ShardWriter._finish

        def finish(self: _ShardWriter) -> None:
            if self.shards:
                raise _Crash("killed before the rename")
            original_finish(self)

        monkeypatch.setattr(_ShardWriter, "_finish", finish)

    with pytest.raises(_Crash):
        prepare(inputs, str(out), tokenizer=str(tokenizer_file), shard_tokens=shard_tokens)
    assert not (out / "manifest.json").exists()
    # Every file under a final shard name is complete; nothing temporary is left.
    finals = sorted(out.glob("shard_*.bin"))
    assert [p.name for p in finals] == ["shard_00000.bin"]
    assert finals[0].stat().st_size == 2 * shard_tokens
    assert not list(out.glob(".*")), sorted(p.name for p in out.glob(".*"))

    # A later run (no --overwrite needed: there is no manifest) produces the right data.
    monkeypatch.undo()
    prepare(inputs, str(out), tokenizer=str(tokenizer_file), shard_tokens=shard_tokens)
    np.testing.assert_array_equal(stream(out), expected_stream(tokenizer_file, documents))


@pytest.mark.parametrize("form", ["list", "single"])
def test_cli_signature_parses(tmp_path: Path, make_docs: MakeDocs, write_txt: WriteTxt, form: str) -> None:
    from jsonargparse import CLI

    write_txt(tmp_path / "raw", make_docs(3, seed=19))
    pattern = str(tmp_path / "raw" / "*.txt")
    inputs = json.dumps([pattern]) if form == "list" else pattern
    args = ["--inputs", inputs, "--output_dir", str(tmp_path / "out"), "--vocab_size", "300"]
    manifest = CLI(prepare, args=args, as_positional=False)
    assert Path(manifest) == tmp_path / "out" / "manifest.json"
    assert json.loads(Path(manifest).read_text())["num_documents"] == 3


# Bad input: each is a DataError that names the file (and line) and the fix.


def test_no_match_names_the_pattern(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no input files matched '.*nothing/\*\.txt'"):
        prepare([str(tmp_path / "nothing" / "*.txt")], str(tmp_path / "out"))
    with pytest.raises(DataError, match=r"no input files matched '.*missing\.jsonl'"):
        prepare([str(tmp_path / "missing.jsonl")], str(tmp_path / "out"))
    with pytest.raises(DataError, match="inputs is empty"):
        prepare([], str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "good.txt").write_text("some text", encoding="utf-8")
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.txt: the file is empty; remove it"):
        prepare([str(tmp_path / "*.txt")], str(tmp_path / "out"))


def test_malformed_jsonl_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": "broken', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:3: malformed JSON at column 10 \(Unterminated string"):
        prepare([str(path)], str(tmp_path / "out"))


def test_jsonl_line_that_is_not_an_object(tmp_path: Path) -> None:
    path = tmp_path / "list.jsonl"
    path.write_text('{"text": "fine"}\n["a", "b"]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"list\.jsonl:2: expected a JSON object, found list"):
        prepare([str(path)], str(tmp_path / "out"))


def test_jsonl_missing_field_lists_keys(tmp_path: Path) -> None:
    path = tmp_path / "nofield.jsonl"
    path.write_text('{"text": "fine"}\n\n{"body": "x", "id": 2}\n', encoding="utf-8")
    with pytest.raises(
        DataError, match=r"nofield\.jsonl:3: no field 'text' \(the object's keys: 'body', 'id'\).*--text_field"
    ):
        prepare([str(path)], str(tmp_path / "out"))


def test_jsonl_non_string_text(tmp_path: Path) -> None:
    path = tmp_path / "num.jsonl"
    path.write_text('{"text": 5}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"num\.jsonl:1: field 'text' is int, not a string"):
        prepare([str(path)], str(tmp_path / "out"))


def test_jsonl_without_any_text(tmp_path: Path) -> None:
    path = tmp_path / "blank.jsonl"
    path.write_text('{"text": ""}\n{"text": ""}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"blank\.jsonl: every 'text' is empty, the file has no text at all"):
        prepare([str(path)], str(tmp_path / "out"))
    only_blank = tmp_path / "lines.jsonl"
    only_blank.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"lines\.jsonl: no JSON objects"):
        prepare([str(only_blank)], str(tmp_path / "out"))


def test_unsupported_extension(tmp_path: Path) -> None:
    (tmp_path / "notes.md").write_text("# hi", encoding="utf-8")
    with pytest.raises(DataError, match=r"notes\.md: unsupported file type '\.md'.*\.txt.*\.jsonl.*\.parquet"):
        prepare([str(tmp_path / "notes.md")], str(tmp_path / "out"))


def test_text_that_is_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "latin.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.txt: not valid UTF-8 at byte 3"):
        prepare([str(tmp_path / "latin.txt")], str(tmp_path / "out"))


def test_parquet_without_the_column(tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_dict({"body": ["x"]}).to_parquet(str(tmp_path / "p.parquet"))
    with pytest.raises(DataError, match=r"p\.parquet: no column 'text' \(columns: 'body'\).*--text_field"):
        prepare([str(tmp_path / "p.parquet")], str(tmp_path / "out"))


def test_parquet_with_a_null(tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_dict({"text": ["x", None, "y"]}).to_parquet(str(tmp_path / "n.parquet"))
    with pytest.raises(DataError, match=r"n\.parquet: row 1 has a null 'text'"):
        prepare([str(tmp_path / "n.parquet")], str(tmp_path / "out"))
