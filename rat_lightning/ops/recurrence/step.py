"""Triton kernel for one decoding step of the gated recurrence (maths: :func:`.reference.gated_recurrence_step`).

    a = sigmoid(g + bias),  1 - a = sigmoid(-(g + bias))
    s = a s_prev + (1 - a) v          v in {x, k repeated from G groups to H heads}; no s_prev at a chunk start

One elementwise pass: x, g, k, the bias and the previous states read once, the fp32 states
written once (about 115 MB a layer at batch 2752 for the 1.3B shapes). The reference makes about a
dozen PyTorch passes over the same rows (casts, two sigmoids, the k repeat, products, sums; about
900 MB, about 5 ms of a generation step's 13.6 ms of eager glue on an H200; docs/kernels.md,
"Where a generation step's time goes"). Grid: one program per ``BLOCK_R`` rows of P; a row is one
(sequence, head). Gates as in the parallel kernels (``_gates``: a and 1 - a from one exp(-|g|)).

Forward only, a torch custom op (``rat_lightning::gated_recurrence_step``) with a fake
implementation; the dispatcher sends calls that need gradients to the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rat_lightning.ops.layout import rows_contiguous
from rat_lightning.ops.recurrence.triton import _gates
from rat_lightning.ops.triton_common import check_device, col_mask, register_forward_only

__all__ = ["BLOCK_ROWS", "recurrence_step"]

# Rows of P per program: 16 rows of 128 channels are 2,048 elements, 8 KB of each fp32 state.
BLOCK_ROWS = 16


@triton.jit
def recurrence_step_kernel(
    x, g, k, bias, sx_prev, sk_prev, sx, sk, R,
    stride_xb, stride_gb, stride_kb, stride_pxb, stride_pkb,
    H: tl.constexpr, HPG: tl.constexpr, P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
    HAS_K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr,
):  # fmt: skip
    """Rows ``r = b H + h`` of one program. x, g ``(B, H, P)``, k ``(B, G, P)`` and the previous
    states ``(B, H, P)`` fp32 each with rows contiguous (batch strides given); bias ``(H, P)``
    contiguous; sx, sk ``(B, H, P)`` fp32 contiguous."""
    o_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    m_r = o_r < R
    i_b, i_h = o_r // H, o_r % H
    o_p = tl.arange(0, BLOCK_P)
    m = m_r[:, None] & col_mask(o_p, P, BLOCK_P)[None, :]
    o_head = (i_h * P)[:, None] + o_p[None, :]
    b_g = tl.load(g + (i_b * stride_gb)[:, None] + o_head, mask=m, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b_g += tl.load(bias + o_head, mask=m, other=0.0).to(tl.float32)
    b_a, b_b = _gates(b_g)
    o_out = o_r[:, None] * P + o_p[None, :]
    b_sx = b_b * tl.load(x + (i_b * stride_xb)[:, None] + o_head, mask=m, other=0.0).to(tl.float32)
    if HAS_STATE:
        b_sx += b_a * tl.load(sx_prev + (i_b * stride_pxb)[:, None] + o_head, mask=m, other=0.0)
    tl.store(sx + o_out, b_sx, mask=m)
    if HAS_K:
        o_group = ((i_h // HPG) * P)[:, None] + o_p[None, :]
        b_sk = b_b * tl.load(k + (i_b * stride_kb)[:, None] + o_group, mask=m, other=0.0).to(tl.float32)
        if HAS_STATE:
            b_sk += b_a * tl.load(sk_prev + (i_b * stride_pkb)[:, None] + o_head, mask=m, other=0.0)
        tl.store(sk + o_out, b_sk, mask=m)


@torch.library.custom_op("rat_lightning::gated_recurrence_step", mutates_args=())
def recurrence_step(
    x: torch.Tensor,
    g: torch.Tensor,
    k: torch.Tensor | None,
    gate_bias: torch.Tensor | None,
    sx_prev: torch.Tensor | None,
    sk_prev: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the step kernel (the custom op ``rat_lightning::gated_recurrence_step``); no autograd.

    Args:
        x, g: ``(B, H, P)``; k: ``(B, G, P)`` (H % G == 0) or None; fp16, bf16 or fp32, read in
            place where each row of P is contiguous.
        gate_bias: ``(H, P)`` or None.
        sx_prev, sk_prev: the previous states ``(B, H, P)`` fp32, or None (a chunk start); sk_prev
            is given exactly when k is and sx_prev is.

    Returns:
        ``(sx, sk)`` fp32 ``(B, H, P)`` contiguous; sk has no elements when k is None.
    """
    check_device(x, "the Triton recurrence step")
    batch, heads, dim = x.shape
    x, g = rows_contiguous(x), rows_contiguous(g)
    sx = torch.empty((batch, heads, dim), device=x.device, dtype=torch.float32)
    sk = torch.empty_like(sx) if k is not None else sx.new_empty(0)
    rows = batch * heads
    if rows == 0 or dim == 0:
        return sx, sk
    # Absent tensors are never read (constexpr flags); x stands in so that no pointer is null.
    k = rows_contiguous(k) if k is not None else x
    bias = gate_bias.contiguous() if gate_bias is not None else x
    sx_prev = rows_contiguous(sx_prev) if sx_prev is not None else sx
    sk_prev = rows_contiguous(sk_prev) if sk_prev is not None else sx_prev
    recurrence_step_kernel[(triton.cdiv(rows, BLOCK_ROWS),)](
        x, g, k, bias, sx_prev, sk_prev, sx, sk if sk.numel() else sx, rows,
        x.stride(0), g.stride(0), k.stride(0), sx_prev.stride(0), sk_prev.stride(0),
        H=heads, HPG=heads // k.shape[1], P=dim, BLOCK_R=BLOCK_ROWS, BLOCK_P=triton.next_power_of_2(dim),
        HAS_K=sk.numel() > 0, HAS_BIAS=gate_bias is not None, HAS_STATE=sx_prev is not sx, num_warps=4,
    )  # fmt: skip
    return sx, sk


@recurrence_step.register_fake
def _step_fake(x, g, k, gate_bias, sx_prev, sk_prev):
    sx = x.new_empty(x.shape, dtype=torch.float32)
    return sx, (torch.empty_like(sx) if k is not None else sx.new_empty(0))


register_forward_only(recurrence_step, "recurrence step", "gated_recurrence_step")
