"""``rat-lightning prepare``: raw text in, token shards and a manifest out.

Output folder::

    tokenizer.json        the tokenizer the ids belong to (trained here, or a copy of the given one)
    shard_00000.bin ...   token ids, raw little-endian uint16 (uint32 above 65,536 ids), documents
                          concatenated in input order, <|endoftext|> after every document
    manifest.json         written last: format, tokenizer hash, vocab size, EOS id and policy, dtype,
                          each shard's token count and sha256, the inputs

Every file is written under a temporary name, fsynced and renamed, and the manifest comes last, so a
crash never leaves a manifest that points at missing or half-written shards (PITFALLS 7).
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from rat_lightning.data.atomic import atomic_copy, atomic_write_bytes, fsync_dir, make_temp
from rat_lightning.data.errors import DataError
from rat_lightning.data.tokenizer import (
    EOS_TOKEN,
    MIN_VOCAB_SIZE,
    eos_id,
    load_tokenizer,
    tokenizer_fingerprint,
    train_tokenizer_from_iterator,
)
from rat_lightning.errors import ConfigError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TOKENIZER_NAME = "tokenizer.json"
SHARD_PATTERN = "shard_{:05d}.bin"
EOS_POLICY = "eos_after_document"
# Extension -> Hugging Face `datasets` packaged builder.
BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
REBUILD_HINT = "rat-lightning prepare --inputs ... --output_dir ..."


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest little-endian unsigned dtype that holds ids ``0 .. vocab_size - 1``.

    uint16 up to 65,536 ids, uint32 above (PITFALLS 5: uint16 silently wraps larger vocabularies).
    """
    if vocab_size <= 1 << 16:
        return np.dtype("<u2")
    if vocab_size <= 1 << 32:
        return np.dtype("<u4")
    raise DataError(f"vocab_size {vocab_size} does not fit in uint32 token shards")


def _has_magic(pattern: str) -> bool:
    return glob.escape(pattern) != pattern


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files named by ``inputs`` (paths, glob patterns, or folders), in order, without repeats.

    A pattern's matches are sorted, so the document order does not depend on the filesystem.

    Raises:
        DataError: a pattern or path matched no file, or a file has an unsupported extension.
    """
    files: list[Path] = []
    seen: set[Path] = set()
    for pattern in inputs:
        pattern = os.path.expanduser(str(pattern))
        if _has_magic(pattern):
            matches = [Path(p) for p in sorted(glob.glob(pattern, recursive=True)) if Path(p).is_file()]
        elif Path(pattern).is_dir():
            matches = sorted(p for p in Path(pattern).rglob("*") if p.is_file() and p.suffix.lower() in BUILDERS)
        elif Path(pattern).is_file():
            matches = [Path(pattern)]
        else:
            matches = []
        if not matches:
            raise DataError(
                f"no input files matched {pattern!r} (working directory {os.getcwd()}); check the path or "
                f"glob pattern, supported files are {', '.join(BUILDERS)}"
            )
        for path in matches:
            key = path.resolve()
            if key not in seen:
                seen.add(key)
                files.append(path)
    for path in files:
        if path.suffix.lower() not in BUILDERS:
            raise DataError(
                f"{path}: unsupported file type {path.suffix or '(no extension)'!r}; inputs must be "
                ".txt (one document per file), .jsonl/.json (one JSON object per line) or .parquet; "
                "convert the file or leave it out of --inputs"
            )
    return files


@dataclass
class _InputFile:
    path: Path
    builder: str
    size: int
    documents: int


def _check_text(path: Path) -> int:
    """A .txt file is one document: it must be non-empty UTF-8."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as error:
                raise DataError(
                    f"{path}: not valid UTF-8 at byte {offset + error.start} ({error.reason}); "
                    "re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
                ) from error
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: ends inside a UTF-8 character; the file is truncated or not UTF-8") from error
    return 1


