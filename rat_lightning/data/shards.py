"""Read a prepared folder: the manifest and its memory-mapped token shards as one token stream."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from rat_lightning.data.errors import DataError
from rat_lightning.data.prepare import FORMAT_VERSION, MANIFEST_NAME

_REQUIRED = ("format_version", "tokenizer_file", "tokenizer_fingerprint", "vocab_size", "eos_id", "dtype", "shards")


def _rebuild(data_dir: Path) -> str:
    return f"re-run `rat-lightning prepare --inputs ... --output_dir {data_dir} --overwrite true`"


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    """The checked contents of ``data_dir/manifest.json``.

    Raises:
        DataError: the manifest is missing, unreadable, of a newer format, or lacks a field.
    """
    data_dir = Path(data_dir)
    path = data_dir / MANIFEST_NAME
    if not path.is_file():
        raise DataError(
            f"{data_dir} holds no prepared data ({path} not found); run "
            f"`rat-lightning prepare --inputs ... --output_dir {data_dir}` first"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise DataError(f"cannot read {path} ({error}); {_rebuild(data_dir)}") from error
    if not isinstance(manifest, dict) or any(key not in manifest for key in _REQUIRED):
        missing = [key for key in _REQUIRED if not isinstance(manifest, dict) or key not in manifest]
        raise DataError(
            f"{path} lacks {', '.join(missing)}; it was not written by `rat-lightning prepare`; {_rebuild(data_dir)}"
        )
    if manifest["format_version"] > FORMAT_VERSION:
        raise DataError(
            f"{path} has format version {manifest['format_version']}, newer than this rat-lightning reads "
            f"({FORMAT_VERSION}); upgrade rat-lightning or {_rebuild(data_dir)}"
        )
    if manifest["dtype"] not in ("uint16", "uint32"):
        raise DataError(f"{path}: unknown token dtype {manifest['dtype']!r}; {_rebuild(data_dir)}")
    return manifest


class TokenShards:
    """The token stream of a prepared folder, memory-mapped read-only.

    Shards are checked against the manifest on opening (present, right size); :meth:`verify`
    also checks their sha256. Pickling keeps only the path, so DataLoader workers re-map the files
    instead of copying them.

    Args:
        data_dir: a folder written by :func:`rat_lightning.data.prepare`.

    Raises:
        DataError: the manifest or a shard is missing, or a shard's size disagrees with the manifest.
    """

    def __init__(self, data_dir: str | Path) -> None:
        self.data_dir = Path(data_dir)
        self.manifest = read_manifest(self.data_dir)
        self._dtype = np.dtype(self.manifest["dtype"]).newbyteorder("<")
        counts = []
        for shard in self.manifest["shards"]:
            path = self.data_dir / shard["file"]
            expected = int(shard["num_tokens"]) * self._dtype.itemsize
            if not path.is_file():
                raise DataError(f"shard {path} listed in the manifest is missing; {_rebuild(self.data_dir)}")
            size = path.stat().st_size
            if size != expected:
                raise DataError(
                    f"shard {path} has {size} bytes but the manifest says {shard['num_tokens']} tokens "
                    f"({expected} bytes); the file was changed or truncated; {_rebuild(self.data_dir)}"
                )
            counts.append(int(shard["num_tokens"]))
        # offsets[i] is the stream position of shard i's first token; offsets[-1] the total.
        self._offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)
        self._maps: list[np.ndarray] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_maps"] = None
        return state

    def _shard_arrays(self) -> list[np.ndarray]:
        if self._maps is None:
            self._maps = [
                (
                    np.memmap(self.data_dir / s["file"], dtype=self._dtype, mode="r", shape=(int(s["num_tokens"]),))
                    if int(s["num_tokens"])
                    else np.empty(0, dtype=self._dtype)
                )
                for s in self.manifest["shards"]
            ]
        return self._maps

    @property
    def num_tokens(self) -> int:
        """Tokens in the whole stream."""
        return int(self._offsets[-1])

    def __len__(self) -> int:
        return self.num_tokens

    @property
    def vocab_size(self) -> int:
        """Number of token ids of the tokenizer (every id in the shards is below it)."""
        return int(self.manifest["vocab_size"])

    @property
    def eos_id(self) -> int:
        """Id of ``<|endoftext|>``, which follows every document."""
        return int(self.manifest["eos_id"])

    @property
    def dtype(self) -> np.dtype:
        """On-disk token dtype (little-endian uint16 or uint32)."""
        return self._dtype

    @property
    def tokenizer_path(self) -> Path:
        """The ``tokenizer.json`` the ids belong to."""
        return self.data_dir / self.manifest["tokenizer_file"]

    @property
    def fingerprint(self) -> str:
        """SHA-256 hex identifying this token stream: the tokenizer's hash, dtype, EOS, every shard's hash.

        Stored in training checkpoints, so resuming on different data is caught.
        """
        identity = {
            "tokenizer": self.manifest["tokenizer_fingerprint"],
            "dtype": self.manifest["dtype"],
            "eos_id": self.manifest["eos_id"],
            "eos_policy": self.manifest.get("eos_policy"),
            "shards": [[s["num_tokens"], s["sha256"]] for s in self.manifest["shards"]],
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()

    def verify(self) -> None:
        """Check every shard's sha256 against the manifest (reads all data).

        Raises:
            DataError: naming the first shard whose content changed.
        """
        for shard in self.manifest["shards"]:
            path = self.data_dir / shard["file"]
            digest = hashlib.sha256()
            with open(path, "rb") as handle:
                while chunk := handle.read(1 << 24):
                    digest.update(chunk)
            if digest.hexdigest() != shard["sha256"]:
                raise DataError(
                    f"shard {path} has sha256 {digest.hexdigest()} but the manifest says {shard['sha256']}; "
                    f"the file is corrupt or was changed; {_rebuild(self.data_dir)}"
                )

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``start .. stop - 1`` of the stream, across shard boundaries.

        Returns:
            ``(stop - start,)`` int64 array (a copy).
        """
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"token range [{start}, {stop}) outside the stream [0, {self.num_tokens})")
        out = np.empty(stop - start, dtype=np.int64)
        arrays = self._shard_arrays()
        # First shard holding `start`; side="right" skips empty shards at the same offset.
        shard = int(np.searchsorted(self._offsets, start, side="right")) - 1
        position = start
        while position < stop:
            begin = position - int(self._offsets[shard])
            take = min(stop - position, int(self._offsets[shard + 1]) - position)
            out[position - start : position - start + take] = arrays[shard][begin : begin + take]
            position += take
            shard += 1
        return out
