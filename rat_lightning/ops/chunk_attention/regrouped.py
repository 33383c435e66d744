"""RAT's inter-chunk attention around a library attention kernel (cuDNN), for long sequences.

The softmax of query t (chunk c = t // L, offset i = t % L) runs over the summaries of chunks
j < c and its own state. Regrouped by offset, the queries of chunks 1..C-1 against the
summaries of chunks 0..C-2 are plain causal attention: query row h * L + i, position c - 1
sees keys j <= c - 1 of head h. So H * L query heads share the H key heads (grouped-query
attention) over C - 1 positions, which a library kernel runs at its full speed
(:mod:`.sdpa_lse`); these Triton kernels do the rest, each one pass over the rows:

- forward: :func:`regroup_queries_kernel` (RoPE at the chunk index, the group's query copied to
  its H / G heads), :func:`.triton.move_summaries_kernel` (rotated keys, values), the library
  call, then :func:`merge_own_state_kernel`: the own state joins the softmax through the log-sum-exps,
  the gate applies, y is written in the token layout, and the merged log-sum-exp and the own
  state's weight in it are saved.
- backward: :func:`prepare_backward_kernel` (dO = dy sigmoid(z), o = y / sigmoid(z), dz, the
  rotated queries again, and the own-state factors c, p of
  :class:`~rat_lightning.ops.recurrence.triton.StateGrads`, p being the saved weight, so the key
  states are not read here), the library backward with the merged o and log-sum-exp (exact
  gradients of the whole softmax, see :mod:`.sdpa_lse`), then :func:`query_grads_kernel` (dq: the
  library's, a group's heads summed and rotated back, plus the own state's c sk) and
  :func:`.triton.move_summaries_kernel` again for the summaries' gradients.

Regrouped buffers are ``(B, H * L, C, P)`` contiguous: element ``[b, h * L + i, c]`` is token
cL + i of head h (rows past T hold zeros); the library sees the view ``[:, :, 1:]``. dO stays
in this layout for the recurrence's backward (``StateGrads(..., regrouped=True)``).
Maths in fp32; the cost is about 6 rows of P per token and head forward, 10 backward, against
the library kernel's quadratic work, so the path pays from a few thousand chunks on.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rat_lightning.ops.chunk_attention.sdpa_lse import attention_with_lse, attention_with_lse_backward
from rat_lightning.ops.chunk_attention.triton import (
    _load_halves,
    _rotate,
    _rotate_back,
    _sigmoid,
    _store_halves,
    _tables,
    move_summaries,
)
from rat_lightning.ops.layout import check_output, rows_contiguous
from rat_lightning.ops.recurrence.triton import StateGrads
from rat_lightning.ops.triton_common import check_device, col_mask, is_interpreted, to_store

__all__ = ["WARPS", "regrouped_attention_bwd", "regrouped_attention_fwd"]

# Warps per program. The backward's preparation held about a dozen (L, P) fp32 tiles while it also
# computed the own state's part of dq: 229 registers at 4 warps (Triton 3.6, sm_90), 115 at 8, and
# 8 warps ran the op's forward+backward at 64K on the H100 in 44.3 / 45.5 ms, 4 in 46.1 / 47.4, 16
# in 46.4 / 47.3. Without that part (it moved to query_grads): 80 registers at 8 warps, 3.19 ms at
# 64K against 3.36 at 4 warps; query_grads 0.784 ms at 8 warps, 0.807 at 4.
WARPS = {"regroup": 4, "merge": 4, "prepare": 8, "query_grads": 8}


@triton.jit
def _chunk_rows(i_bc, C, L, T, BLOCK_L: tl.constexpr):
    """Batch, chunk, in-chunk offsets, token indices (int64) and row mask of program ``i_bc``."""
    i_b, i_c = i_bc // C, i_bc % C
    o_i = tl.arange(0, BLOCK_L)
    o_t = (i_c * L + o_i).to(tl.int64)
    return i_b.to(tl.int64), i_c, o_i, o_t, (o_i < L) & (o_t < T)


@triton.jit
def _chunk_rope(p_cos, p_sin, i_c, o_ph, m_ph, P_HALF: tl.constexpr):
    """cos, sin (1, BLOCK_PH) of chunk index ``i_c``."""
    b_cos = tl.load(p_cos + i_c * P_HALF + o_ph, mask=m_ph, other=0.0)[None, :]
    return b_cos, tl.load(p_sin + i_c * P_HALF + o_ph, mask=m_ph, other=0.0)[None, :]


@triton.jit
def regroup_queries_kernel(
    q, qr, p_cos, p_sin, T, C, L, stride_qb, stride_qt, stride_rb, stride_rr, stride_rc,
    HPG: tl.constexpr, P: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_PH: tl.constexpr, EMULATE: tl.constexpr,
):  # fmt: skip
    """qr[b, h L + i, c] = RoPE at c of q[b, cL + i, h // HPG] (zero past T). Grid (B * C, G)."""
    i_bc, i_g = tl.program_id(0), tl.program_id(1)
    i_b, i_c, o_i, o_t, m_t = _chunk_rows(i_bc, C, L, T, BLOCK_L)
    o_ph = tl.arange(0, BLOCK_PH)
    m_ph = col_mask(o_ph, P // 2, BLOCK_PH)
    b_q1, b_q2 = _load_halves(q + i_b * stride_qb + i_g * P, o_t * stride_qt, m_t, o_ph, m_ph, P // 2, False)
    b_cos, b_sin = _chunk_rope(p_cos, p_sin, i_c, o_ph, m_ph, P // 2)
    b_r1, b_r2 = _rotate(b_q1.to(tl.float32), b_q2.to(tl.float32), b_cos, b_sin)
    for i_hh in tl.static_range(HPG):
        o_r = ((i_g * HPG + i_hh) * L + o_i).to(tl.int64) * stride_rr + i_b * stride_rb + i_c * stride_rc
        _store_halves(qr, o_r, o_i < L, o_ph, m_ph, b_r1, b_r2, P // 2, EMULATE)


@triton.jit
def merge_own_state_kernel(
    q, sk, sx, z, o_lib, lse_lib, y, lse, own_w, T, C, L,
    stride_qb, stride_qt, stride_zb, stride_zt, stride_ob, stride_or, stride_oc, stride_lb, stride_lr, scale,
    H: tl.constexpr, HPG: tl.constexpr, P: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr,
    GATED: tl.constexpr, EMULATE: tl.constexpr,
):  # fmt: skip
    """The own state joins the library's softmax: per token, with s = scale q . sk (unrotated) and
    the library's (o, lse) over the summaries (none in chunk 0), lse' = logaddexp(lse, s) and
    o' = exp(lse - lse') o + exp(s - lse') sx; y = sigmoid(z) o' (token layout, contiguous), and
    lse' and the own state's weight exp(s - lse') each into ``(B, H L, C - 1)`` contiguous (chunks
    >= 1; in chunk 0 the weight is 1); the library's lse is read with its strides (batch, row;
    positions contiguous). Grid (B * C, H)."""
    i_bc, i_h = tl.program_id(0), tl.program_id(1)
    i_b, i_c, o_i, o_t, m_t = _chunk_rows(i_bc, C, L, T, BLOCK_L)
    o_p = tl.arange(0, BLOCK_P)
    m_p = col_mask(o_p, P, BLOCK_P)
    m = m_t[:, None] & m_p[None, :]
    o_state = ((i_b * T + o_t) * H + i_h)[:, None] * P + o_p[None, :]
    b_q = tl.load(q + i_b * stride_qb + (i_h // HPG) * P + o_t[:, None] * stride_qt + o_p[None, :], mask=m, other=0.0)
    b_k = tl.load(sk + o_state, mask=m, other=0.0)
    b_s = tl.sum(b_q.to(tl.float32) * b_k.to(tl.float32), 1) * scale
    # Chunk 0 has no summaries: -inf makes its weight exp(-inf) = 0 and the own state's 1. Rows
    # past T get a finite lse too: the library's backward reads every row of a chunk.
    o_r = (i_h * L + o_i).to(tl.int64)
    m_lib = (o_i < L) & (o_t >= L)
    b_l = tl.load(lse_lib + i_b * stride_lb + o_r * stride_lr + i_c - 1, mask=m_lib, other=float("-inf"))
    p_o = o_lib + i_b * stride_ob + o_r[:, None] * stride_or + (i_c - 1) * stride_oc + o_p[None, :]
    b_o = tl.load(p_o, mask=m_lib[:, None] & m_p[None, :], other=0.0).to(tl.float32)
    b_m = tl.maximum(b_l, b_s)
    b_w, b_own = tl.exp(b_l - b_m), tl.exp(b_s - b_m)
    b_den = b_w + b_own
    b_x = tl.load(sx + o_state, mask=m, other=0.0).to(tl.float32)
    b_y = (b_w[:, None] * b_o + b_own[:, None] * b_x) / b_den[:, None]
    if GATED:
        p_z = z + i_b * stride_zb + i_h * P + o_t[:, None] * stride_zt + o_p[None, :]
        b_y = b_y * _sigmoid(tl.load(p_z, mask=m, other=0.0).to(tl.float32))
    tl.store(y + o_state, to_store(b_y, y.dtype.element_ty, EMULATE), mask=m)
    o_lse = (i_b * (H * L) + o_r) * (C - 1) + i_c - 1
    tl.store(lse + o_lse, b_m + tl.log(b_den), mask=m_lib)
    # Saved so that the backward's preparation need not read sk: the weight is all it takes from it.
    tl.store(own_w + o_lse, b_own / b_den, mask=m_lib)


@triton.jit
def prepare_backward_kernel(
    q, sx, z, y, dy, own_w, qr, o_buf, do_buf, dz, own_c, own_p, p_cos, p_sin, T, C, L,
    stride_qb, stride_qt, stride_zb, stride_zt, stride_dzb, stride_dzt, stride_rb, stride_rr, stride_rc,
    stride_wb, stride_wr, scale,
    H: tl.constexpr, HPG: tl.constexpr, P: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_PH: tl.constexpr, GATED: tl.constexpr, EMULATE: tl.constexpr,
):  # fmt: skip
    """Everything the library backward and the recurrence's backward need, per chunk and query
    group, its H / G heads in turn: dO = dy sigmoid(z) and o = y / sigmoid(z) into the regrouped
    buffers (the library recomputes delta = rowsum(dO o) from them), dz = dy y sigmoid(-z), the
    rotated queries into qr, and the own state's factors p (the forward's weight ``own_w``, 1 in
    chunk 0) and c = scale p (dO . sx - delta) (``(B, T, H)`` fp32). y, dy ``(B, T, H, P)``
    contiguous. Grid (B * C, G)."""
    i_bc, i_g = tl.program_id(0), tl.program_id(1)
    i_b, i_c, o_i, o_t, m_t = _chunk_rows(i_bc, C, L, T, BLOCK_L)
    o_ph = tl.arange(0, BLOCK_PH)
    m_ph = col_mask(o_ph, P // 2, BLOCK_PH)
    o_p = tl.arange(0, BLOCK_P)
    m_p = col_mask(o_p, P, BLOCK_P)
    m = m_t[:, None] & m_p[None, :]
    b_q1, b_q2 = _load_halves(q + i_b * stride_qb + i_g * P, o_t * stride_qt, m_t, o_ph, m_ph, P // 2, False)
    b_cos, b_sin = _chunk_rope(p_cos, p_sin, i_c, o_ph, m_ph, P // 2)
    b_r1, b_r2 = _rotate(b_q1.to(tl.float32), b_q2.to(tl.float32), b_cos, b_sin)
    for i_hh in range(HPG):
        i_h = i_g * HPG + i_hh
        o_row = (i_b * T + o_t) * H + i_h
        o_r = (i_h * L + o_i).to(tl.int64)
        b_own = tl.load(own_w + i_b * stride_wb + o_r * stride_wr + i_c - 1, mask=m_t & (o_t >= L), other=1.0)
        o_state = o_row[:, None] * P + o_p[None, :]
        b_dy = tl.load(dy + o_state, mask=m, other=0.0).to(tl.float32)
        b_y = tl.load(y + o_state, mask=m, other=0.0).to(tl.float32)
        b_delta = tl.sum(b_dy * b_y, 1)
        if GATED:
            b_z = tl.load(z + i_b * stride_zb + i_h * P + o_t[:, None] * stride_zt + o_p[None, :], mask=m, other=0.0)
            b_sig = _sigmoid(b_z.to(tl.float32))
            p_dz = dz + i_b * stride_dzb + i_h * P + o_t[:, None] * stride_dzt + o_p[None, :]
            tl.store(p_dz, to_store(b_dy * b_y * (1.0 - b_sig), dz.dtype.element_ty, EMULATE), mask=m)
            b_do = b_dy * b_sig
            # Where sigmoid(z) underflows to 0, so do y and dO: o's value cannot matter there.
            b_o = tl.where(b_sig > 0.0, b_y / b_sig, 0.0)
        else:
            b_do, b_o = b_dy, b_y
        b_x = tl.load(sx + o_state, mask=m, other=0.0).to(tl.float32)
        tl.store(own_c + o_row, scale * b_own * (tl.sum(b_do * b_x, 1) - b_delta), mask=m_t)
        tl.store(own_p + o_row, b_own, mask=m_t)
        o_reg = i_b * stride_rb + o_r * stride_rr + i_c * stride_rc
        m_reg = (o_i < L)[:, None] & m_p[None, :]
        p_reg = o_reg[:, None] + o_p[None, :]
        tl.store(do_buf + p_reg, to_store(b_do, do_buf.dtype.element_ty, EMULATE), mask=m_reg)
        tl.store(o_buf + p_reg, to_store(b_o, o_buf.dtype.element_ty, EMULATE), mask=m_reg)
        _store_halves(qr, o_reg, o_i < L, o_ph, m_ph, b_r1, b_r2, P // 2, EMULATE)


@triton.jit
def query_grads_kernel(
    dq_lib, sk, own_c, dq, p_cos, p_sin, T, C, L, stride_lb, stride_lr, stride_lc, stride_dqb, stride_dqt,
    H: tl.constexpr, HPG: tl.constexpr, P: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_PH: tl.constexpr,
    EMULATE: tl.constexpr,
):  # fmt: skip
    """dq[b, cL + i, g] = the sum over the group's heads h of RoPE back at c of
    dq_lib[b, h L + i, c - 1] (the gradient of the rotated, regrouped queries; chunks >= 1) plus
    c_h sk_h (the own state's part; c the preparation's factor). Grid (B * C, G)."""
    i_bc, i_g = tl.program_id(0), tl.program_id(1)
    i_b, i_c, o_i, o_t, m_t = _chunk_rows(i_bc, C, L, T, BLOCK_L)
    o_ph = tl.arange(0, BLOCK_PH)
    m_ph = col_mask(o_ph, P // 2, BLOCK_PH)
    # The library's chunk c - 1 is the sequence's chunk c; chunk 0 has no summaries.
    m_lib = m_t & (o_t >= L)
    b_g1 = tl.zeros([BLOCK_L, BLOCK_PH], dtype=tl.float32)
    b_g2 = tl.zeros([BLOCK_L, BLOCK_PH], dtype=tl.float32)
    b_o1 = tl.zeros([BLOCK_L, BLOCK_PH], dtype=tl.float32)
    b_o2 = tl.zeros([BLOCK_L, BLOCK_PH], dtype=tl.float32)
    for i_hh in tl.static_range(HPG):
        i_h = i_g * HPG + i_hh
        o_r = (i_h * L + o_i).to(tl.int64) * stride_lr + i_b * stride_lb + (i_c - 1) * stride_lc
        b_1, b_2 = _load_halves(dq_lib, o_r, m_lib, o_ph, m_ph, P // 2, False)
        b_g1 += b_1.to(tl.float32)
        b_g2 += b_2.to(tl.float32)
        o_row = (i_b * T + o_t) * H + i_h
        b_k1, b_k2 = _load_halves(sk, o_row * P, m_t, o_ph, m_ph, P // 2, False)
        b_c = tl.load(own_c + o_row, mask=m_t, other=0.0)[:, None]
        b_o1 += b_c * b_k1.to(tl.float32)
        b_o2 += b_c * b_k2.to(tl.float32)
    b_cos, b_sin = _chunk_rope(p_cos, p_sin, i_c, o_ph, m_ph, P // 2)
    b_g1, b_g2 = _rotate_back(b_g1, b_g2, b_cos, b_sin)
    p_dq = dq + i_b * stride_dqb + i_g * P
    _store_halves(p_dq, o_t * stride_dqt, m_t, o_ph, m_ph, b_g1 + b_o1, b_g2 + b_o2, P // 2, EMULATE)


def _options(q: torch.Tensor, chunk_size: int) -> dict:
    """Constexprs shared by the kernels: head dim, row and half-row blocks, bf16 emulation."""
    head_dim = q.shape[-1]
    return {
        "P": head_dim,
        "BLOCK_L": max(16, triton.next_power_of_2(chunk_size)),
        "BLOCK_PH": max(16, triton.next_power_of_2(head_dim // 2)),
        "EMULATE": is_interpreted() and q.dtype == torch.bfloat16,
    }


def _summaries(sk: torch.Tensor, sx: torch.Tensor, chunk_size: int, cos: torch.Tensor, sin: torch.Tensor, opts: dict):
    """The library's keys and values ``(B, H, C - 1, P)``: states at the ends of chunks 0..C-2, keys
    rotated to their chunk index."""
    batch, length, heads, dim = sk.shape
    count = (length - 1) // chunk_size
    keys = sk.new_empty(batch, heads, count, dim)
    values = torch.empty_like(keys)
    if count:
        ends = slice(chunk_size - 1, None, chunk_size)
        src_k, src_v = sk[:, ends], sx[:, ends]
        move_summaries((src_k, src_v), (keys.transpose(1, 2), values.transpose(1, 2)), count, cos, sin, opts)
    return keys, values


def regrouped_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    chunk_size: int,
    rope_base: float,
    scale: float,
    gate: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunk attention's forward through the library kernel (same maths as
    :func:`.triton.chunk_attention_fwd`).

    Args:
        q: ``(B, T, G, P)`` queries, read in place where the last two dims are contiguous;
            k, v: ``(B, T, H, P)`` the states (contiguous); gate ``(B, T, H, P)`` or None; one dtype
            (fp16 / bf16 for cuDNN; the CPU stand-in takes fp32 too).
        chunk_size, rope_base, scale: as the reference's.

    Returns:
        ``y`` ``(B, T, H, P)`` contiguous in q's dtype and ``stats`` ``(2, B, H L, C - 1)`` fp32 in the
        regrouped layout: ``stats[0]`` the natural-log log-sum-exp of the whole softmax (what the
        backward hands the library), ``stats[1]`` the own state's weight in it.
    """
    check_device(q)
    batch, length, heads, dim = k.shape
    q, k, v = rows_contiguous(q), k.contiguous(), v.contiguous()
    z = rows_contiguous(gate) if gate is not None else q
    chunks = -(-length // chunk_size)
    y = torch.empty_like(k, dtype=q.dtype)
    stats = torch.empty(2, batch, heads * chunk_size, max(chunks - 1, 0), device=q.device, dtype=torch.float32)
    lse, own_w = stats.unbind(0)
    if y.numel() == 0:
        return y, stats
    opts = _options(q, chunk_size)
    cos, sin = _tables(length, chunk_size, dim, rope_base, q.device)
    hpg = heads // q.shape[2]
    if chunks > 1:
        qr = q.new_empty(batch, heads * chunk_size, chunks, dim)
        regroup_queries_kernel[(batch * chunks, q.shape[2])](
            q, qr, cos, sin, length, chunks, chunk_size, q.stride(0), q.stride(1), qr.stride(0), qr.stride(1),
            qr.stride(2), HPG=hpg, num_warps=WARPS["regroup"], **opts,
        )  # fmt: skip
        keys, values = _summaries(k, v, chunk_size, cos, sin, opts)
        o_lib, lse_lib = attention_with_lse(qr[:, :, 1:], keys, values, scale)
    else:
        o_lib, lse_lib = y, lse  # unread: chunk 0 has no summaries
    merge_own_state_kernel[(batch * chunks, heads)](
        q, k, v, z, o_lib, lse_lib, y, lse, own_w, length, chunks, chunk_size, q.stride(0), q.stride(1), z.stride(0),
        z.stride(1), o_lib.stride(0), o_lib.stride(1), o_lib.stride(2), lse_lib.stride(0), lse_lib.stride(1),
        scale, H=heads, HPG=hpg, BLOCK_P=max(16, triton.next_power_of_2(dim)), GATED=gate is not None,
        num_warps=WARPS["merge"], P=dim, BLOCK_L=opts["BLOCK_L"], EMULATE=opts["EMULATE"],
    )  # fmt: skip
    return y, stats


def regrouped_attention_bwd(
    dy: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    y: torch.Tensor,
    stats: torch.Tensor,
    chunk_size: int,
    rope_base: float,
    scale: float,
    gate: torch.Tensor | None = None,
    *,
    dq: torch.Tensor | None = None,
    dgate: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, StateGrads]:
    """The backward of :func:`regrouped_attention_fwd` with the states' gradients factored.

    Args:
        dy: ``(B, T, H, P)`` gradient of y; q, k, v, y, stats, gate: the forward's inputs and outputs.
        dq, dgate: where to write the gradients of q and gate (their shapes and dtypes, last two
            dims contiguous, e.g. slices of a fused projection's gradient), or None for new ones.

    Returns:
        ``(dq, dgate, state_grads)`` (dgate None without a gate), state_grads with dO regrouped.
    """
    check_device(q)
    batch, length, heads, dim = k.shape
    q, k, v = rows_contiguous(q), k.contiguous(), v.contiguous()
    y, dy = y.contiguous(), dy.contiguous()
    z = rows_contiguous(gate) if gate is not None else q
    dq = dq if dq is not None else torch.empty_like(q)
    dz = dgate if dgate is not None else (torch.empty_like(z) if gate is not None else dq)
    check_output("dq", dq, q)
    check_output("dgate", dz, z)
    chunks, full = -(-length // chunk_size), length // chunk_size
    regrouped = q.new_empty(3, batch, heads * chunk_size, chunks, dim)
    qr, o_reg, do_reg = regrouped.unbind(0)
    own_c = torch.empty(batch, length, heads, device=q.device, dtype=torch.float32)
    own_p = torch.empty_like(own_c)
    # Every row is written below (zeros where the library has no such summary), except when
    # the one chunk there is has none at all.
    zeros_or_empty = k.new_zeros if chunks == 1 else k.new_empty
    dk_sum, dv_sum = zeros_or_empty(batch, full, heads, dim), zeros_or_empty(batch, full, heads, dim)
    state_grads = StateGrads(do_reg, q, own_c, own_p, dk_sum, dv_sum, regrouped=True)
    if k.numel() == 0:
        return dq, dz if gate is not None else None, state_grads
    opts = _options(q, chunk_size)
    cos, sin = _tables(length, chunk_size, dim, rope_base, q.device)
    hpg = heads // q.shape[2]
    block_p = max(16, triton.next_power_of_2(dim))
    lse, own_w = stats.unbind(0)
    prepare_backward_kernel[(batch * chunks, q.shape[2])](
        q, v, z, y, dy, own_w, qr, o_reg, do_reg, dz, own_c, own_p, cos, sin, length, chunks, chunk_size,
        q.stride(0), q.stride(1), z.stride(0), z.stride(1), dz.stride(0), dz.stride(1), qr.stride(0), qr.stride(1),
        qr.stride(2), own_w.stride(0), own_w.stride(1), scale,
        H=heads, HPG=hpg, BLOCK_P=block_p, GATED=gate is not None, num_warps=WARPS["prepare"], **opts,
    )  # fmt: skip
    dq_lib = dq  # unread where the library has no rows: one chunk alone has no summaries
    if chunks > 1:
        keys, values = _summaries(k, v, chunk_size, cos, sin, opts)
        view = (slice(None), slice(None), slice(1, None))
        dq_lib, dk_lib, dv_lib = attention_with_lse_backward(
            do_reg[view], qr[view], keys, values, o_reg[view], lse, scale
        )
        if full:
            src = (dk_lib.transpose(1, 2), dv_lib.transpose(1, 2))
            move_summaries(src, (dk_sum, dv_sum), chunks - 1, cos, sin, opts, inverse=True)
    library_strides = (dq_lib.stride(0), dq_lib.stride(1), dq_lib.stride(2)) if chunks > 1 else (0, 0, 0)
    query_grads_kernel[(batch * chunks, q.shape[2])](
        dq_lib, k, own_c, dq, cos, sin, length, chunks, chunk_size, *library_strides, dq.stride(0), dq.stride(1),
        H=heads, HPG=hpg, num_warps=WARPS["query_grads"], **opts,
    )  # fmt: skip
    return dq, dz if gate is not None else None, state_grads
