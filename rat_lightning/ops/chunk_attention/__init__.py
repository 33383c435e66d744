"""Dispatcher for RAT's inter-chunk attention (see :mod:`.reference` for the maths)."""

from __future__ import annotations

import torch

from rat_lightning.ops.backend import resolve_backend
from rat_lightning.ops.chunk_attention.reference import chunk_attention_reference, chunk_attention_step

__all__ = ["chunk_attention", "chunk_attention_step"]


def chunk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    chunk_size: int,
    *,
    rope_base: float = 10000.0,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Softmax over previous chunk summaries plus the own running state, chunk-index RoPE.

    Args:
        q: ``(B, T, H, P)`` queries; k, v: ``(B, T, H, P)`` recurrent states.
        chunk_size: L (positive int).
        rope_base: RoPE base.
        scale: default ``P ** -0.5``.
        backend: ``"auto"``, ``"reference"`` or ``"triton"``.

    Returns:
        ``(B, T, H, P)`` in q's dtype.
    """
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k, v must all be (batch, seq, heads, head_dim); got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    resolve_backend(backend, q, available=())
    return chunk_attention_reference(q, k, v, chunk_size, rope_base, scale)
