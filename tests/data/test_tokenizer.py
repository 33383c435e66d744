"""Byte-level BPE: exact round trip, stable fingerprint, EOS at id 0, clear errors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models

from rat_lightning.data import DataError, load_tokenizer, train_tokenizer
from rat_lightning.data.tokenizer import EOS_TOKEN, eos_id, tokenizer_fingerprint, train_tokenizer_from_iterator
from rat_lightning.errors import ConfigError

MakeDocs = Callable[..., list[str]]


SAMPLES = [
    "Hello, world! Plain ASCII.",
    "Ünïcödé façade — “quotes” and ½ fractions",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "emoji 🙂👍🏽🇫🇷 family 👨‍👩‍👧",
    "  leading spaces, trailing spaces  ",
    "\ttabs\tand\nnewlines\r\nand\rcarriage returns\n\n\n",
    "",
    " ",
    "\x00\x01\x7f control characters",
    "literal <|endoftext|> inside text",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory, make_docs: MakeDocs) -> tuple[Tokenizer, Path]:
    root = tmp_path_factory.mktemp("tok")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(make_docs(30, seed=3)), encoding="utf-8")
    output = root / "tokenizer.json"
    return train_tokenizer([corpus], vocab_size=400, output=output), output


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tokenizer: tuple[Tokenizer, Path], text: str) -> None:
    tok, _ = tokenizer
    tok = Tokenizer.from_str(tok.to_str())
    # As in prepare: a literal EOS string is text, not the special token.
    tok.encode_special_tokens = True
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert 0 not in ids or EOS_TOKEN not in text


def test_eos_is_id_zero_and_vocab_is_bounded(tokenizer: tuple[Tokenizer, Path]) -> None:
    tok, _ = tokenizer
    assert eos_id(tok) == 0
    assert 257 <= tok.get_vocab_size() <= 400


def test_fingerprint_is_stable_across_save_and_load(tokenizer: tuple[Tokenizer, Path]) -> None:
    tok, path = tokenizer
    loaded = load_tokenizer(path)
    assert tokenizer_fingerprint(loaded) == tokenizer_fingerprint(tok) == tokenizer_fingerprint(tok)
    assert len(tokenizer_fingerprint(tok)) == 64
    # The folder form finds tokenizer.json inside.
    assert tokenizer_fingerprint(load_tokenizer(path.parent)) == tokenizer_fingerprint(tok)
    # No temporary file is left beside the written tokenizer.
    assert sorted(p.name for p in path.parent.iterdir()) == ["corpus.txt", "tokenizer.json"]


def test_training_is_deterministic_and_fingerprint_tells_tokenizers_apart(make_docs: MakeDocs) -> None:
    texts = make_docs(10, seed=5)
    first = train_tokenizer_from_iterator(texts, vocab_size=300)
    second = train_tokenizer_from_iterator(texts, vocab_size=300)
    other = train_tokenizer_from_iterator(texts, vocab_size=320)
    assert tokenizer_fingerprint(first) == tokenizer_fingerprint(second)
    assert tokenizer_fingerprint(first) != tokenizer_fingerprint(other)


def test_load_missing_tokenizer_names_path_and_fix(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(DataError, match=r"tokenizer file .*nope/tokenizer\.json not found.*rat-lightning prepare"):
        load_tokenizer(missing)


def test_load_unreadable_tokenizer_names_path(tmp_path: Path) -> None:
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError, match=r"cannot read tokenizer file .*tokenizer\.json"):
        load_tokenizer(bad)


def test_eos_missing_is_a_named_error() -> None:
    tok = Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[]))
    with pytest.raises(DataError, match=r"no <\|endoftext\|> token"):
        eos_id(tok)


def test_too_small_vocab_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="vocab_size must be an int >= 257"):
        train_tokenizer_from_iterator(["abc"], vocab_size=100)
    with pytest.raises(DataError, match=r"missing\.txt does not exist"):
        train_tokenizer([tmp_path / "missing.txt"], vocab_size=300)
