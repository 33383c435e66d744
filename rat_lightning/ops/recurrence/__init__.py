"""Dispatcher for the gated linear recurrence (see :mod:`.reference` for the maths)."""

from __future__ import annotations

import importlib.util

import torch

from rat_lightning.ops.backend import resolve_backend
from rat_lightning.ops.recurrence.reference import (
    gated_recurrence_chunked,
    gated_recurrence_step,
    gated_recurrence_stepwise,
)

__all__ = ["gated_recurrence", "gated_recurrence_step", "gated_recurrence_stepwise"]

# The Triton module is imported on first use: its kernels are built (or set up for the
# interpreter, TRITON_INTERPRET=1) when it is imported, and CPU-only installs never need it.
_AVAILABLE = ("triton",) if importlib.util.find_spec("triton") is not None else ()


def gated_recurrence(
    x: torch.Tensor,
    g: torch.Tensor,
    k: torch.Tensor | None = None,
    *,
    gate_bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    initial_state: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated linear recurrence ``s_t = a_t s_{t-1} + (1 - a_t) v_t`` over x and k.

    Args:
        x: ``(B, T, H, P)`` values, any float dtype.
        g: ``(B, T, H, P)`` gate logits; ``a = sigmoid(g + gate_bias)``.
        k: ``(B, T, G, P)`` keys in G groups shared by H/G heads, or None.
        gate_bias: ``(H, P)`` or None.
        chunk_size: restart every ``chunk_size`` tokens (RAT), or None (full sequence).
        initial_state: ``(sx, sk)`` each ``(B, H, P)``; full-sequence form only.
        backend: ``"auto"`` (Triton on CUDA where a kernel exists, else reference),
            ``"reference"`` or ``"triton"`` (also CPU tensors under TRITON_INTERPRET=1).

    Returns:
        ``(sx, sk)`` of shape ``(B, T, H, P)`` in x's dtype; sk is None when k is None.
    """
    if x.dim() != 4:
        raise ValueError(f"x must be (batch, seq, heads, head_dim), got shape {tuple(x.shape)}")
    if g.shape != x.shape:
        raise ValueError(f"g must have x's shape {tuple(x.shape)}, got {tuple(g.shape)}")
    if k is not None:
        if k.dim() != 4 or k.shape[:2] != x.shape[:2] or k.shape[3] != x.shape[3] or x.shape[2] % k.shape[2]:
            raise ValueError(
                f"k must be (batch, seq, groups, head_dim) with heads % groups == 0; x is {tuple(x.shape)}, "
                f"k is {tuple(k.shape)}"
            )
    if gate_bias is not None and gate_bias.shape != x.shape[2:]:
        raise ValueError(f"gate_bias must be (heads, head_dim) = {tuple(x.shape[2:])}, got {tuple(gate_bias.shape)}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if initial_state is not None and chunk_size is not None:
        raise ValueError("initial_state is only defined for the full-sequence form (chunk_size=None)")
    if initial_state is not None:
        state_shape = (x.shape[0], x.shape[2], x.shape[3])
        sx0, sk0 = initial_state
        sk0_ok = sk0 is None if k is None else (sk0 is not None and sk0.shape == state_shape)
        if sx0.shape != state_shape or not sk0_ok:
            raise ValueError(
                f"initial_state must be (sx, sk) of shape (batch, heads, head_dim) = {state_shape}, with sk "
                "given exactly when k is"
            )
    if resolve_backend(backend, x, available=_AVAILABLE) == "triton":
        from rat_lightning.ops.recurrence.triton import gated_recurrence_triton

        return gated_recurrence_triton(x, g, k, gate_bias, chunk_size, initial_state)
    return gated_recurrence_chunked(x, g, k, gate_bias, chunk_size, initial_state)
