"""The mixing core of a RAT layer as one op over the Triton kernels, with one gradient buffer.

Forward: the recurrence kernel reads x, g, k from the packed projection h in place, and the
chunk attention reads q and z there too and writes the gated output y. The chunk attention runs
as the flash-style Triton kernels (``attention="triton"``, :mod:`..chunk_attention.triton`) or,
for long sequences, around cuDNN's fused attention (``attention="cudnn"``,
:mod:`..chunk_attention.regrouped`); the two save a different log-sum-exp. Backward: one
buffer dh shaped like h; the chunk-attention kernels write dq and dz into its slices and the
recurrence kernel dx, dg, dk, so no gradient is concatenated or repeated. The states' gradients
pass between them factored (:class:`~rat_lightning.ops.recurrence.triton.StateGrads`): two
numbers per token and head plus the summaries' rows, not two full gradient rows. Saved for the
backward: h, the states, y (also the input the output projection saves) and the log-sum-exp.
"""

from __future__ import annotations

import torch

from rat_lightning.ops.chunk_attention.regrouped import regrouped_attention_bwd, regrouped_attention_fwd
from rat_lightning.ops.chunk_attention.triton import chunk_attention_bwd_factored, chunk_attention_fwd
from rat_lightning.ops.rat_mixing.reference import split_projection
from rat_lightning.ops.recurrence.triton import recurrence_bwd, recurrence_fwd

ATTENTION = ("triton", "cudnn")


@torch.library.custom_op("rat_lightning::rat_mixing_fwd", mutates_args=())
def rat_mixing_fwd(
    h: torch.Tensor, gate_bias: torch.Tensor, heads: int, groups: int, chunk_size: int, rope_base: float,
    attention: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(y, sx, sk, lse)``: y ``(B, T, H * P)`` and the states ``(B, T, H, P)`` in h's dtype, lse
    fp32 ``(B, H, T)`` (``attention="triton"``, see :func:`.chunk_attention.triton.chunk_attention_fwd`)
    or ``(2, B, H L, ceil(T / L) - 1)``, the log-sum-exp and the own state's weight (``"cudnn"``,
    :func:`.chunk_attention.regrouped.regrouped_attention_fwd`)."""
    z, x, g, q, k = split_projection(h, heads, groups)
    sx, sk = recurrence_fwd(x, g, k, gate_bias, chunk_size)
    forward = regrouped_attention_fwd if attention == "cudnn" else chunk_attention_fwd
    y, lse = forward(q, sk, sx, chunk_size, rope_base, x.shape[-1] ** -0.5, gate=z)
    return y.flatten(2), sx, sk, lse


@rat_mixing_fwd.register_fake
def _fwd_fake(h, gate_bias, heads, groups, chunk_size, rope_base, attention):
    batch, length, width = h.shape
    dim = width // (3 * heads + 2 * groups)
    states = h.new_empty(batch, length, heads, dim)
    if attention == "cudnn":
        lse = h.new_empty(2, batch, heads * chunk_size, max(-(-length // chunk_size) - 1, 0), dtype=torch.float32)
    else:
        lse = h.new_empty(batch, heads, length, dtype=torch.float32)
    return h.new_empty(batch, length, heads * dim), states, torch.empty_like(states), lse


@torch.library.custom_op("rat_lightning::rat_mixing_bwd", mutates_args=())
def rat_mixing_bwd(
    dy: torch.Tensor,
    h: torch.Tensor,
    gate_bias: torch.Tensor,
    y: torch.Tensor,
    sx: torch.Tensor,
    sk: torch.Tensor,
    lse: torch.Tensor,
    heads: int,
    groups: int,
    chunk_size: int,
    rope_base: float,
    attention: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dh, dgate_bias)``: the gradient of h written slice by slice into one buffer."""
    z, x, g, q, k = split_projection(h, heads, groups)
    dh = torch.empty_like(h)
    dz, dx, dg, dq, dk = split_projection(dh, heads, groups)
    backward = regrouped_attention_bwd if attention == "cudnn" else chunk_attention_bwd_factored
    _, _, state_grads = backward(
        dy.unflatten(-1, sx.shape[2:]), q, sk, sx, y.unflatten(-1, sx.shape[2:]), lse, chunk_size, rope_base,
        x.shape[-1] ** -0.5, z, dq=dq, dgate=dz,
    )  # fmt: skip
    dbias = recurrence_bwd(state_grads, None, x, g, k, gate_bias, sx, sk, chunk_size, grads_out=(dx, dg, dk))[3]
    return dh, dbias


@rat_mixing_bwd.register_fake
def _bwd_fake(dy, h, gate_bias, y, sx, sk, lse, heads, groups, chunk_size, rope_base, attention):
    return torch.empty_like(h), torch.empty_like(gate_bias)


def _setup_context(ctx, inputs, output) -> None:
    h, gate_bias, heads, groups, chunk_size, rope_base, attention = inputs
    y, sx, sk, lse = output
    ctx.save_for_backward(h, gate_bias, y, sx, sk, lse)
    ctx.args = (heads, groups, chunk_size, rope_base, attention)
    ctx.mark_non_differentiable(sx, sk, lse)
    # Else autograd fills zero gradients for the three non-differentiable outputs before every
    # backward: two (B, T, H, P) fills, 0.65 ms of a 4K layer's 55 ms step on an H100.
    ctx.set_materialize_grads(False)


def _backward(ctx, dy, dsx, dsk, dlse):
    if dy is None:
        return None, None, None, None, None, None, None
    h, gate_bias, y, sx, sk, lse = ctx.saved_tensors
    dh, dbias = rat_mixing_bwd(dy, h, gate_bias, y, sx, sk, lse, *ctx.args)
    return dh, dbias, None, None, None, None, None


rat_mixing_fwd.register_autograd(_backward, setup_context=_setup_context)
