"""Flash-style Triton forward kernel for dilated + window + sink causal attention.

Maths (see :mod:`.reference`): query t attends in one softmax to the keys j <= t with
(j + 1) % D == 0, or t - j <= W, or j < I. The kernel splits that set into four disjoint parts,
so no key is counted twice and each part has a loop with a simple per-row mask:

- diagonal   {j = t}: always allowed; a row-wise dot (no tl.dot) that seeds the online softmax,
  so the running max is finite from the start and fully masked tiles give exp2(-inf) = 0;
- window     {t - W <= j < t}: contiguous key tiles over [t0 - W, t_last);
- dilated    {j < t - W, (j + 1) % D == 0}: only the gathered positions j = nD + D - 1, loaded
  with stride D rows (n < (t - W) // D), never the keys in between;
- sinks      {j < min(I, t - W), (j + 1) % D != 0}: one or a few tiles from j = 0.

One program owns (batch, head, BLOCK_M queries t0 .. t_last). Loop bounds come from the block's
query range; within a part, tiles that every row of the block may see fully run without a mask
(``MASKED=False``), the boundary tiles apply the per-row mask. Online softmax in fp32 and base 2
(scores times scale * log2(e)), fp32 accumulation; the output is divided once at the end and
stored with the log2-domain log-sum-exp. Inputs are read in place through their four strides
(slices of a fused projection, or any (B, T, H, P) view, need no copy); the output is contiguous.

Forward only: the custom op ``rat_lightning::dilated_attention_fwd`` has a fake implementation
(torch.compile sees one opaque call) and an autograd registration whose backward raises; the
dispatcher sends differentiable calls to the reference instead.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from rat_lightning.ops.backend import TRITON_DTYPES, needs_grad
from rat_lightning.ops.triton_common import check_device, is_interpreted, register_forward_only, to_dot, to_store

__all__ = [
    "CONFIGS",
    "SUPPORTED_HEAD_DIMS",
    "KernelConfig",
    "dilated_attention_fwd",
    "dilated_attention_triton",
]

# Log2(e): the kernel works in base 2 (exp2 is one instruction), scores scaled by scale * log2(e).
_LOG2E = 1.4426950408889634
# tl.dot needs every dim >= 16, and the head dim is one tile (no column mask): powers of two.
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)

# Parts of the allowed set (constexpr selector of the masked loop; jit code may read a global only
# if it is a tl.constexpr).
_WINDOW, _DILATED, _SINKS = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


class KernelConfig(NamedTuple):
    """Launch configuration: BLOCK_M queries per program, BLOCK_N keys per tile (powers of two)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# 16-bit: swept on an H100 (Triton 3.6, bf16, 262,144 tokens, H = 16, P = 128; T in {4K, 16K, 64K}
# x (D, W, I) in {(16, 0, 0), (64, 0, 0), (16, 256, 4)}; block_m {64, 128} x block_n {32, 64, 128}
# x warps {4, 8} x stages {2, 3, 4}): (128, 32, 4, 3) was within 13% of each case's best (4% on
# the geometric mean) and best at T = 64K; the FA2 tutorial's (128, 64, 8, 3) was up to 1.6x
# slower at T = 4K, where short dilated loops leave the boundary tiles' waste dominant.
# fp32 (the accuracy path, IEEE dots on FMA units) is not tuned: small tiles.
CONFIGS = {
    "fwd": KernelConfig(128, 32, 4, 3),
    "fwd_fp32": KernelConfig(64, 32, 4, 1),
}


