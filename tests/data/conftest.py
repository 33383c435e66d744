"""Fixtures for the data tests: small synthetic English-like documents and a prepared corpus."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest

WORDS = (
    "the of and to in a is that for it as was with be by on not he I this are or his from at which but have an "
    "they you were her she there all one their would we him been has when who will more no if out so said what up "
    "its about into than them can only other new some could time these two may then do first any my now such like "
    "our over man me even most made after also did many before must through back years where much your way well "
    "down should because each just those people how too little state good very make world still own see men work "
    "long get here between both life being under never day same another know while last might us great old year "
    "off come since against go came right used take three river garden letter quiet morning window bright"
).split()


def make_documents(count: int, seed: int = 0, min_sentences: int = 3, max_sentences: int = 30) -> list[str]:
    """``count`` varied documents of English-like sentences, with a few lines of non-ASCII text."""
    rng = random.Random(seed)
    documents = []
    for index in range(count):
        sentences = []
        for _ in range(rng.randint(min_sentences, max_sentences)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(4, 16))]
            sentence = " ".join(words)
            sentences.append(sentence[0].upper() + sentence[1:] + rng.choice([".", ".", ".", "?", "!", ";"]))
        paragraphs = []
        while sentences:
            take = rng.randint(1, 6)
            paragraphs.append(" ".join(sentences[:take]))
            sentences = sentences[take:]
        if index % 7 == 3:
            paragraphs.append("Café naïve — “quoted” 日本語 🙂 tab\there.")
        documents.append("\n\n".join(paragraphs) + "\n")
    return documents


def write_text_files(directory: Path, documents: list[str], prefix: str = "doc") -> list[Path]:
    """One .txt file per document, named so that sorting keeps the order."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, document in enumerate(documents):
        path = directory / f"{prefix}_{index:04d}.txt"
        path.write_text(document, encoding="utf-8")
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def documents() -> list[str]:
    return make_documents(120, seed=1)


@pytest.fixture(scope="session")
def prepared(tmp_path_factory: pytest.TempPathFactory, documents: list[str]) -> Path:
    """A prepared folder: the session's documents as .txt files, a 512-id tokenizer, small shards."""
    from rat_lightning.data import prepare

    root = tmp_path_factory.mktemp("prepared")
    write_text_files(root / "raw", documents)
    prepare([str(root / "raw" / "*.txt")], str(root / "data"), vocab_size=512, shard_tokens=10_000)
    return root / "data"


@pytest.fixture(scope="session")
def make_docs() -> Callable[..., list[str]]:
    """The :func:`make_documents` factory (fixtures, so test modules need no import path tricks)."""
    return make_documents


@pytest.fixture(scope="session")
def write_txt() -> Callable[..., list[Path]]:
    """The :func:`write_text_files` helper."""
    return write_text_files