def _check_jsonl(path: Path, text_field: str) -> int:
    """Every non-blank line must be a JSON object with a string ``text_field``; returns the count."""
    documents = 0
    chars = 0
    with open(path, "rb") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(
                    f"{path}:{line_number}: malformed JSON at column {error.colno} ({error.msg.removesuffix(' at')}); "
                    "each line of a "
                    f'.jsonl/.json input must be one JSON object such as {{"{text_field}": "..."}}: '
                    "fix or remove that line"
                ) from error
            except UnicodeDecodeError as error:
                raise DataError(
                    f"{path}:{line_number}: not valid UTF-8 ({error.reason}); re-encode the file as UTF-8"
                ) from error
            if not isinstance(obj, dict):
                raise DataError(
                    f"{path}:{line_number}: expected a JSON object, found {type(obj).__name__}; each line "
                    f'must be one object such as {{"{text_field}": "..."}}'
                )
            if text_field not in obj:
                keys = ", ".join(repr(k) for k in obj) or "none"
                raise DataError(
                    f"{path}:{line_number}: no field {text_field!r} (the object's keys: {keys}); pass "
                    "--text_field with the field that holds the text, or fix the line"
                )
            text = obj[text_field]
            if not isinstance(text, str):
                raise DataError(
                    f"{path}:{line_number}: field {text_field!r} is {type(text).__name__}, not a string; "
                    "fix the line or remove it"
                )
            documents += 1
            chars += len(text)
    if documents == 0:
        raise DataError(f"{path}: no JSON objects (only blank lines); remove it from --inputs")
    if chars == 0:
        raise DataError(f"{path}: every {text_field!r} is empty, the file has no text at all; remove it from --inputs")
    return documents


