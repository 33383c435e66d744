"""Dispatcher for dilated (+ local window, + sink) causal attention (maths in :mod:`.reference`).

Not re-exported from :mod:`rat_lightning.ops` under the name ``dilated_attention``: that would
shadow this subpackage as an attribute of ``rat_lightning.ops`` (import it from here).
"""

from __future__ import annotations

import importlib.util

import torch

from rat_lightning.ops.backend import TRITON_DTYPES, needs_grad, resolve_backend
from rat_lightning.ops.dilated_attention.reference import (
    dilated_attention_reference,
    dilated_mask,
    dilated_mask_rows,
)

__all__ = ["dilated_attention", "dilated_attention_reference", "dilated_mask", "dilated_mask_rows"]

# The Triton module is imported on first use: its kernel is built (or set up for the
# interpreter, TRITON_INTERPRET=1) when it is imported, and CPU-only installs never need it.
_AVAILABLE = ("triton",) if importlib.util.find_spec("triton") is not None else ()
# What the Triton kernel takes (mirrors .triton's SUPPORTED_*, kept here so that "auto" can
# decide without importing triton).
_TRITON_HEAD_DIMS = (16, 32, 64, 128)


def _check_int(name: str, value: object, minimum: int, meaning: str) -> None:
    # bool is an int subclass; True as a dilation is a bug, not a 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum} ({meaning}), got {value!r}")


def dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    dilation: int,
    window: int = 0,
    sinks: int = 0,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Causal attention over dilated positions, a local window and sink tokens, in one softmax.

    Query t attends to the keys j <= t with ``(j + 1) % dilation == 0`` (the last position of
    every block of ``dilation``), or ``t - j <= window``, or ``j < sinks``.

    Args:
        q, k, v: ``(B, T, H, P)`` of one float dtype, RoPE already applied to q and k.
        dilation: D >= 1 (1 = dense causal attention).
        window: W >= 0 (0 keeps only the query's own position from the window).
        sinks: I >= 0 leading tokens every query sees.
        scale: softmax scale, default ``P ** -0.5``.
        backend: ``"auto"`` (Triton on CUDA for fp16 / bf16 / fp32 and P in {16, 32, 64, 128}
            when no gradient is needed, else the reference), ``"reference"`` (masked SDPA,
            differentiable) or ``"triton"`` (forward only; also CPU tensors under
            TRITON_INTERPRET=1).

    Returns:
        ``(B, T, H, P)`` in q's dtype.

    Raises:
        ValueError: bad shapes, dtypes or D / W / I; ``backend="triton"`` where the kernel does not
            apply (gradients required, dtype, head_dim).
    """
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k, v must all be (batch, seq, heads, head_dim) of one shape; got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(f"q, k, v must share one float dtype, got {q.dtype}, {k.dtype}, {v.dtype}; cast them first")
    _check_int("dilation", dilation, 1, "1 = dense causal; the last position of every D-block is kept")
    _check_int("window", window, 0, "0 keeps only the query's own position")
    _check_int("sinks", sinks, 0, "the number of leading tokens every query sees; 0 for none")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise ValueError(f"scale must be a float or None (P ** -0.5), got {scale!r}")

    # The kernel has no backward: a differentiable call takes the reference even under "auto".
    differentiable = needs_grad(q, k, v)
    if backend == "triton":
        if differentiable:
            raise ValueError(
                "backend='triton' is forward-only but q, k or v requires grad; use backend='auto' or "
                "'reference' (differentiable), or call it under torch.no_grad()"
            )
        if q.dtype not in TRITON_DTYPES:
            raise ValueError(
                f"the Triton kernel takes fp16, bf16 or fp32 q, k, v, got {q.dtype}; use backend='reference'"
            )
        if q.shape[-1] not in _TRITON_HEAD_DIMS:
            raise ValueError(
                f"the Triton kernel needs head_dim in {_TRITON_HEAD_DIMS}, got {q.shape[-1]}; use backend='reference'"
            )
    fits = q.dtype in TRITON_DTYPES and q.shape[-1] in _TRITON_HEAD_DIMS and not differentiable
    if resolve_backend(backend, q, available=_AVAILABLE if fits else ()) == "triton":
        from rat_lightning.ops.dilated_attention.triton import dilated_attention_triton

        return dilated_attention_triton(q, k, v, dilation, window, sinks, scale)
    return dilated_attention_reference(q, k, v, dilation, window, sinks, scale)
