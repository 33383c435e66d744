"""TokenShards: the manifest's shards as one stream; missing, resized and corrupted shards are named."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from rat_lightning.data import DataError, TokenShards


@pytest.fixture
def copy(prepared: Path, tmp_path: Path) -> Path:
    target = tmp_path / "data"
    shutil.copytree(prepared, target)
    return target


def raw_stream(data_dir: Path) -> np.ndarray:
    manifest = json.loads((data_dir / "manifest.json").read_text())
    return np.concatenate([np.fromfile(data_dir / s["file"], dtype="<u2") for s in manifest["shards"]]).astype(np.int64)


def test_properties_and_ranges_across_shards(prepared: Path) -> None:
    shards = TokenShards(prepared)
    manifest = json.loads((prepared / "manifest.json").read_text())
    full = raw_stream(prepared)
    assert len(manifest["shards"]) >= 3
    assert shards.num_tokens == len(full) == manifest["num_tokens"]
    assert shards.vocab_size == manifest["vocab_size"] <= 512
    assert shards.eos_id == 0
    assert shards.dtype == np.dtype("<u2")
    assert shards.tokenizer_path == prepared / "tokenizer.json"
    out = shards.tokens(0, shards.num_tokens)
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, full)
    # Ranges that end at, start at, and span shard boundaries (10,000 tokens each), and empty ones.
    for start, stop in [(9_990, 10_010), (10_000, 10_001), (9_999, 10_000), (5, 25_000), (0, 0), (10_000, 10_000)]:
        np.testing.assert_array_equal(shards.tokens(start, stop), full[start:stop])
    with pytest.raises(IndexError):
        shards.tokens(0, shards.num_tokens + 1)
    with pytest.raises(IndexError):
        shards.tokens(5, 4)


def test_fingerprint_is_stable_and_pickling_does_not_copy_the_data(prepared: Path) -> None:
    shards = TokenShards(prepared)
    shards.tokens(0, 10)
    assert shards.fingerprint == TokenShards(prepared).fingerprint
    blob = pickle.dumps(shards)
    assert len(blob) < 20_000
    clone = pickle.loads(blob)
    np.testing.assert_array_equal(clone.tokens(9_990, 10_010), shards.tokens(9_990, 10_010))
    shards.verify()


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"holds no prepared data .*manifest\.json not found.*rat-lightning prepare"):
        TokenShards(tmp_path)


def test_missing_shard(copy: Path) -> None:
    (copy / "shard_00001.bin").unlink()
    with pytest.raises(
        DataError, match=r"shard .*shard_00001\.bin listed in the manifest is missing.*re-run `rat-lightning prepare"
    ):
        TokenShards(copy)


def test_truncated_shard(copy: Path) -> None:
    path = copy / "shard_00000.bin"
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(DataError, match=r"shard_00000\.bin has 19998 bytes but the manifest says 10000 tokens.*re-run"):
        TokenShards(copy)


def test_verify_catches_changed_content(copy: Path) -> None:
    path = copy / "shard_00002.bin"
    data = bytearray(path.read_bytes())
    data[100] ^= 1
    path.write_bytes(bytes(data))
    shards = TokenShards(copy)
    with pytest.raises(DataError, match=r"shard_00002\.bin has sha256 .* but the manifest says .*re-run"):
        shards.verify()


def test_newer_format_and_foreign_manifest(copy: Path) -> None:
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(DataError, match="format version 99, newer than this rat-lightning reads"):
        TokenShards(copy)
    (copy / "manifest.json").write_text(json.dumps({"shards": []}))
    with pytest.raises(DataError, match="lacks format_version"):
        TokenShards(copy)