def _check_parquet(path: Path, text_field: str) -> int:
    """The ``text_field`` column must exist, hold strings, have no nulls and some text."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as error:
        raise DataError(f"{path}: cannot read as Parquet ({error}); check that the file is complete") from error
    schema = parquet.schema_arrow
    if text_field not in schema.names:
        raise DataError(
            f"{path}: no column {text_field!r} (columns: {', '.join(map(repr, schema.names))}); pass "
            "--text_field with the column that holds the text"
        )
    column_type = schema.field(text_field).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise DataError(f"{path}: column {text_field!r} has type {column_type}, not string; convert it to text")
    row = 0
    chars = 0
    for batch in parquet.iter_batches(columns=[text_field], batch_size=65_536):
        column = batch.column(0)
        if column.null_count:
            first = pc.index(pc.is_null(column), True).as_py()
            raise DataError(f"{path}: row {row + first} has a null {text_field!r}; fill or drop that row")
        chars += pc.sum(pc.utf8_length(column)).as_py() or 0
        row += len(batch)
    if row == 0:
        raise DataError(f"{path}: has no rows; remove it from --inputs")
    if chars == 0:
        raise DataError(f"{path}: every {text_field!r} is empty, the file has no text at all; remove it from --inputs")
    return row


def _check_file(path: Path, text_field: str) -> _InputFile:
    builder = BUILDERS[path.suffix.lower()]
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"{path}: the file is empty; remove it from --inputs or give it some text")
    if builder == "text":
        documents = _check_text(path)
    elif builder == "json":
        documents = _check_jsonl(path, text_field)
    else:
        documents = _check_parquet(path, text_field)
    return _InputFile(path=path, builder=builder, size=size, documents=documents)


def _import_datasets() -> Any:
    # Local files only: never let `datasets` reach for a hub (the machines may have no network).
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    return datasets


def _load_groups(files: list[_InputFile], text_field: str, cache_dir: str) -> list[Any]:
    """Load runs of consecutive same-format files with `datasets`; one ``text`` column each, input order kept."""
    datasets = _import_datasets()
    groups: list[list[_InputFile]] = []
    for item in files:
        if groups and groups[-1][0].builder == item.builder:
            groups[-1].append(item)
        else:
            groups.append([item])
    loaded = []
    for group in groups:
        builder = group[0].builder
        kwargs: dict[str, Any] = {}
        if builder == "text":
            # A .txt file is one document (not one per line). `datasets` reads it in text mode, so
            # "\r\n" and "\r" line endings become "\n".
            kwargs["sample_by"] = "document"
        elif builder == "json":
            from datasets.packaged_modules.json.json import JsonConfig

            # Newer `datasets` may reinterpret some schemas as "agent traces"; we want plain columns.
            if "parse_agent_traces" in JsonConfig.__dataclass_fields__:
                kwargs["parse_agent_traces"] = False
        data_files = [str(f.path.resolve()) for f in group]
        try:
            dataset = datasets.load_dataset(
                builder, data_files=data_files, split="train", cache_dir=cache_dir, **kwargs
            )
        except Exception as error:
            names = ", ".join(str(f.path) for f in group)
            raise DataError(f"could not read {names} with `datasets` ({type(error).__name__}: {error})") from error
        column = "text" if builder == "text" else text_field
        dataset = dataset.select_columns([column])
        if column != "text":
            dataset = dataset.rename_column(column, "text")
        expected = sum(f.documents for f in group)
        if len(dataset) != expected:
            # Never drop a document silently: the reader must see exactly what validation counted.
            names = ", ".join(str(f.path) for f in group)
            raise DataError(
                f"`datasets` read {len(dataset)} documents from {names} but the files hold {expected}; "
                "check the files for unusual line separators"
            )
        loaded.append(dataset)
    return loaded


class _Encoder:
    """Batched ``Dataset.map`` function: text -> ids + EOS (picklable for ``num_proc > 1``)."""

    def __init__(self, tokenizer_json: str, eos: int) -> None:
        self.tokenizer_json = tokenizer_json
        self.eos = eos
        self._tokenizer: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {"tokenizer_json": self.tokenizer_json, "eos": self.eos, "_tokenizer": None}

    def __call__(self, batch: dict[str, list[str]]) -> dict[str, list[np.ndarray]]:
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_str(self.tokenizer_json)
            # A literal "<|endoftext|>" inside a document is text, not a document boundary.
            self._tokenizer.encode_special_tokens = True
        encode = getattr(self._tokenizer, "encode_batch_fast", self._tokenizer.encode_batch)
        encodings = encode(batch["text"], add_special_tokens=False)
        ids = []
        for encoding in encodings:
            row = np.empty(len(encoding.ids) + 1, dtype=np.uint32)
            row[:-1] = encoding.ids
            row[-1] = self.eos
            ids.append(row)
        return {"ids": ids}


class _ShardWriter:
    """Cuts a token stream into shards of ``shard_tokens``; each shard is written atomically.

    A shard lives under ``.shard_XXXXX.bin.<random>.tmp`` until it is full (or the stream ends), then is
    fsynced and renamed; ``abort()`` deletes the unfinished one.
    """

    def __init__(self, directory: Path, dtype: np.dtype, shard_tokens: int) -> None:
        self.directory = directory
        self.dtype = dtype
        self.shard_tokens = shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._handle: Any = None
        self._tmp: str | None = None
        self._count = 0
        self._hash: Any = None

    def write(self, tokens: np.ndarray) -> None:
        """Append ``tokens`` (any integer dtype, values already checked to fit ``dtype``)."""
        while tokens.size:
            if self._handle is None:
                self._open()
            take = min(tokens.size, self.shard_tokens - self._count)
            data = tokens[:take].astype(self.dtype, copy=False).tobytes()
            self._handle.write(data)
            self._hash.update(data)
            self._count += take
            tokens = tokens[take:]
            if self._count == self.shard_tokens:
                self._finish()

    def close(self) -> list[dict[str, Any]]:
        """Finish the last shard; returns the manifest entries ``{file, num_tokens, sha256}``."""
        if self._handle is not None and self._count:
            self._finish()
        self.abort()
        return self.shards

    def abort(self) -> None:
        """Delete the shard being written, if any (finished shards stay: each is complete)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if self._tmp is not None:
            Path(self._tmp).unlink(missing_ok=True)
            self._tmp = None

    def _open(self) -> None:
        name = SHARD_PATTERN.format(len(self.shards))
        fd, self._tmp = make_temp(self.directory, name)
        self._handle = os.fdopen(fd, "wb")
        self._count = 0
        self._hash = hashlib.sha256()

    def _finish(self) -> None:
        name = SHARD_PATTERN.format(len(self.shards))
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        self._handle = None
        os.replace(self._tmp, self.directory / name)
        self._tmp = None
        fsync_dir(self.directory)
        self.shards.append({"file": name, "num_tokens": self._count, "sha256": self._hash.hexdigest()})


