"""Atomic file writes: write to a temporary name in the same folder, fsync, rename.

A reader (or a crash) never sees a half-written file under its final name, because ``os.replace``
within one filesystem is atomic and the data is on disk before the rename.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def _umask() -> int:
    # The only portable way to read the umask is to set it and put it back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_temp(directory: str | Path, name: str) -> tuple[int, str]:
    """Create ``directory/.<name>.<random>.tmp`` for writing; returns ``(fd, path)``.

    ``mkstemp`` creates files readable by the owner only; a finished file should get the usual
    permissions (``0o666`` less the umask), as ``open`` would give it.
    """
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    os.chmod(tmp, 0o666 & ~_umask())
    return fd, tmp


def fsync_dir(directory: str | Path) -> None:
    """Flush a folder's entries (the rename itself) to disk; a no-op where the OS does not allow it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | Path) -> Iterator[BinaryIO]:
    """Open ``path`` for binary writing so that it appears only complete, or not at all.

    Yields a file object on a temporary sibling (``.<name>.<random>.tmp``); on a clean exit the data
    is fsynced and renamed to ``path``; on an exception the temporary file is removed.
    """
    path = Path(path)
    fd, tmp = make_temp(path.parent, path.name)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path) as handle:
        handle.write(data)


def atomic_copy(source: str | Path, destination: str | Path) -> None:
    """Copy a file's bytes to ``destination`` atomically (safe when both name the same file)."""
    with open(source, "rb") as src, atomic_open(destination) as dst:
        shutil.copyfileobj(src, dst, length=1 << 20)
