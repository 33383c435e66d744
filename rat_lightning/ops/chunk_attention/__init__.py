"""Dispatcher for RAT's inter-chunk attention (see :mod:`.reference` for the maths)."""

from __future__ import annotations

import importlib.util

import torch

from rat_lightning.ops.backend import resolve_backend
from rat_lightning.ops.chunk_attention.reference import chunk_attention_reference, chunk_attention_step

__all__ = ["chunk_attention", "chunk_attention_step"]

# The Triton module is imported on first use: its kernels are built (or set up for the
# interpreter, TRITON_INTERPRET=1) when it is imported, and CPU-only installs never need it.
_AVAILABLE = ("triton",) if importlib.util.find_spec("triton") is not None else ()
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


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
        backend: ``"auto"`` (Triton on CUDA for fp16/bf16/fp32, else reference),
            ``"reference"`` or ``"triton"`` (also CPU tensors under TRITON_INTERPRET=1).

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
    dtypes = (q.dtype, k.dtype, v.dtype)
    supported = all(dtype in _TRITON_DTYPES for dtype in dtypes)
    if backend == "triton" and not supported:
        raise ValueError(f"the Triton kernel takes fp16, bf16 or fp32 q, k, v, got {dtypes}; use backend='reference'")
    if resolve_backend(backend, q, available=_AVAILABLE if supported else ()) == "triton":
        if q.shape[-1] % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {q.shape[-1]}; pick d_model / n_heads even")
        from rat_lightning.ops.chunk_attention.triton import chunk_attention_triton

        return chunk_attention_triton(q, k, v, chunk_size, rope_base, scale)
    return chunk_attention_reference(q, k, v, chunk_size, rope_base, scale)
