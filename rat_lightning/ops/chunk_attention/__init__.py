"""Dispatcher for RAT's inter-chunk attention (see :mod:`.reference` for the maths)."""

from __future__ import annotations

import importlib.util

import torch

from rat_lightning.ops.backend import TRITON_DTYPES, needs_grad, resolve_backend
from rat_lightning.ops.chunk_attention.reference import chunk_attention_reference, rotate_summary
from rat_lightning.ops.chunk_attention.reference import chunk_attention_step as chunk_attention_step_reference

__all__ = ["chunk_attention", "chunk_attention_step", "chunk_attention_step_reference", "rotate_summary"]

# The Triton module is imported on first use: its kernels are built (or set up for the
# interpreter, TRITON_INTERPRET=1) when it is imported, and CPU-only installs never need it.
_AVAILABLE = ("triton",) if importlib.util.find_spec("triton") is not None else ()


def chunk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    chunk_size: int,
    *,
    rope_base: float = 10000.0,
    scale: float | None = None,
    gate: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Softmax over previous chunk summaries plus the own running state, chunk-index RoPE,
    optionally times an output gate ``sigmoid(gate)``.

    Args:
        q: ``(B, T, G, P)`` queries in G groups, each shared by H / G consecutive heads (G = H: one
            query per head); k, v: ``(B, T, H, P)`` recurrent states.
        chunk_size: L (positive int).
        rope_base: RoPE base.
        scale: default ``P ** -0.5``.
        gate: ``(B, T, H, P)`` output-gate logits, or None.
        backend: ``"auto"`` (Triton on CUDA for fp16/bf16/fp32, else reference),
            ``"reference"`` or ``"triton"`` (also CPU tensors under TRITON_INTERPRET=1). The Triton
            kernels read q and gate in place when their last two dims are contiguous.

    Returns:
        ``(B, T, H, P)`` in q's dtype.
    """
    if (
        q.dim() != 4
        or k.dim() != 4
        or v.shape != k.shape
        or q.shape[:2] != k.shape[:2]
        or q.shape[3] != k.shape[3]
        or k.shape[2] % q.shape[2]
    ):
        raise ValueError(
            "q must be (batch, seq, groups, head_dim) and k, v (batch, seq, heads, head_dim) with heads % groups "
            f"== 0; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if gate is not None and gate.shape != k.shape:
        raise ValueError(f"gate must have the shape of k {tuple(k.shape)}, got {tuple(gate.shape)}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    dtypes = tuple(t.dtype for t in (q, k, v, gate) if t is not None)
    supported = all(dtype in TRITON_DTYPES for dtype in dtypes)
    if backend == "triton" and not supported:
        raise ValueError(f"the Triton kernel takes fp16, bf16 or fp32 inputs, got {dtypes}; use backend='reference'")
    if resolve_backend(backend, q, available=_AVAILABLE if supported else ()) == "triton":
        if q.shape[-1] % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {q.shape[-1]}; pick d_model / n_heads even")
        from rat_lightning.ops.chunk_attention.triton import chunk_attention_triton

        return chunk_attention_triton(q, k, v, chunk_size, rope_base, scale, gate)
    return chunk_attention_reference(q, k, v, chunk_size, rope_base, scale, gate)


def chunk_attention_step(
    q: torch.Tensor,
    k_own: torch.Tensor,
    v_own: torch.Tensor,
    k_chunks: torch.Tensor,
    v_chunks: torch.Tensor,
    rope_base: float = 10000.0,
    scale: float | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """One decoding step of inter-chunk attention (maths: :func:`.reference.chunk_attention_step`).

    Args:
        q: ``(B, H, P)`` query of the current token, in chunk c = C.
        k_own, v_own: ``(B, H, P)`` running states of the current chunk.
        k_chunks, v_chunks: ``(B, C, H, P)`` summaries of the C finished chunks, keys RoPE'd at
            their chunk index (:func:`rotate_summary`); C may be 0.
        rope_base: RoPE base.
        scale: default ``P ** -0.5``.
        backend: ``"auto"`` (the Triton decode kernel on CUDA for fp16 / bf16 / fp32 inputs when no
            gradient is needed, else the reference), ``"reference"`` or ``"triton"`` (forward only;
            also CPU tensors under TRITON_INTERPRET=1).

    Returns:
        ``(B, H, P)`` fp32 (the reference gives fp64 for fp64 inputs).
    """
    if q.dim() != 3 or k_own.shape != q.shape or v_own.shape != q.shape:
        raise ValueError(
            f"q, k_own, v_own must be (batch, heads, head_dim) of one shape; got {tuple(q.shape)}, "
            f"{tuple(k_own.shape)}, {tuple(v_own.shape)}"
        )
    if (
        k_chunks.dim() != 4
        or v_chunks.shape != k_chunks.shape
        or (k_chunks.shape[0], *k_chunks.shape[2:]) != tuple(q.shape)
    ):
        raise ValueError(
            f"k_chunks, v_chunks must be (batch, chunks, heads, head_dim) matching q {tuple(q.shape)}; got "
            f"{tuple(k_chunks.shape)}, {tuple(v_chunks.shape)}"
        )
    inputs = (q, k_own, v_own, k_chunks, v_chunks)
    dtypes = tuple(x.dtype for x in inputs)
    supported = all(dtype in TRITON_DTYPES for dtype in dtypes)
    # The decode kernel has no backward: a differentiable call takes the reference under "auto".
    differentiable = needs_grad(*inputs)
    if backend == "triton":
        if not supported:
            raise ValueError(
                f"the Triton kernel takes fp16, bf16 or fp32 inputs, got {dtypes}; use backend='reference'"
            )
        if differentiable:
            raise ValueError(
                "backend='triton' is forward-only for the decode step but an input requires grad; use "
                "backend='auto' or 'reference' (differentiable), or call it under torch.no_grad()"
            )
    fits = supported and not differentiable
    if resolve_backend(backend, q, available=_AVAILABLE if fits else ()) == "triton":
        # The kernel's launcher checks what is left (even head_dim, CUDA or the interpreter).
        from rat_lightning.ops.chunk_attention.decode import chunk_attention_decode_triton

        return chunk_attention_decode_triton(q, k_own, v_own, k_chunks, v_chunks, rope_base, scale)
    return chunk_attention_step_reference(q, k_own, v_own, k_chunks, v_chunks, rope_base, scale)
