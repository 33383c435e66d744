"""Backend choice shared by every op's dispatcher."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

BACKENDS = ("auto", "reference", "triton")

# What "auto" means inside a `forced_backend` block (None: Triton on CUDA, else reference).
_forced: ContextVar[str | None] = ContextVar("rat_lightning_forced_backend", default=None)


@contextmanager
def forced_backend(backend: str) -> Iterator[None]:
    """Make every op called with ``backend="auto"`` use ``backend`` inside the block
    (benchmarks and tests run whole layers on the reference this way)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    token = _forced.set(None if backend == "auto" else backend)
    try:
        yield
    finally:
        _forced.reset(token)


def resolve_backend(backend: str, x: torch.Tensor, available: tuple[str, ...]) -> str:
    """Return ``"triton"`` or ``"reference"`` for a tensor on ``x.device``.

    Args:
        backend: the user's choice, one of ``BACKENDS``.
        x: an input tensor (its device decides ``"auto"``).
        available: the backends this op implements besides the reference.

    Raises:
        ValueError: unknown backend, or ``"triton"`` asked where this op has no kernel.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto" and _forced.get() is not None:
        backend = _forced.get()
    if backend == "triton" and "triton" not in available:
        raise ValueError("this op has no Triton kernel yet; use backend='reference' or 'auto'")
    if backend == "auto":
        return "triton" if ("triton" in available and x.is_cuda) else "reference"
    return backend
