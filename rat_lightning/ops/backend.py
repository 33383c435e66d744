"""Backend choice shared by every op's dispatcher."""

from __future__ import annotations

import torch

BACKENDS = ("auto", "reference", "triton")


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
    if backend == "triton" and "triton" not in available:
        raise ValueError("this op has no Triton kernel yet; use backend='reference' or 'auto'")
    if backend == "auto":
        return "triton" if ("triton" in available and x.is_cuda) else "reference"
    return backend