def _iter_token_arrays(tokenized: list[Any], rows: int = 8192) -> Iterator[np.ndarray]:
    """The concatenated ids of every document, in order, a few thousand documents at a time."""
    import pyarrow.compute as pc

    for dataset in tokenized:
        for table in dataset.with_format("arrow").iter(batch_size=rows):
            yield pc.list_flatten(table.column("ids")).to_numpy()


def _clean_leftovers(directory: Path) -> None:
    """Remove temporary files and caches that a killed earlier run left behind."""
    for entry in directory.iterdir():
        name = entry.name
        if entry.is_dir() and name.startswith(".cache-"):
            shutil.rmtree(entry, ignore_errors=True)
        elif (
            entry.is_file()
            and name.endswith(".tmp")
            and (
                name.startswith(".shard_")
                or name.startswith(f".{MANIFEST_NAME}.")
                or name.startswith(f".{TOKENIZER_NAME}.")
            )
        ):
            entry.unlink(missing_ok=True)


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def prepare(
    inputs: list[str] | str,
    output_dir: str,
    tokenizer: str | None = None,
    vocab_size: int = 4096,
    text_field: str = "text",
    shard_tokens: int = 16_777_216,
    num_proc: int = 1,
    batch_size: int = 1000,
    overwrite: bool = False,
) -> Path:
    """Tokenize text files into token shards with a manifest.

    Documents are concatenated in input order with ``<|endoftext|>`` after each one. Files are read
    with Hugging Face ``datasets`` (offline) and tokenized with ``Dataset.map``.

    Args:
        inputs: files, folders or glob patterns, one or a list (quote globs on the command line).
            ``.txt``: each file is one document (UTF-8; line endings become ``\\n``).
            ``.jsonl``/``.json``: one JSON object per line, text in ``text_field``. ``.parquet``:
            text in column ``text_field``.
        output_dir: folder for ``tokenizer.json``, ``shard_*.bin`` and ``manifest.json``.
        tokenizer: an existing ``tokenizer.json`` to use (copied into output_dir); None trains a
            byte-level BPE of ``vocab_size`` on the inputs.
        vocab_size: vocabulary size of the tokenizer trained when ``tokenizer`` is None.
        text_field: JSON field / Parquet column holding the text.
        shard_tokens: most tokens per shard file.
        num_proc: processes for tokenization.
        batch_size: documents per tokenization batch.
        overwrite: replace prepared data already in output_dir.

    Returns:
        Path of the written ``manifest.json``.

    Raises:
        DataError: no file matched, a file is empty, malformed or lacks ``text_field``, an extension
            is unsupported, or output_dir already holds prepared data and overwrite is False.
    """
    if isinstance(inputs, (str, Path)):
        inputs = [str(inputs)]
    if not inputs:
        raise DataError("inputs is empty; pass at least one file or glob pattern, e.g. --inputs '[data/*.txt]'")
    _positive_int("shard_tokens", shard_tokens)
    _positive_int("num_proc", num_proc)
    _positive_int("batch_size", batch_size)
    if tokenizer is None and (not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE):
        raise ConfigError(
            f"vocab_size must be an int >= {MIN_VOCAB_SIZE} (256 bytes + {EOS_TOKEN}), got {vocab_size!r}"
        )
    if not isinstance(text_field, str) or not text_field:
        raise ConfigError(f"text_field must be a non-empty string, got {text_field!r}")

    out = Path(output_dir)
    manifest_path = out / MANIFEST_NAME
    if manifest_path.exists() and not overwrite:
        raise DataError(
            f"{out} already holds prepared data ({manifest_path}); use it as it is, pass --overwrite true "
            "to rebuild it, or choose another --output_dir"
        )

    files = [_check_file(path, text_field) for path in expand_inputs(inputs)]
    out.mkdir(parents=True, exist_ok=True)
    if manifest_path.exists():
        # Drop the old manifest first: from here on no manifest points at shards being replaced.
        manifest_path.unlink()
        fsync_dir(out)
    _clean_leftovers(out)

    cache_dir = tempfile.mkdtemp(prefix=".cache-", dir=out)
    writer: _ShardWriter | None = None
    try:
        texts = _load_groups(files, text_field, cache_dir)
        tokenizer_path = out / TOKENIZER_NAME
        if tokenizer is None:
            documents = sum(len(d) for d in texts)
            log.info("training a byte-level BPE tokenizer (vocab_size=%d) on %d documents", vocab_size, documents)

            def batches() -> Iterator[list[str]]:
                for dataset in texts:
                    for batch in dataset.iter(batch_size=batch_size):
                        yield batch["text"]

            tok = train_tokenizer_from_iterator(batches(), vocab_size, output=tokenizer_path)
        else:
            tok = load_tokenizer(tokenizer)
            source = Path(tokenizer)
            atomic_copy(source / TOKENIZER_NAME if source.is_dir() else source, tokenizer_path)
        eos = eos_id(tok)
        vocab = max(tok.get_vocab_size(with_added_tokens=True), max(tok.get_vocab().values()) + 1)
        dtype = token_dtype(vocab)

        encoder = _Encoder(tok.to_str(), eos)
        tokenized = [
            dataset.map(
                encoder,
                batched=True,
                batch_size=batch_size,
                num_proc=num_proc if num_proc > 1 else None,
                remove_columns=["text"],
                # The function holds a tokenizer, which `datasets` cannot hash; the cache is ours and
                # temporary, so a fixed fingerprint per group is enough.
                new_fingerprint=f"rat-lightning-tokenize-{index}",
                desc="tokenizing",
            )
            for index, dataset in enumerate(texts)
        ]

        writer = _ShardWriter(out, dtype, shard_tokens)
        total = 0
        for tokens in _iter_token_arrays(tokenized):
            if tokens.size and int(tokens.max()) >= vocab:
                raise DataError(
                    f"token id {int(tokens.max())} >= vocab_size {vocab}; the tokenizer file is inconsistent"
                )
            writer.write(tokens)
            total += int(tokens.size)
        shards = writer.close()
        writer = None
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)

    documents = sum(f.documents for f in files)
    manifest = {
        "format": "rat-lightning-token-shards",
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tokenizer_file": TOKENIZER_NAME,
        "tokenizer_fingerprint": tokenizer_fingerprint(tok),
        "vocab_size": vocab,
        "eos_token": EOS_TOKEN,
        "eos_id": eos,
        "eos_policy": EOS_POLICY,
        "dtype": dtype.name,
        "byte_order": "little",
        "num_tokens": total,
        "num_documents": documents,
        "shards": shards,
        "inputs": [{"path": str(f.path), "bytes": f.size, "documents": f.documents} for f in files],
        "text_field": text_field,
        "shard_tokens": shard_tokens,
    }
    atomic_write_bytes(manifest_path, (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))

    # Shards of an earlier, larger build are not in the new manifest; remove them.
    keep = {s["file"] for s in shards}
    for stale in out.iterdir():
        if fnmatch.fnmatch(stale.name, "shard_*.bin") and stale.name not in keep:
            stale.unlink()
    log.info(
        "prepared %d documents, %d tokens (vocab %d, %s) in %d shards: %s",
        documents,
        total,
        vocab,
        dtype.name,
        len(shards),
        manifest_path,
    )
    return manifest_path
