"""Byte-level BPE tokenizer (HF ``tokenizers``): train, save, load, fingerprint.

Byte-level means every string round-trips: text is split into UTF-8 bytes, each byte maps to one of
256 base symbols that are always in the vocabulary, so there is no unknown token and
``decode(encode(s)) == s``. The one special token, ``<|endoftext|>`` (id 0), separates documents.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from rat_lightning.data.atomic import atomic_write_bytes
from rat_lightning.data.errors import DataError
from rat_lightning.errors import ConfigError

EOS_TOKEN = "<|endoftext|>"
# 256 byte symbols plus EOS: the smallest vocabulary that can encode every string.
MIN_VOCAB_SIZE = 257


def _new_tokenizer(vocab_size: int) -> tuple[Tokenizer, trainers.BpeTrainer]:
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError(
            f"vocab_size must be an int >= {MIN_VOCAB_SIZE} (256 byte symbols + {EOS_TOKEN}), got {vocab_size!r}"
        )
    tokenizer = Tokenizer(models.BPE())
    # No prefix space and no normalizer: the bytes of the text are kept exactly.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    return tokenizer, trainer


def _save(tokenizer: Tokenizer, output: str | Path) -> None:
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(output, tokenizer.to_str().encode("utf-8"))


def train_tokenizer(files: Sequence[str | Path], vocab_size: int, output: str | Path | None = None) -> Tokenizer:
    """Train a byte-level BPE tokenizer on UTF-8 text files.

    Args:
        files: text files to learn merges from (read line by line).
        vocab_size: largest vocabulary, including the 256 byte symbols and ``<|endoftext|>`` (id 0);
            a small corpus may stop with fewer merges.
        output: where to write ``tokenizer.json`` (atomically); None keeps it in memory only.

    Returns:
        The trained tokenizer.
    """
    paths = [Path(f) for f in files]
    if not paths:
        raise DataError("train_tokenizer got no files; pass at least one UTF-8 text file")
    for path in paths:
        if not path.is_file():
            raise DataError(f"tokenizer training file {path} does not exist; check the path")
    tokenizer, trainer = _new_tokenizer(vocab_size)
    tokenizer.train([str(p) for p in paths], trainer)
    if output is not None:
        _save(tokenizer, output)
    return tokenizer


def train_tokenizer_from_iterator(
    texts: Iterable[str | list[str]],
    vocab_size: int,
    output: str | Path | None = None,
    length: int | None = None,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer on documents from an iterator (as ``prepare`` does).

    Args:
        texts: documents, or batches (lists) of documents.
        vocab_size: as in :func:`train_tokenizer`.
        output: as in :func:`train_tokenizer`.
        length: number of items in ``texts``, for the progress bar only.

    Returns:
        The trained tokenizer.
    """
    tokenizer, trainer = _new_tokenizer(vocab_size)
    tokenizer.train_from_iterator(texts, trainer, length=length)
    if output is not None:
        _save(tokenizer, output)
    return tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a ``tokenizer.json`` (or the one inside a folder such as a prepared data dir).

    Raises:
        DataError: the file is missing or is not a tokenizer file; the message names the path.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise DataError(
            f"tokenizer file {path} not found; pass the tokenizer.json written by `rat-lightning prepare` "
            "(it lies in the prepared data folder), or leave the tokenizer unset to train a new one"
        )
    try:
        return Tokenizer.from_file(str(path))
    except Exception as error:
        raise DataError(
            f"cannot read tokenizer file {path} ({error}); it must be a Hugging Face tokenizers "
            "tokenizer.json, e.g. one written by `rat-lightning prepare`"
        ) from error


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """SHA-256 hex digest of the tokenizer's JSON serialization (vocabulary, merges, settings)."""
    return hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()


def eos_id(tokenizer: Tokenizer) -> int:
    """Id of ``<|endoftext|>`` in ``tokenizer``.

    Raises:
        DataError: the tokenizer has no such token.
    """
    token_id = tokenizer.token_to_id(EOS_TOKEN)
    if token_id is None:
        raise DataError(
            f"the tokenizer has no {EOS_TOKEN} token, which separates documents; use a tokenizer trained by "
            f"`rat-lightning prepare` (leave --tokenizer unset) or add {EOS_TOKEN} as a special token"
        )
    return token_id