@triton.jit
def _attend(
    b_m,
    b_l,
    b_acc,
    b_q,
    k_bh,
    v_bh,
    o_t,
    n_lo,
    n_hi,
    key_step,
    key_shift,
    window,
    dilation,
    qk_scale,
    stride_kt,
    stride_kp,
    stride_vt,
    stride_vp,
    PART: tl.constexpr,
    MASKED: tl.constexpr,
    P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    EMULATE: tl.constexpr,
):
    """Online softmax over key tiles n in [n_lo, n_hi) of one part; key j = n * key_step + key_shift.

    MASKED: apply the part's per-row mask and the load mask n < n_hi (boundary tiles); without it
    every row of the block may see every key of every tile (interior tiles, all in bounds).
    """
    DTYPE = k_bh.dtype.element_ty
    o_p = tl.arange(0, P)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        o_j = o_n * key_step + key_shift
        # int64 rows: j * stride_t passes 2^31 for long sequences of wide (H * P) rows.
        o_jk = o_j.to(tl.int64)
        # Keys transposed (P, BLOCK_N), so the score is a plain q @ k^T; the dilated part gathers
        # rows nD + D - 1 here by strided addressing.
        p_kt = k_bh + o_jk[None, :] * stride_kt + o_p[:, None] * stride_kp
        p_v = v_bh + o_jk[:, None] * stride_vt + o_p[None, :] * stride_vp
        if MASKED:
            m_n = o_n < n_hi
            b_kt = tl.load(p_kt, mask=m_n[None, :], other=0.0)
        else:
            b_kt = tl.load(p_kt)
        b_s = tl.dot(b_q, to_dot(b_kt, DTYPE, EMULATE), input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            distance = o_t[:, None] - o_j[None, :]
            if PART == _WINDOW:  # window: 1 <= t - j <= W (the diagonal has its own term)
                m_s = (distance >= 1) & (distance <= window)
            elif PART == _DILATED:  # dilated: j < t - W
                m_s = distance > window
            else:  # sinks: j < t - W, not a dilated position (j < I by n_hi)
                m_s = (distance > window) & (((o_j + 1) % dilation) != 0)[None, :]
            b_s = tl.where(m_s & m_n[None, :], b_s, float("-inf"))
        # b_m starts at the diagonal score (finite), so masked entries give exp2(-inf) = 0.
        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
        b_alpha = tl.exp2(b_m - b_m_new)
        b_p = tl.exp2(b_s - b_m_new[:, None])
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        if MASKED:
            b_v = tl.load(p_v, mask=m_n[:, None], other=0.0)
        else:
            b_v = tl.load(p_v)
        b_acc = b_acc * b_alpha[:, None]
        b_acc = tl.dot(to_dot(b_p, DTYPE, EMULATE), to_dot(b_v, DTYPE, EMULATE), b_acc, input_precision=DOT_PRECISION)
        b_m = b_m_new
    return b_m, b_l, b_acc


# D, W, I stay runtime ints: Triton would turn a value of 1 into a constexpr (one more compile per
# value, and Python bools in the scalar tl.where below).
@triton.jit(do_not_specialize=["dilation", "window", "sinks"])
def dilated_attention_fwd_kernel(
    q,
    k,
    v,
    o,
    lse,
    T,
    H,
    dilation,
    window,
    sinks,
    qk_scale,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_qp,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_kp,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_vp,
    P: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    EMULATE: tl.constexpr,
):
    """Forward: o contiguous (B, T, H, P) in q's dtype, lse (B, H, T) fp32 (log2 domain, scaled scores).

    Grid: (cdiv(T, BLOCK_M), B * H). q, k, v: (B, T, H, P) with any strides; dilation <= T + 1,
    window <= T, sinks <= T (clamped by the launcher: larger values mean the same mask);
    qk_scale = scale * log2(e).
    """
    # Later query blocks see more keys: launch them first, so the grid's tail is the light blocks.
    i_m = tl.num_programs(0) - 1 - tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    DTYPE = q.dtype.element_ty
    t0 = i_m * BLOCK_M
    t_last = tl.minimum(t0 + BLOCK_M, T) - 1
    o_t = t0 + tl.arange(0, BLOCK_M)
    m_t = o_t < T
    o_tk = o_t.to(tl.int64)
    o_p = tl.arange(0, P)
    q_bh = q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
    k_bh = k + i_b.to(tl.int64) * stride_kb + i_h.to(tl.int64) * stride_kh
    v_bh = v + i_b.to(tl.int64) * stride_vb + i_h.to(tl.int64) * stride_vh

    b_q = tl.load(q_bh + o_tk[:, None] * stride_qt + o_p[None, :] * stride_qp, mask=m_t[:, None], other=0.0)
    b_k = tl.load(k_bh + o_tk[:, None] * stride_kt + o_p[None, :] * stride_kp, mask=m_t[:, None], other=0.0)
    # Diagonal first: score q_t . k_t (exact products in fp32), weight exp2(0) = 1, value v_t.
    b_m = tl.sum(b_q.to(tl.float32) * b_k.to(tl.float32), 1) * qk_scale
    b_l = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    b_acc = tl.load(v_bh + o_tk[:, None] * stride_vt + o_p[None, :] * stride_vp, mask=m_t[:, None], other=0.0)
    b_acc = b_acc.to(tl.float32)
    b_q = to_dot(b_q, DTYPE, EMULATE)

    # Dilated part: row t sees n < (t - W) // D (j = nD + D - 1 < t - W); every row of the
    # block sees n < n_all, some row sees n < n_any.
    n_all = tl.maximum(t0 - window, 0) // dilation
    n_any = tl.maximum(t_last - window, 0) // dilation
    n_mid = (n_all // BLOCK_N) * BLOCK_N
    b_m, b_l, b_acc = _attend(
        b_m, b_l, b_acc, b_q, k_bh, v_bh, o_t, 0, n_mid, dilation, dilation - 1, window, dilation, qk_scale,
        stride_kt, stride_kp, stride_vt, stride_vp, _DILATED, False, P, BLOCK_N, DOT_PRECISION, EMULATE,
    )  # fmt: skip
    b_m, b_l, b_acc = _attend(
        b_m, b_l, b_acc, b_q, k_bh, v_bh, o_t, n_mid, n_any, dilation, dilation - 1, window, dilation, qk_scale,
        stride_kt, stride_kp, stride_vt, stride_vp, _DILATED, True, P, BLOCK_N, DOT_PRECISION, EMULATE,
    )  # fmt: skip

    # Sinks: keys j < min(I, t - W) off the dilated positions (with D = 1 every key is one: none).
    s_hi = tl.minimum(sinks, tl.maximum(t_last - window, 0))
    s_hi = tl.where(dilation > 1, s_hi, 0)
    b_m, b_l, b_acc = _attend(
        b_m, b_l, b_acc, b_q, k_bh, v_bh, o_t, 0, s_hi, 1, 0, window, dilation, qk_scale,
        stride_kt, stride_kp, stride_vt, stride_vp, _SINKS, True, P, BLOCK_N, DOT_PRECISION, EMULATE,
    )  # fmt: skip

    # Window: keys [t0 - W, t_last) (empty for W = 0: the diagonal is done). Every row sees
    # [t_last - W, t0); tiles start at w_lo, so the unmasked ones are [w_mid, w_end).
    w_lo = tl.maximum(t0 - window, 0)
    w_hi = tl.where(window > 0, t_last, w_lo)
    w_all = tl.maximum(t_last - window, 0)
    w_mid = tl.minimum(w_lo + tl.cdiv(w_all - w_lo, BLOCK_N) * BLOCK_N, w_hi)
    w_end = w_mid + (tl.maximum(t0 - w_mid, 0) // BLOCK_N) * BLOCK_N
    b_m, b_l, b_acc = _attend(
        b_m, b_l, b_acc, b_q, k_bh, v_bh, o_t, w_lo, w_mid, 1, 0, window, dilation, qk_scale,
        stride_kt, stride_kp, stride_vt, stride_vp, _WINDOW, True, P, BLOCK_N, DOT_PRECISION, EMULATE,
    )  # fmt: skip
    b_m, b_l, b_acc = _attend(
        b_m, b_l, b_acc, b_q, k_bh, v_bh, o_t, w_mid, w_end, 1, 0, window, dilation, qk_scale,
        stride_kt, stride_kp, stride_vt, stride_vp, _WINDOW, False, P, BLOCK_N, DOT_PRECISION, EMULATE,
    )  # fmt: skip
    b_m, b_l, b_acc = _attend(
        b_m, b_l, b_acc, b_q, k_bh, v_bh, o_t, w_end, w_hi, 1, 0, window, dilation, qk_scale,
        stride_kt, stride_kp, stride_vt, stride_vp, _WINDOW, True, P, BLOCK_N, DOT_PRECISION, EMULATE,
    )  # fmt: skip

    # o contiguous (B, T, H, P); lse (B, H, T).
    o_orow = ((i_b.to(tl.int64) * T + o_tk) * H + i_h) * P
    b_o = b_acc / b_l[:, None]
    tl.store(o + o_orow[:, None] + o_p[None, :], to_store(b_o, o.dtype.element_ty, EMULATE), mask=m_t[:, None])
    tl.store(lse + i_bh.to(tl.int64) * T + o_t, b_m + tl.log2(b_l), mask=m_t)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k, v must all be (batch, seq, heads, head_dim); got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in TRITON_DTYPES:
        raise ValueError(
            f"the Triton kernel takes q, k, v of one dtype among fp16, bf16, fp32; got {q.dtype}, {k.dtype}, "
            f"{v.dtype}; cast them or use backend='reference'"
        )
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"the Triton kernel needs head_dim in {SUPPORTED_HEAD_DIMS} (a power of two, one tl.dot tile), "
            f"got {q.shape[-1]}; use backend='reference' or pick d_model / n_heads accordingly"
        )
    check_device(q)


def dilated_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dilation: int,
    window: int,
    sinks: int,
    scale: float,
    config: KernelConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel (no autograd).

    Args:
        q, k, v: ``(B, T, H, P)`` of one dtype (fp16, bf16 or fp32), P in ``SUPPORTED_HEAD_DIMS``,
            any strides (read in place).
        dilation, window, sinks: D >= 1, W >= 0, I >= 0 (see :mod:`.reference`).
        scale: softmax scale.
        config: tiles and launch options; default ``CONFIGS["fwd"]`` (``"fwd_fp32"`` for fp32).

    Returns:
        ``o`` ``(B, T, H, P)`` contiguous in q's dtype and ``lse`` ``(B, H, T)`` fp32, the
        log2-domain log-sum-exp of the scores times ``scale * log2(e)``.
    """
    _check_inputs(q, k, v)
    batch, length, heads, head_dim = q.shape
    o = torch.empty((batch, length, heads, head_dim), device=q.device, dtype=q.dtype)
    lse = torch.empty((batch, heads, length), device=q.device, dtype=torch.float32)
    if o.numel() == 0:
        return o, lse
    config = config or CONFIGS["fwd_fp32" if q.dtype == torch.float32 else "fwd"]
    grid = (triton.cdiv(length, config.block_m), batch * heads)
    # Larger D, W, I than the sequence mean the same mask; clamping keeps them 32-bit kernel ints.
    dilation, window, sinks = min(dilation, length + 1), min(window, length), min(sinks, length)
    dilated_attention_fwd_kernel[grid](
        q, k, v, o, lse, length, heads, dilation, window, sinks, scale * _LOG2E,
        *q.stride(), *k.stride(), *v.stride(),
        P=head_dim, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        # fp32 dots follow torch's matmul setting: IEEE fp32 unless tf32 is allowed
        # (torch.set_float32_matmul_precision("high")); fp16 / bf16 dots ignore it.
        DOT_PRECISION="tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee",
        EMULATE=is_interpreted() and q.dtype == torch.bfloat16,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return o, lse


@torch.library.custom_op("rat_lightning::dilated_attention_fwd", mutates_args=())
def _fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dilation: int, window: int, sinks: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return dilated_attention_fwd(q, k, v, dilation, window, sinks, scale)


@_fwd_op.register_fake
def _fwd_fake(q, k, v, dilation, window, sinks, scale):
    batch, length, heads, head_dim = q.shape
    o = q.new_empty((batch, length, heads, head_dim))
    return o, q.new_empty((batch, heads, length), dtype=torch.float32)


def _setup_context(ctx, inputs, output) -> None:
    ctx.mark_non_differentiable(output[1])


register_forward_only(_fwd_op, "dilated attention kernel", "dilated_attention", setup_context=_setup_context)


def dilated_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dilation: int,
    window: int = 0,
    sinks: int = 0,
    scale: float | None = None,
) -> torch.Tensor:
    """Forward-only Triton dilated attention (torch custom op ``rat_lightning::dilated_attention_fwd``).

    Args:
        q, k, v: ``(B, T, H, P)`` of one dtype (fp16, bf16 or fp32), P in ``SUPPORTED_HEAD_DIMS``.
        dilation, window, sinks: D >= 1, W >= 0, I >= 0.
        scale: default ``P ** -0.5``.

    Returns:
        ``(B, T, H, P)`` contiguous, in q's dtype.

    Raises:
        ValueError: when autograd would need gradients of q, k or v (there is no backward kernel).
    """
    if needs_grad(q, k, v):
        raise ValueError(
            "the Triton dilated attention kernel has no backward and q, k or v requires grad; use "
            "backend='auto' or 'reference' (differentiable), or call it under torch.no_grad()"
        )
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    o, _ = _fwd_op(q, k, v, int(dilation), int(window), int(sinks), scale)
    return o
