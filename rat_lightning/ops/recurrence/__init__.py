"""Dispatcher for the gated linear recurrence (see :mod:`.reference` for the maths)."""

from __future__ import annotations

import importlib.util

import torch

from rat_lightning.ops.backend import TRITON_DTYPES, needs_grad, resolve_backend
from rat_lightning.ops.recurrence.reference import (
    gated_recurrence_chunked,
    gated_recurrence_stepwise,
)
from rat_lightning.ops.recurrence.reference import gated_recurrence_step as gated_recurrence_step_reference

__all__ = ["gated_recurrence", "gated_recurrence_step", "gated_recurrence_step_reference", "gated_recurrence_stepwise"]

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


def gated_recurrence_step(
    x: torch.Tensor,
    g: torch.Tensor,
    state: tuple[torch.Tensor, torch.Tensor | None] | None,
    k: torch.Tensor | None = None,
    gate_bias: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One decoding step ``s = a s_prev + (1 - a) v`` of the recurrence (maths: :mod:`.reference`).

    Args:
        x, g: ``(B, H, P)`` value and gate logits of the token; k: ``(B, G, P)`` or None.
        state: the previous ``(sx, sk)`` ``(B, H, P)`` in the compute dtype (fp32; fp64 for fp64
            inputs), sk given exactly when k is; None at a chunk start (the state restarts).
        gate_bias: ``(H, P)`` or None.
        backend: ``"auto"`` (the Triton step kernel on CUDA for fp16 / bf16 / fp32 inputs and fp32
            states when no gradient is needed, else the reference), ``"reference"`` or
            ``"triton"`` (forward only; also CPU tensors under TRITON_INTERPRET=1).

    Returns:
        ``(sx, sk)`` ``(B, H, P)`` in the compute dtype; sk is None when k is None.
    """
    if x.dim() != 3 or g.shape != x.shape:
        raise ValueError(
            f"x and g must be (batch, heads, head_dim) of one shape, got {tuple(x.shape)}, {tuple(g.shape)}"
        )
    k_fits = k is None or (k.dim() == 3 and (k.shape[0], k.shape[2]) == (x.shape[0], x.shape[2]))
    if not k_fits or (k is not None and x.shape[1] % k.shape[1]):
        raise ValueError(
            f"k must be (batch, groups, head_dim) with heads % groups == 0; x is {tuple(x.shape)}, "
            f"k is {tuple(k.shape)}"
        )
    if gate_bias is not None and gate_bias.shape != x.shape[1:]:
        raise ValueError(f"gate_bias must be (heads, head_dim) = {tuple(x.shape[1:])}, got {tuple(gate_bias.shape)}")
    if state is not None and (
        state[0].shape != x.shape or (state[1] is None) != (k is None) or (k is not None and state[1].shape != x.shape)
    ):
        raise ValueError(
            f"state must be (sx, sk) of shape (batch, heads, head_dim) = {tuple(x.shape)}, with sk given exactly "
            "when k is"
        )
    inputs = [t for t in (x, g, k, gate_bias, *(state or ())) if t is not None]
    states = [t for t in state or () if t is not None]
    supported = all(t.dtype in TRITON_DTYPES for t in inputs) and all(t.dtype == torch.float32 for t in states)
    # The step kernel has no backward: a differentiable call takes the reference under "auto".
    differentiable = needs_grad(*inputs)
    if backend == "triton" and (not supported or differentiable):
        raise ValueError(
            "backend='triton' takes fp16 / bf16 / fp32 inputs with fp32 states and no gradient (it is forward-only); "
            "use backend='auto' or 'reference'"
        )
    if resolve_backend(backend, x, available=_AVAILABLE if supported and not differentiable else ()) == "triton":
        from rat_lightning.ops.recurrence.step import recurrence_step

        sx_prev, sk_prev = state if state is not None else (None, None)
        sx, sk = recurrence_step(x, g, k, gate_bias, sx_prev, sk_prev)
        return sx, (sk if k is not None else None)
    return gated_recurrence_step_reference(x, g, state, k, gate_bias)
