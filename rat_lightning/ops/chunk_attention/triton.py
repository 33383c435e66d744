"""Flash-style Triton kernels for RAT's inter-chunk attention with the own-state merge.

Maths (see :mod:`.reference`): query t in chunk c = t // L attends in one softmax to the
summaries K_j = k[jL + L - 1], V_j = v[jL + L - 1] of the finished chunks j < c (RoPE at
position j on K_j, position c on q) and to its own state (score q_t . k_t unrotated, value v_t).

Queries come in G groups shared by H / G heads each (head h reads group h // (H / G)), read in
place, never repeated. An optional output gate is fused: y = sigmoid(z) * o. The backward needs
only y, never o: dO = dy * sigmoid(z), delta = rowsum(dO * o) = rowsum(dy * y) and
dz = dy * y * sigmoid(-z). q, z and their gradients take free batch / time strides, so the
slices of a fused projection (and of its one gradient buffer) are read and written in place.

Kernels (tiles in :data:`CONFIGS`):

- ``chunk_attention_fwd_kernel``: grid (query tiles, B * H). One program per block_m queries of a
  head. It rotates its queries once, starts the online softmax (fp32, base 2) from the own-state
  term, so the running max is finite from the start, then loops over tiles of block_n summaries:
  tiles below the tile's first chunk need no mask, the last one or two get the mask j < c(t).
  Writes y (gated o) and the log2-domain log-sum-exp per (b, h, t).
- ``chunk_attention_bwd_kernel_rows``: grid (query tiles, B * G), no dots. Per block_m queries
  of a query group, its heads in turn: dO (stored when gated), delta, dz, the own-state gradients
  dk_t, dv_t of every row (or, for the fused RAT op, their factors c_t, p_t in dk_t = c_t q_t,
  dv_t = p_t dO_t), the own part of the group's dq (sum over its heads of c_t k_t) and the rotated
  queries. A memory-bound pass over about 7 rows of P per token and head, apart from the dq loop
  so that its loads run at up to 4 programs per SM instead of the loop's 2.
- ``chunk_attention_bwd_kernel_dq``: grid (query tiles, B * G). Per block_m queries of a group:
  its heads in turn, each a loop over summary tiles, dq summed in registers in the rotated frame,
  rotated back once and added to the own part: no per-head dq in memory, no sum after.
- ``chunk_attention_bwd_kernel_dkv``: grid (summary tiles, B * H). Per block_n summaries: loops
  over the query tiles that see them, accumulates dK_j, dV_j on top of the own-state gradients
  of rows jL + L - 1 and overwrites those rows of dk, dv (factored: the summary terms alone, into
  (B, C, H, P)). It runs after the rows pass on the same stream, so neither atomics nor a
  scatter are needed.
- ``move_summaries_kernel``: the rotated summaries, once per call (below); the cuDNN path
  (:mod:`.regrouped`) moves its summaries and their gradients with it too.

RoPE (rotate-half: pairs i and i + P/2): every row is loaded as its two halves of P/2, so the
rotation needs no register permute and a score is the sum of two dots over P/2. Queries are
rotated in the kernels, once per program; the summaries, 1/L of k, are rotated once per call by
their own kernel into a (B, C, H, P) copy (rotating them per (query tile, summary tile) pair would
load a cos/sin tile as large as the K and V tiles together, and keeps more tiles live across the
loop); the values are read in place, row jL + L - 1 by strided addressing. Cosines and sines come
from a (positions, P/2) fp32 table built (and cached) by :func:`rat_lightning.ops.rope.rope_angles`
in fp64, so the kernels rotate with exactly the reference's constants (fp32 angles lose about
1e-3 rad at chunk index 8K). The backward rotates gradients back with the transpose rotation.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from rat_lightning.ops.layout import check_output, rows_contiguous
from rat_lightning.ops.recurrence.triton import StateGrads
from rat_lightning.ops.rope import rope_angles
from rat_lightning.ops.triton_common import col_mask, is_interpreted, to_dot, to_store

__all__ = [
    "CONFIGS", "KernelConfig", "chunk_attention_bwd", "chunk_attention_bwd_factored", "chunk_attention_fwd",
    "chunk_attention_triton",
]

# Log2(e): the kernels work in base 2 (exp2 is one instruction), with scores scaled by scale * log2(e).
_LOG2E = 1.4426950408889634


class KernelConfig(NamedTuple):
    """Launch configuration of one kernel: tile sizes (powers of two) and launch options.

    block_m: queries per tile; block_n: summaries per tile (the fwd and dq kernels loop over
    summary tiles for a query tile, the dkv kernel over query tiles for a summary tile; the rows
    pass has no summary tiles: 0).
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Per kernel, dot dtype and sequence regime. P / dS, the A operand of the second dot, puts the
# warps along its rows, so the dq kernel wants block_m >= 16 * num_warps and the dkv kernel
# block_n >= 16 * num_warps. Tiles from the H100 sweeps of ``bench/tune_chunk_attention.py``
# (docs/benchmarks/chunk_attention_tiles_h100.json): small tiles win while a query sees few
# summaries, large ones from :data:`LONG_CHUNKS` on ("_long"); the dq kernel's, which loops
# over a group's heads, from docs/benchmarks/chunk_attention_rows_h100.json. TMA loads (Hopper's
# bulk copies through descriptors, an option until 2026-11-23) lost 5-15% in the forward, tied
# in dq, and in the factored dkv kernel lost 1.5% at 128K and tied at 64K
# (docs/benchmarks/chunk_attention_tma_h100.json, dkv_tma_ab_h100.json), so they were removed;
# from 2K chunks on the RAT layer runs the attention through cuDNN anyway. With the JIT's
# alignment the bf16 tiles use at most 255 registers and spill at most 216 bytes (``bench
# kernel_report``). fp32 is the accuracy path: its IEEE dots run on FMA units, least spilled
# with small tiles. The rows pass is memory-bound: 16 rows at 4 warps keep it at 128 registers
# (4 programs per SM); 64 rows at 8 warps took 255 and ran 0.4-0.6 ms slower at 262,144 tokens.
CONFIGS = {
    "fwd": KernelConfig(64, 32, 4, 2),
    "fwd_long": KernelConfig(128, 128, 8, 3),
    "rows": KernelConfig(16, 0, 4, 1),
    "dq": KernelConfig(64, 32, 4, 3),
    "dq_long": KernelConfig(128, 64, 8, 3),
    "dkv": KernelConfig(64, 128, 8, 3),
    "dkv_long": KernelConfig(64, 128, 8, 3),
    "fwd_fp32": KernelConfig(64, 32, 4, 1),
    "rows_fp32": KernelConfig(16, 0, 4, 1),
    "dq_fp32": KernelConfig(32, 32, 4, 1),
    "dkv_fp32": KernelConfig(32, 64, 8, 1),
}
# Per kernel, the chunk count (T / L) from which its "_long" tiles are used (none for the rows pass).
LONG_CHUNKS = {"fwd": 2048, "dq": 1024, "dkv": 2048}


def _config(kernel: str, dtype: torch.dtype, chunks: int) -> KernelConfig:
    """The default tiles of ``kernel`` ("fwd", "rows", "dq" or "dkv") for this dtype and chunk count."""
    if dtype == torch.float32:
        return CONFIGS[f"{kernel}_fp32"]
    long = kernel in LONG_CHUNKS and chunks >= LONG_CHUNKS[kernel]
    return CONFIGS[f"{kernel}_long" if long else kernel]


@triton.jit
def _load_halves(p_x, o_row, m_row, o_ph, m_ph, P_HALF: tl.constexpr, TRANSPOSE: tl.constexpr):
    """Rows ``o_row`` (element offsets) of x as two halves, (rows, BLOCK_PH) or transposed."""
    if TRANSPOSE:
        p_x1 = p_x + o_row[None, :] + o_ph[:, None]
        m_x = m_row[None, :] & m_ph[:, None]
    else:
        p_x1 = p_x + o_row[:, None] + o_ph[None, :]
        m_x = m_row[:, None] & m_ph[None, :]
    return tl.load(p_x1, mask=m_x, other=0.0), tl.load(p_x1 + P_HALF, mask=m_x, other=0.0)


@triton.jit
def _store_halves(p_x, o_row, m_row, o_ph, m_ph, b_x1, b_x2, P_HALF: tl.constexpr, EMULATE: tl.constexpr):
    """Store fp32 halves (rows, BLOCK_PH) into rows ``o_row`` (element offsets) of x, in x's dtype."""
    p_x1 = p_x + o_row[:, None] + o_ph[None, :]
    m_x = m_row[:, None] & m_ph[None, :]
    tl.store(p_x1, to_store(b_x1, p_x.dtype.element_ty, EMULATE), mask=m_x)
    tl.store(p_x1 + P_HALF, to_store(b_x2, p_x.dtype.element_ty, EMULATE), mask=m_x)


@triton.jit
def _load_rope(p_cos, p_sin, o_pos, m_pos, o_ph, m_ph, P_HALF: tl.constexpr, CACHE: tl.constexpr):
    """Cosines and sines (rows, BLOCK_PH) of positions ``o_pos`` from the (positions, P/2) tables.

    CACHE: a cache modifier; a reload after a loop passes a different one than the load before
    it, or the compiler merges the two loads and keeps the tiles live across the loop.
    """
    o_x = o_pos[:, None] * P_HALF + o_ph[None, :]
    m_x = m_pos[:, None] & m_ph[None, :]
    b_cos = tl.load(p_cos + o_x, mask=m_x, other=0.0, cache_modifier=CACHE)
    return b_cos, tl.load(p_sin + o_x, mask=m_x, other=0.0, cache_modifier=CACHE)


@triton.jit
def _rotate(b_x1, b_x2, b_cos, b_sin):
    """Rotate-half RoPE on the two halves: (x1 cos - x2 sin, x2 cos + x1 sin)."""
    return b_x1 * b_cos - b_x2 * b_sin, b_x2 * b_cos + b_x1 * b_sin


@triton.jit
def _rotate_back(b_g1, b_g2, b_cos, b_sin):
    """The transpose rotation (by the negative angle): RoPE's backward."""
    return b_g1 * b_cos + b_g2 * b_sin, b_g2 * b_cos - b_g1 * b_sin


@triton.jit
def _own_terms(b_qk, b_dov, b_lse, b_delta, qk_scale):
    """Own-state term from the rowsums q . k and dO . v: (dS_own, p_own), p_own = the softmax
    weight of the own score, dS_own = p_own * (dO . v - delta), unscaled."""
    b_p = tl.exp2(b_qk * qk_scale - b_lse)
    return b_p * (b_dov - b_delta), b_p


@triton.jit
def _own_grads(b_q1, b_q2, b_k1, b_k2, b_v, b_do, b_lse, b_delta, qk_scale):
    """:func:`_own_terms` of fp32 rows (q and k in two halves)."""
    b_qk = tl.sum(b_q1 * b_k1, 1) + tl.sum(b_q2 * b_k2, 1)
    return _own_terms(b_qk, tl.sum(b_do * b_v, 1), b_lse, b_delta, qk_scale)


@triton.jit
def _load_summary_keys(kr_h, o_j, m_j, H: tl.constexpr, P: tl.constexpr, BLOCK_PH: tl.constexpr,
                       TRANSPOSE: tl.constexpr):
    """Rotated summaries K_j (j in o_j) as two halves (BLOCK_N, BLOCK_PH), or transposed, from
    this (batch, head)'s column of kr (B, C, H, P)."""
    o_ph = tl.arange(0, BLOCK_PH)
    m_ph = col_mask(o_ph, P // 2, BLOCK_PH)
    return _load_halves(kr_h, o_j.to(tl.int64) * H * P, m_j, o_ph, m_ph, P // 2, TRANSPOSE)


@triton.jit
def _summary_value_rows(o_j, o_bt, L, H: tl.constexpr, P: tl.constexpr):
    """Element offsets of the values V_j = v[jL + L - 1] of summaries o_j in this head's column of
    v (B, T, H, P)."""
    return (o_bt + o_j * L + L - 1) * H * P


@triton.jit
def _load_summary_values(v_h, o_j, m_j, o_bt, L, H: tl.constexpr, P: tl.constexpr, BLOCK_P: tl.constexpr):
    """Values V_j (BLOCK_N, BLOCK_P) of summaries o_j: a strided gather (:func:`_summary_value_rows`)."""
    o_p = tl.arange(0, BLOCK_P)
    o_vrow = _summary_value_rows(o_j, o_bt, L, H, P)
    m_v = m_j[:, None] & col_mask(o_p, P, BLOCK_P)[None, :]
    return tl.load(v_h + o_vrow[:, None] + o_p[None, :], mask=m_v, other=0.0)


@triton.jit
def _summary_columns(kr, v, i_b, i_h, C, H: tl.constexpr, P: tl.constexpr):
    """Pointers to one (batch, head)'s column of the rotated summaries kr (B, C, H, P) and of v
    (B, T, H, P), for :func:`_load_summary_keys` and :func:`_load_summary_values`."""
    return kr + i_b.to(tl.int64) * C * H * P + i_h * P, v + i_h * P


@triton.jit
def _fwd_inner(
    b_m,
    b_l,
    b_acc,
    b_qr1,
    b_qr2,
    o_c,
    kr_h,
    v_h,
    o_bt,
    j_lo,
    j_hi,
    n_keys,
    L,
    qk_scale,
    H: tl.constexpr,
    P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_PH: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    EMULATE: tl.constexpr,
    DTYPE: tl.constexpr,
):
    """Online softmax over summary tiles [j_lo, j_hi); CAUSAL masks keys j >= c(t).

    kr_h, v_h: this (batch, head)'s columns of the rotated summaries and values (:func:`_summary_columns`).
    """
    for j0 in range(j_lo, j_hi, BLOCK_N):
        o_j = j0 + tl.arange(0, BLOCK_N)
        m_j = o_j < n_keys
        # Rotated summaries transposed (BLOCK_PH, BLOCK_N), so the score is a plain q @ k^T.
        b_krt1, b_krt2 = _load_summary_keys(kr_h, o_j, m_j, H, P, BLOCK_PH, True)
        b_s = tl.dot(b_qr1, to_dot(b_krt1, DTYPE, EMULATE), input_precision=DOT_PRECISION)
        b_s = tl.dot(b_qr2, to_dot(b_krt2, DTYPE, EMULATE), b_s, input_precision=DOT_PRECISION)
        b_s = b_s * qk_scale
        if CAUSAL:
            b_s = tl.where(o_j[None, :] < o_c[:, None], b_s, float("-inf"))
        # b_m starts at the own score, so it is finite and masked entries give exp2(-inf) = 0.
        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
        b_alpha = tl.exp2(b_m - b_m_new)
        b_p = tl.exp2(b_s - b_m_new[:, None])
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        # V_j is row jL + L - 1 of v (B, T, H, P), gathered in place by strided addressing.
        b_v = _load_summary_values(v_h, o_j, m_j, o_bt, L, H, P, BLOCK_P)
        b_acc = b_acc * b_alpha[:, None]
        b_acc = tl.dot(
            to_dot(b_p, DTYPE, EMULATE), to_dot(b_v, DTYPE, EMULATE), b_acc, input_precision=DOT_PRECISION
        )
        b_m = b_m_new
    return b_m, b_l, b_acc


@triton.jit
def _sigmoid(b_x):
    """fp32 sigmoid; sigmoid(-x) gives 1 - sigmoid(x) without the cancellation near 1."""
    return 1.0 / (1.0 + tl.exp(-b_x))


@triton.jit
def chunk_attention_fwd_kernel(
    q,
    k,
    v,
    kr,
    z,
    y,
    lse,
    p_cos,
    p_sin,
    T,
    C,
    L,
    stride_qb,
    stride_qt,
    stride_zb,
    stride_zt,
    qk_scale,
    H: tl.constexpr,
    HPG: tl.constexpr,
    P: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_PH: tl.constexpr,
    GATED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    EMULATE: tl.constexpr,
):
    """Forward: y = o (times sigmoid(z) if GATED), (B, T, H, P) in q's dtype, and lse (B, H, T) fp32
    (log2 domain, scaled scores).

    Grid: (cdiv(T, BLOCK_M), B * H). k, v contiguous (B, T, H, P); q (B, T, G, P) with G = H / HPG
    query groups (head h reads group h // HPG) and z (B, T, H, P), each with its last two dims
    contiguous and batch / time strides given; kr the (B, C, H, P) rotated summaries; p_cos, p_sin
    the (positions, P/2) fp32 RoPE tables; C = T // L finished chunks; qk_scale = scale * log2(e).
    """
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    DTYPE = q.dtype.element_ty
    o_t = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_t = o_t < T
    o_p = tl.arange(0, BLOCK_P)
    o_ph = tl.arange(0, BLOCK_PH)
    m_p = col_mask(o_p, P, BLOCK_P)
    m_ph = col_mask(o_ph, P // 2, BLOCK_PH)
    # int64: (b * T + t) * H * P passes 2^31 at a few billion elements.
    o_bt = i_b.to(tl.int64) * T
    o_row = ((o_bt + o_t) * H + i_h) * P
    o_qrow = i_b.to(tl.int64) * stride_qb + o_t.to(tl.int64) * stride_qt + (i_h // HPG) * P
    m_tp = m_t[:, None] & m_p[None, :]

    b_q1, b_q2 = _load_halves(q, o_qrow, m_t, o_ph, m_ph, P // 2, False)
    b_k1, b_k2 = _load_halves(k, o_row, m_t, o_ph, m_ph, P // 2, False)
    b_q1, b_q2 = b_q1.to(tl.float32), b_q2.to(tl.float32)
    # Own state first: q_t . k_t unrotated (the equal rotations cancel), value v_t.
    b_m = (tl.sum(b_q1 * b_k1.to(tl.float32), 1) + tl.sum(b_q2 * b_k2.to(tl.float32), 1)) * qk_scale
    b_l = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    b_acc = tl.load(v + o_row[:, None] + o_p[None, :], mask=m_tp, other=0.0).to(tl.float32)

    o_c = o_t // L
    b_cos, b_sin = _load_rope(p_cos, p_sin, o_c, m_t, o_ph, m_ph, P // 2, "")
    b_qr1, b_qr2 = _rotate(b_q1, b_q2, b_cos, b_sin)
    b_qr1 = to_dot(b_qr1, DTYPE, EMULATE)
    b_qr2 = to_dot(b_qr2, DTYPE, EMULATE)

    # Every row sees j < c_first; some row sees j < n_keys (the chunk of the tile's last row).
    c_first = (i_m * BLOCK_M) // L
    n_keys = tl.minimum((tl.minimum(i_m * BLOCK_M + BLOCK_M, T) - 1) // L, C)
    j_mid = (c_first // BLOCK_N) * BLOCK_N
    kr_h, v_h = _summary_columns(kr, v, i_b, i_h, C, H, P)
    b_m, b_l, b_acc = _fwd_inner(
        b_m, b_l, b_acc, b_qr1, b_qr2, o_c, kr_h, v_h, o_bt, 0, j_mid, n_keys, L, qk_scale,
        H, P, BLOCK_N, BLOCK_P, BLOCK_PH, False, DOT_PRECISION, EMULATE, DTYPE,
    )  # fmt: skip
    b_m, b_l, b_acc = _fwd_inner(
        b_m, b_l, b_acc, b_qr1, b_qr2, o_c, kr_h, v_h, o_bt, j_mid, n_keys, n_keys, L, qk_scale,
        H, P, BLOCK_N, BLOCK_P, BLOCK_PH, True, DOT_PRECISION, EMULATE, DTYPE,
    )  # fmt: skip

    b_y = b_acc / b_l[:, None]
    if GATED:
        o_zrow = i_b.to(tl.int64) * stride_zb + o_t.to(tl.int64) * stride_zt + i_h * P
        b_z = tl.load(z + o_zrow[:, None] + o_p[None, :], mask=m_tp, other=0.0).to(tl.float32)
        b_y = b_y * _sigmoid(b_z)
    tl.store(y + o_row[:, None] + o_p[None, :], to_store(b_y, y.dtype.element_ty, EMULATE), mask=m_tp)
    tl.store(lse + i_bh.to(tl.int64) * T + o_t, b_m + tl.log2(b_l), mask=m_t)


@triton.jit
def _rows_half(dy, y, z, k, v, do, dz, o_row, o_zrow, o_dzrow, o_col, m, GATED: tl.constexpr, EMULATE: tl.constexpr):
    """One head's query-side rows over columns ``o_col`` (one half of P); mask m (rows, cols).

    Stores dO = dy * sigmoid(z) and dz = dy * y * sigmoid(-z) when GATED. Returns fp32 dO, k and
    the partial rowsums of dy * y (delta) and dO * v.
    """
    b_dy = tl.load(dy + o_row[:, None] + o_col[None, :], mask=m, other=0.0).to(tl.float32)
    b_y = tl.load(y + o_row[:, None] + o_col[None, :], mask=m, other=0.0).to(tl.float32)
    b_delta = tl.sum(b_dy * b_y, 1)
    if GATED:
        b_z = tl.load(z + o_zrow[:, None] + o_col[None, :], mask=m, other=0.0).to(tl.float32)
        b_dz = b_dy * b_y * _sigmoid(-b_z)
        tl.store(dz + o_dzrow[:, None] + o_col[None, :], to_store(b_dz, dz.dtype.element_ty, EMULATE), mask=m)
        b_do = b_dy * _sigmoid(b_z)
        tl.store(do + o_row[:, None] + o_col[None, :], to_store(b_do, do.dtype.element_ty, EMULATE), mask=m)
    else:
        b_do = b_dy
    b_v = tl.load(v + o_row[:, None] + o_col[None, :], mask=m, other=0.0).to(tl.float32)
    b_k = tl.load(k + o_row[:, None] + o_col[None, :], mask=m, other=0.0).to(tl.float32)
    return b_do, b_k, b_delta, tl.sum(b_do * b_v, 1)


@triton.jit
def _bwd_dq_inner(
    b_dqr1,
    b_dqr2,
    b_qr1,
    b_qr2,
    b_do1,
    b_do2,
    b_lse,
    b_delta,
    o_c,
    kr_h,
    v_h,
    o_bt,
    j_lo,
    j_hi,
    n_keys,
    L,
    qk_scale,
    H: tl.constexpr,
    P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_PH: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    EMULATE: tl.constexpr,
    DTYPE: tl.constexpr,
):
    """Accumulate dS @ K_rot over summary tiles [j_lo, j_hi) (unscaled, rotated frame); kr_h, v_h as in
    :func:`_fwd_inner`; dO in two halves of P, as dot operands."""
    o_ph = tl.arange(0, BLOCK_PH)
    m_ph = col_mask(o_ph, P // 2, BLOCK_PH)
    for j0 in range(j_lo, j_hi, BLOCK_N):
        o_j = j0 + tl.arange(0, BLOCK_N)
        m_j = o_j < n_keys
        b_kr1, b_kr2 = _load_summary_keys(kr_h, o_j, m_j, H, P, BLOCK_PH, False)
        b_kr1 = to_dot(b_kr1, DTYPE, EMULATE)
        b_kr2 = to_dot(b_kr2, DTYPE, EMULATE)
        b_s = tl.dot(b_qr1, tl.trans(b_kr1), input_precision=DOT_PRECISION)
        b_s = tl.dot(b_qr2, tl.trans(b_kr2), b_s, input_precision=DOT_PRECISION)
        b_s = b_s * qk_scale
        if CAUSAL:
            b_s = tl.where(o_j[None, :] < o_c[:, None], b_s, float("-inf"))
        b_p = tl.exp2(b_s - b_lse[:, None])
        b_v1, b_v2 = _load_halves(v_h, _summary_value_rows(o_j, o_bt, L, H, P), m_j, o_ph, m_ph, P // 2, False)
        b_dp = tl.dot(b_do1, tl.trans(to_dot(b_v1, DTYPE, EMULATE)), input_precision=DOT_PRECISION)
        b_dp = tl.dot(b_do2, tl.trans(to_dot(b_v2, DTYPE, EMULATE)), b_dp, input_precision=DOT_PRECISION)
        b_ds = to_dot(b_p * (b_dp - b_delta[:, None]), DTYPE, EMULATE)
        b_dqr1 = tl.dot(b_ds, b_kr1, b_dqr1, input_precision=DOT_PRECISION)
        b_dqr2 = tl.dot(b_ds, b_kr2, b_dqr2, input_precision=DOT_PRECISION)
    return b_dqr1, b_dqr2


@triton.jit
def chunk_attention_bwd_kernel_rows(
    q,
    k,
    v,
    z,
    y,
    dy,
    lse,
    delta,
    qr,
    do,
    dq_own,
    dk,
    dv,
    dz,
    p_cos,
    p_sin,
    T,
    L,
    stride_qb,
    stride_qt,
    stride_zb,
    stride_zt,
    stride_dzb,
    stride_dzt,
    scale,
    qk_scale,
    H: tl.constexpr,
    HPG: tl.constexpr,
    P: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_PH: tl.constexpr,
    GATED: tl.constexpr,
    FACTORED: tl.constexpr,
    EMULATE: tl.constexpr,
):
    """Backward, query side, row by row (no dots): per block_m queries of a group, its heads in turn.

    Grid: (cdiv(T, BLOCK_M), B * G). Per head: dO = dy * sigmoid(z) (dy if not GATED), stored in
    ``do`` when GATED; delta = rowsum(dO * O) = rowsum(dy * y) (B, H, T) fp32; dz = dy * y *
    sigmoid(-z); the own-state gradients dk_t, dv_t of every row (rows jL + L - 1 are overwritten
    afterwards by ``chunk_attention_bwd_kernel_dkv``), or with FACTORED their factors, c_t and p_t
    in dk_t = c_t q_t, dv_t = p_t dO_t, into ``dk``, ``dv`` (B, T, H) fp32. Per group: the own-state
    part of dq, sum over its heads of c_t k_t, into ``dq_own`` (B, T, G, P) fp32, and the rotated
    queries qr (B, T, G, P) in q's dtype. q, z, dz take batch / time strides; the rest is contiguous.
    A memory-bound pass: it runs apart from the dq loop so that its loads are not limited to the
    few programs per SM that the loop's registers allow.
    """
    i_m, i_bg = tl.program_id(0), tl.program_id(1)
    G = H // HPG
    i_b, i_g = i_bg // G, i_bg % G
    o_t = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_t = o_t < T
    o_ph = tl.arange(0, BLOCK_PH)
    m_ph = col_mask(o_ph, P // 2, BLOCK_PH)
    m_tph = m_t[:, None] & m_ph[None, :]
    o_bt = i_b.to(tl.int64) * T
    o_qrow = i_b.to(tl.int64) * stride_qb + o_t.to(tl.int64) * stride_qt + i_g * P
    b_q1, b_q2 = _load_halves(q, o_qrow, m_t, o_ph, m_ph, P // 2, False)
    b_q1, b_q2 = b_q1.to(tl.float32), b_q2.to(tl.float32)
    b_dq1 = tl.zeros([BLOCK_M, BLOCK_PH], dtype=tl.float32)
    b_dq2 = tl.zeros([BLOCK_M, BLOCK_PH], dtype=tl.float32)
    for i_hg in range(HPG):
        i_h = i_g * HPG + i_hg
        o_row = ((o_bt + o_t) * H + i_h) * P
        o_zrow = i_b.to(tl.int64) * stride_zb + o_t.to(tl.int64) * stride_zt + i_h * P
        o_dzrow = i_b.to(tl.int64) * stride_dzb + o_t.to(tl.int64) * stride_dzt + i_h * P
        b_do1, b_k1, b_delta, b_dov = _rows_half(
            dy, y, z, k, v, do, dz, o_row, o_zrow, o_dzrow, o_ph, m_tph, GATED, EMULATE
        )
        b_do2, b_k2, b_delta2, b_dov2 = _rows_half(
            dy, y, z, k, v, do, dz, o_row, o_zrow, o_dzrow, o_ph + P // 2, m_tph, GATED, EMULATE
        )
        b_delta += b_delta2
        o_lse = (i_b.to(tl.int64) * H + i_h) * T + o_t
        tl.store(delta + o_lse, b_delta, mask=m_t)
        b_lse = tl.load(lse + o_lse, mask=m_t, other=0.0)
        b_qk = tl.sum(b_q1 * b_k1, 1) + tl.sum(b_q2 * b_k2, 1)
        b_ds_own, b_p_own = _own_terms(b_qk, b_dov + b_dov2, b_lse, b_delta, qk_scale)
        if FACTORED:
            # dk_t = c_t q_t and dv_t = p_t dO_t: two numbers per row instead of two rows.
            o_own = (o_bt + o_t) * H + i_h
            tl.store(dk + o_own, b_ds_own * scale, mask=m_t)
            tl.store(dv + o_own, b_p_own, mask=m_t)
        else:
            _store_halves(dk, o_row, m_t, o_ph, m_ph, b_ds_own[:, None] * b_q1 * scale,
                          b_ds_own[:, None] * b_q2 * scale, P // 2, EMULATE)  # fmt: skip
            _store_halves(dv, o_row, m_t, o_ph, m_ph, b_p_own[:, None] * b_do1, b_p_own[:, None] * b_do2,
                          P // 2, EMULATE)  # fmt: skip
        b_dq1 += b_ds_own[:, None] * b_k1
        b_dq2 += b_ds_own[:, None] * b_k2
    o_grow = ((o_bt + o_t) * G + i_g) * P
    _store_halves(dq_own, o_grow, m_t, o_ph, m_ph, b_dq1 * scale, b_dq2 * scale, P // 2, EMULATE)
    b_cos, b_sin = _load_rope(p_cos, p_sin, o_t // L, m_t, o_ph, m_ph, P // 2, "")
    b_qr1, b_qr2 = _rotate(b_q1, b_q2, b_cos, b_sin)
    _store_halves(qr, o_grow, m_t, o_ph, m_ph, b_qr1, b_qr2, P // 2, EMULATE)


@triton.jit
def chunk_attention_bwd_kernel_dq(
    kr,
    v,
    qr,
    do,
    lse,
    delta,
    dq_own,
    dq,
    p_cos,
    p_sin,
    T,
    C,
    L,
    stride_dqb,
    stride_dqt,
    scale,
    qk_scale,
    H: tl.constexpr,
    HPG: tl.constexpr,
    P: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_PH: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    EMULATE: tl.constexpr,
):
    """Backward, query side: dq of block_m queries of a group, summed over its heads in registers.

    Grid: (cdiv(T, BLOCK_M), B * G). dq (B, T, G, P) in qr's dtype = scale * (its heads' dS @ K
    rotated back) + dq_own, from the rotated queries qr, dO (``do``), delta and dq_own of
    ``chunk_attention_bwd_kernel_rows``; dq takes batch / time strides (a slice of a fused
    projection's gradient), the rest is contiguous.
    """
    i_m, i_bg = tl.program_id(0), tl.program_id(1)
    G = H // HPG
    i_b, i_g = i_bg // G, i_bg % G
    DTYPE = qr.dtype.element_ty
    o_t = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_t = o_t < T
    o_ph = tl.arange(0, BLOCK_PH)
    m_ph = col_mask(o_ph, P // 2, BLOCK_PH)
    o_bt = i_b.to(tl.int64) * T
    o_grow = ((o_bt + o_t) * G + i_g) * P
    b_qr1, b_qr2 = _load_halves(qr, o_grow, m_t, o_ph, m_ph, P // 2, False)
    b_qr1 = to_dot(b_qr1, DTYPE, EMULATE)
    b_qr2 = to_dot(b_qr2, DTYPE, EMULATE)
    o_c = o_t // L
    c_first = (i_m * BLOCK_M) // L
    n_keys = tl.minimum((tl.minimum(i_m * BLOCK_M + BLOCK_M, T) - 1) // L, C)
    j_mid = (c_first // BLOCK_N) * BLOCK_N
    b_dqr1 = tl.zeros([BLOCK_M, BLOCK_PH], dtype=tl.float32)
    b_dqr2 = tl.zeros([BLOCK_M, BLOCK_PH], dtype=tl.float32)
    # One head after the other: the group's dq stays in registers, rotated back once at the end.
    for i_hg in range(HPG):
        i_h = i_g * HPG + i_hg
        b_do1, b_do2 = _load_halves(do, ((o_bt + o_t) * H + i_h) * P, m_t, o_ph, m_ph, P // 2, False)
        b_do1 = to_dot(b_do1, DTYPE, EMULATE)
        b_do2 = to_dot(b_do2, DTYPE, EMULATE)
        o_lse = (i_b.to(tl.int64) * H + i_h) * T + o_t
        b_lse = tl.load(lse + o_lse, mask=m_t, other=0.0)
        b_delta = tl.load(delta + o_lse, mask=m_t, other=0.0)
        kr_h, v_h = _summary_columns(kr, v, i_b, i_h, C, H, P)
        b_dqr1, b_dqr2 = _bwd_dq_inner(
            b_dqr1, b_dqr2, b_qr1, b_qr2, b_do1, b_do2, b_lse, b_delta, o_c, kr_h, v_h, o_bt, 0, j_mid, n_keys,
            L, qk_scale, H, P, BLOCK_N, BLOCK_PH, False, DOT_PRECISION, EMULATE, DTYPE,
        )  # fmt: skip
        b_dqr1, b_dqr2 = _bwd_dq_inner(
            b_dqr1, b_dqr2, b_qr1, b_qr2, b_do1, b_do2, b_lse, b_delta, o_c, kr_h, v_h, o_bt, j_mid, n_keys, n_keys,
            L, qk_scale, H, P, BLOCK_N, BLOCK_PH, True, DOT_PRECISION, EMULATE, DTYPE,
        )  # fmt: skip
    b_cos, b_sin = _load_rope(p_cos, p_sin, o_c, m_t, o_ph, m_ph, P // 2, "")
    b_dq1, b_dq2 = _rotate_back(b_dqr1, b_dqr2, b_cos, b_sin)
    b_own1, b_own2 = _load_halves(dq_own, o_grow, m_t, o_ph, m_ph, P // 2, False)
    o_dqrow = i_b.to(tl.int64) * stride_dqb + o_t.to(tl.int64) * stride_dqt + i_g * P
    _store_halves(dq, o_dqrow, m_t, o_ph, m_ph, b_dq1 * scale + b_own1, b_dq2 * scale + b_own2, P // 2, EMULATE)


@triton.jit
def _bwd_dkv_inner(
    b_dkr1,
    b_dkr2,
    b_dv,
    b_kr1,
    b_kr2,
    b_v,
    o_j,
    qr_g,
    do_h,
    lse,
    delta,
    o_bt,
    o_bht,
    t_lo,
    t_hi,
    T,
    L,
    qk_scale,
    H: tl.constexpr,
    G: tl.constexpr,
    P: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_PH: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    EMULATE: tl.constexpr,
    DTYPE: tl.constexpr,
):
    """Accumulate dK_rot (unscaled) and dV of a summary tile over query tiles from t_lo to t_hi.

    qr_g, do_h: pointers to this (batch, group)'s column of the rotated queries and this (batch,
    head)'s of dO.
    """
    o_p = tl.arange(0, BLOCK_P)
    o_ph = tl.arange(0, BLOCK_PH)
    m_p = col_mask(o_p, P, BLOCK_P)
    m_ph = col_mask(o_ph, P // 2, BLOCK_PH)
    for t0 in range(t_lo, t_hi, BLOCK_M):
        o_t = t0 + tl.arange(0, BLOCK_M)
        m_t = o_t < T
        # Rotated queries (B, T, G, P) transposed (BLOCK_PH, BLOCK_M): scores come out key-major.
        b_qrt1, b_qrt2 = _load_halves(qr_g, (o_bt + o_t) * G * P, m_t, o_ph, m_ph, P // 2, True)
        o_dorow = (o_bt + o_t) * H * P
        b_do = tl.load(do_h + o_dorow[:, None] + o_p[None, :], mask=m_t[:, None] & m_p[None, :], other=0.0)
        b_qrt1 = to_dot(b_qrt1, DTYPE, EMULATE)
        b_qrt2 = to_dot(b_qrt2, DTYPE, EMULATE)
        b_do = to_dot(b_do, DTYPE, EMULATE)
        # lse = +inf past T: p = 0 there, so rows past the end add nothing.
        b_lse = tl.load(lse + o_bht + o_t, mask=m_t, other=float("inf"))
        b_delta = tl.load(delta + o_bht + o_t, mask=m_t, other=0.0)
        b_st = tl.dot(b_kr1, b_qrt1, input_precision=DOT_PRECISION)
        b_st = tl.dot(b_kr2, b_qrt2, b_st, input_precision=DOT_PRECISION)
        b_st = b_st * qk_scale
        if CAUSAL:
            b_st = tl.where(o_j[:, None] < (o_t // L)[None, :], b_st, float("-inf"))
        b_pt = tl.exp2(b_st - b_lse[None, :])
        b_dv = tl.dot(to_dot(b_pt, DTYPE, EMULATE), b_do, b_dv, input_precision=DOT_PRECISION)
        b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=DOT_PRECISION)
        b_dst = to_dot(b_pt * (b_dpt - b_delta[None, :]), DTYPE, EMULATE)
        b_dkr1 = tl.dot(b_dst, tl.trans(b_qrt1), b_dkr1, input_precision=DOT_PRECISION)
        b_dkr2 = tl.dot(b_dst, tl.trans(b_qrt2), b_dkr2, input_precision=DOT_PRECISION)
    return b_dkr1, b_dkr2, b_dv


@triton.jit
def chunk_attention_bwd_kernel_dkv(
    q,
    k,
    v,
    kr,
    qr,
    do,
    lse,
    delta,
    dk,
    dv,
    p_cos,
    p_sin,
    T,
    C,
    L,
    stride_qb,
    stride_qt,
    scale,
    qk_scale,
    H: tl.constexpr,
    HPG: tl.constexpr,
    P: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_PH: tl.constexpr,
    FACTORED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    EMULATE: tl.constexpr,
):
    """Backward, summary side: rows jL + L - 1 of dk, dv (B, T, H, P) = own-state + summary
    gradients; with FACTORED the summary gradients alone, into dk, dv (B, C, H, P).

    Grid: (cdiv(C, BLOCK_N), B * H); needs delta, qr and dO (``do``: dy when ungated) from
    ``chunk_attention_bwd_kernel_rows``.
    """
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    G = H // HPG
    i_g = i_h // HPG
    DTYPE = k.dtype.element_ty
    o_j = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_j = o_j < C
    o_p = tl.arange(0, BLOCK_P)
    o_ph = tl.arange(0, BLOCK_PH)
    m_p = col_mask(o_p, P, BLOCK_P)
    m_ph = col_mask(o_ph, P // 2, BLOCK_PH)
    o_bt = i_b.to(tl.int64) * T
    o_bht = i_bh.to(tl.int64) * T
    o_r = o_j * L + L - 1
    o_krow = ((o_bt + o_r) * H + i_h) * P
    m_jp = m_j[:, None] & m_p[None, :]
    m_jph = m_j[:, None] & m_ph[None, :]

    b_v = tl.load(v + o_krow[:, None] + o_p[None, :], mask=m_jp, other=0.0)
    if FACTORED:
        # The own-state terms stay with the rows (as factors, from the rows pass).
        b_dv = tl.zeros([BLOCK_N, BLOCK_P], dtype=tl.float32)
        b_dkr1 = tl.zeros([BLOCK_N, BLOCK_PH], dtype=tl.float32)
        b_dkr2 = tl.zeros([BLOCK_N, BLOCK_PH], dtype=tl.float32)
    else:
        # Row jL + L - 1 is also its own query's own state: its term seeds the accumulators (dk in
        # the rotated frame, like the summary term), so the raw rows need not stay live across the loop.
        o_qrow = i_b.to(tl.int64) * stride_qb + o_r.to(tl.int64) * stride_qt + i_g * P
        b_q1, b_q2 = _load_halves(q, o_qrow, m_j, o_ph, m_ph, P // 2, False)
        b_k1, b_k2 = _load_halves(k, o_krow, m_j, o_ph, m_ph, P // 2, False)
        b_q1, b_q2 = b_q1.to(tl.float32), b_q2.to(tl.float32)
        b_do = tl.load(do + o_krow[:, None] + o_p[None, :], mask=m_jp, other=0.0).to(tl.float32)
        b_lse = tl.load(lse + o_bht + o_r, mask=m_j, other=0.0)
        b_delta = tl.load(delta + o_bht + o_r, mask=m_j, other=0.0)
        b_ds_own, b_p_own = _own_grads(
            b_q1, b_q2, b_k1.to(tl.float32), b_k2.to(tl.float32), b_v.to(tl.float32), b_do, b_lse, b_delta, qk_scale
        )
        b_dv = b_p_own[:, None] * b_do
        b_cos, b_sin = _load_rope(p_cos, p_sin, o_j, m_j, o_ph, m_ph, P // 2, "")
        b_dkr1, b_dkr2 = _rotate(b_ds_own[:, None] * b_q1, b_ds_own[:, None] * b_q2, b_cos, b_sin)
    o_kr = ((i_b.to(tl.int64) * C + o_j) * H + i_h) * P
    b_kr1, b_kr2 = _load_halves(kr, o_kr, m_j, o_ph, m_ph, P // 2, False)
    b_kr1 = to_dot(b_kr1, DTYPE, EMULATE)
    b_kr2 = to_dot(b_kr2, DTYPE, EMULATE)
    b_v = to_dot(b_v, DTYPE, EMULATE)

    # Queries that see key j: t >= (j + 1) L. Rows from (j0 + BLOCK_N) L on see the whole tile.
    t_lo = (i_n * BLOCK_N + 1) * L
    t_full = tl.minimum((i_n * BLOCK_N + BLOCK_N) * L, T)
    t_mid = t_lo + tl.cdiv(t_full - t_lo, BLOCK_M) * BLOCK_M
    qr_g, do_h = qr + i_g * P, do + i_h * P
    b_dkr1, b_dkr2, b_dv = _bwd_dkv_inner(
        b_dkr1, b_dkr2, b_dv, b_kr1, b_kr2, b_v, o_j, qr_g, do_h, lse, delta, o_bt, o_bht, t_lo, t_mid, T, L,
        qk_scale, H, G, P, BLOCK_M, BLOCK_P, BLOCK_PH, True, DOT_PRECISION, EMULATE, DTYPE,
    )  # fmt: skip
    b_dkr1, b_dkr2, b_dv = _bwd_dkv_inner(
        b_dkr1, b_dkr2, b_dv, b_kr1, b_kr2, b_v, o_j, qr_g, do_h, lse, delta, o_bt, o_bht, t_mid, T, T, L,
        qk_scale, H, G, P, BLOCK_M, BLOCK_P, BLOCK_PH, False, DOT_PRECISION, EMULATE, DTYPE,
    )  # fmt: skip
    b_cos, b_sin = _load_rope(p_cos, p_sin, o_j, m_j, o_ph, m_ph, P // 2, ".cg")
    b_dk1, b_dk2 = _rotate_back(b_dkr1, b_dkr2, b_cos, b_sin)
    o_out = o_kr if FACTORED else o_krow
    p_dk1 = dk + o_out[:, None] + o_ph[None, :]
    tl.store(p_dk1, to_store(b_dk1 * scale, dk.dtype.element_ty, EMULATE), mask=m_jph)
    tl.store(p_dk1 + P // 2, to_store(b_dk2 * scale, dk.dtype.element_ty, EMULATE), mask=m_jph)
    tl.store(dv + o_out[:, None] + o_p[None, :], to_store(b_dv, dv.dtype.element_ty, EMULATE), mask=m_jp)


@functools.lru_cache(maxsize=16)
def _rope_tables(positions: int, head_dim: int, base: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, P/2) fp32 cos and sin of the chunk indices 0 .. positions - 1.

    Cached: built from a dozen tiny fp64 kernels, and every forward and backward of every layer
    asks for the same table. The kernels only read it.
    """
    cos, sin = rope_angles(torch.arange(positions, device=device), head_dim, base, torch.float32)
    half = head_dim // 2
    return cos[:, :half].contiguous(), sin[:, :half].contiguous()


def _tables(length: int, chunk_size: int, head_dim: int, base: float, device: torch.device):
    """The RoPE tables of every chunk index in a sequence of ``length`` (:func:`_rope_tables`)."""
    return _rope_tables((length - 1) // chunk_size + 1, head_dim, float(base), device)


@triton.jit
def move_summaries_kernel(
    src_k, src_v, dst_k, dst_v, p_cos, p_sin, ROWS, NJ, NJ_SRC,
    s_sb, s_sj, s_sh, s_db, s_dj, s_dh,
    P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_PH: tl.constexpr, INVERSE: tl.constexpr, HAS_V: tl.constexpr,
    EMULATE: tl.constexpr,
):  # fmt: skip
    """dst_k[b, j, h] = src_k[b, j, h] rotated by +j (INVERSE: by -j), fp32 math, stored in dst_k's
    dtype; with HAS_V also dst_v[b, j, h] = src_v[b, j, h]. Zeros for j >= NJ_SRC. Rows b * NJ + j;
    element strides (batch, j, head) per side, rows contiguous. Grid (cdiv(ROWS, BLOCK_R), H)."""
    i_r, i_h = tl.program_id(0), tl.program_id(1)
    o_r = i_r * BLOCK_R + tl.arange(0, BLOCK_R)
    m_r = o_r < ROWS
    o_b, o_j = (o_r // NJ).to(tl.int64), o_r % NJ
    m_src = m_r & (o_j < NJ_SRC)
    o_ph = tl.arange(0, BLOCK_PH)
    m_ph = col_mask(o_ph, P // 2, BLOCK_PH)
    o_src = o_b * s_sb + o_j.to(tl.int64) * s_sj + i_h * s_sh
    o_dst = (o_b * s_db + o_j.to(tl.int64) * s_dj + i_h * s_dh)[:, None] + o_ph[None, :]
    m_dst = m_r[:, None] & m_ph[None, :]
    b_k1, b_k2 = _load_halves(src_k, o_src, m_src, o_ph, m_ph, P // 2, False)
    b_cos, b_sin = _load_rope(p_cos, p_sin, o_j, m_src, o_ph, m_ph, P // 2, "")
    if INVERSE:
        b_r1, b_r2 = _rotate_back(b_k1.to(tl.float32), b_k2.to(tl.float32), b_cos, b_sin)
    else:
        b_r1, b_r2 = _rotate(b_k1.to(tl.float32), b_k2.to(tl.float32), b_cos, b_sin)
    tl.store(dst_k + o_dst, to_store(b_r1, dst_k.dtype.element_ty, EMULATE), mask=m_dst)
    tl.store(dst_k + o_dst + P // 2, to_store(b_r2, dst_k.dtype.element_ty, EMULATE), mask=m_dst)
    if HAS_V:
        b_v1, b_v2 = _load_halves(src_v, o_src, m_src, o_ph, m_ph, P // 2, False)
        tl.store(dst_v + o_dst, to_store(b_v1.to(tl.float32), dst_v.dtype.element_ty, EMULATE), mask=m_dst)
        tl.store(dst_v + o_dst + P // 2, to_store(b_v2.to(tl.float32), dst_v.dtype.element_ty, EMULATE), mask=m_dst)


def move_summaries(
    src: tuple[torch.Tensor, ...],
    dst: tuple[torch.Tensor, ...],
    valid: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    options: dict,
    inverse: bool = False,
) -> None:
    """:func:`move_summaries_kernel` from ``src`` to ``dst``: (keys,) or (keys, values), each
    indexed ``(B, J, H, P)`` (any strides, rows contiguous); rows j >= ``valid`` of dst get zeros.
    ``options``: BLOCK_PH and EMULATE (:func:`_launch_options`)."""
    if len(src) == 2 and src[0].stride() != src[1].stride():  # one set of strides per side
        src = (src[0].contiguous(), src[1].contiguous())
    if len(dst) == 2 and dst[0].stride() != dst[1].stride():
        raise ValueError(f"keys and values must share strides, got {dst[0].stride()} and {dst[1].stride()}")
    batch, count, heads, dim = dst[0].shape
    rows, block = batch * count, 64
    move_summaries_kernel[(triton.cdiv(rows, block), heads)](
        src[0], src[-1], dst[0], dst[-1], cos, sin, rows, count, valid, *src[0].stride()[:3], *dst[0].stride()[:3],
        P=dim, BLOCK_R=block, BLOCK_PH=options["BLOCK_PH"], INVERSE=inverse, HAS_V=len(src) == 2,
        EMULATE=options["EMULATE"], num_warps=4,
    )  # fmt: skip


def _rotated_summaries(
    k: torch.Tensor, chunk_size: int, cos: torch.Tensor, sin: torch.Tensor, options: dict
) -> torch.Tensor:
    """(B, C, H, P) summaries k[jL + L - 1] rotated to position j, in k's dtype (contiguous); k if C = 0.

    1/L of k, built once per call by one kernel: rotating them inside the attention kernels
    instead would cost, for every (query tile, summary tile) pair, a cos/sin load as large as
    the K and V tiles together.
    """
    batch, length, heads, head_dim = k.shape
    chunks = length // chunk_size
    if chunks == 0:
        # Nothing to read; k stands in so that no kernel gets the null pointer of an empty tensor.
        return k
    kr = k.new_empty(batch, chunks, heads, head_dim)
    move_summaries((k[:, chunk_size - 1 :: chunk_size],), (kr,), chunks, cos, sin, options)
    return kr


def _launch_options(q: torch.Tensor, k: torch.Tensor) -> dict:
    """Constexprs shared by every kernel: heads, query groups, head-dim blocks, dot precision, bf16 emulation."""
    head_dim = q.shape[-1]
    return {
        "H": k.shape[2],
        "HPG": k.shape[2] // q.shape[2],
        "P": head_dim,
        # Two dots over P/2 need P/2 padded to a power of two, at least 16 for tl.dot on GPUs.
        "BLOCK_P": max(16, triton.next_power_of_2(head_dim)),
        "BLOCK_PH": max(16, triton.next_power_of_2(head_dim // 2)),
        # fp32 dots follow torch's matmul setting: IEEE fp32 unless tf32 is allowed
        # (torch.set_float32_matmul_precision("high")); fp16 / bf16 dots ignore it.
        "DOT_PRECISION": "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee",
        "EMULATE": is_interpreted() and q.dtype == torch.bfloat16,
    }


def _options_of(kernel: triton.JITFunction, options: dict) -> dict:
    """The :func:`_launch_options` that ``kernel`` takes."""
    return {name: value for name, value in options.items() if name in kernel.arg_names}


def chunk_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    chunk_size: int,
    rope_base: float,
    scale: float,
    gate: torch.Tensor | None = None,
    config: KernelConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel.

    Args:
        q: ``(B, T, G, P)`` queries in G groups (head h reads group h // (H / G)); k, v: ``(B, T, H, P)``;
            all one dtype (fp16, bf16 or fp32), P even.
        chunk_size: L; rope_base, scale: as in the reference.
        gate: ``(B, T, H, P)`` logits of the output gate, or None. q and gate are read in place
            when their last two dims are contiguous (slices of a fused projection).
        config: tiles and launch options; default from :data:`CONFIGS` by dtype and chunk count.

    Returns:
        ``y`` ``(B, T, H, P)`` in q's dtype (the attention output, times sigmoid(gate) if given)
        and ``lse`` ``(B, H, T)`` fp32, the log2-domain log-sum-exp of the scores times
        ``scale * log2(e)`` (what the backward needs).
    """
    batch, length, heads, head_dim = k.shape
    q, k, v = rows_contiguous(q), k.contiguous(), v.contiguous()
    z = rows_contiguous(gate) if gate is not None else q
    y = k.new_empty(k.shape, dtype=q.dtype)
    lse = torch.empty(batch, heads, length, device=q.device, dtype=torch.float32)
    if y.numel() == 0:
        return y, lse
    config = config or _config("fwd", q.dtype, length // chunk_size)
    options = _launch_options(q, k)
    cos, sin = _tables(length, chunk_size, head_dim, rope_base, q.device)
    kr = _rotated_summaries(k, chunk_size, cos, sin, options)
    grid = (triton.cdiv(length, config.block_m), batch * heads)
    chunk_attention_fwd_kernel[grid](
        q, k, v, kr, z, y, lse, cos, sin, length, length // chunk_size, chunk_size,
        q.stride(0), q.stride(1), z.stride(0), z.stride(1), scale * _LOG2E,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, GATED=gate is not None, num_warps=config.num_warps,
        num_stages=config.num_stages, **options,
    )  # fmt: skip
    return y, lse


def _launch_bwd(
    dy: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    y: torch.Tensor,
    lse: torch.Tensor,
    chunk_size: int,
    rope_base: float,
    scale: float,
    gate: torch.Tensor | None,
    dq: torch.Tensor | None,
    dgate: torch.Tensor | None,
    config_dq: KernelConfig | None,
    config_dkv: KernelConfig | None,
    factored: bool,
) -> tuple[torch.Tensor, ...]:
    """The three backward kernels (rows, dq, dkv); ``(dq, dk, dv, dz, do, own_c, own_p)``.

    dk, dv: ``(B, T, H, P)`` full gradients, or with ``factored`` the summary gradients alone
    ``(B, C, H, P)``, the own-state terms given by the factors own_c, own_p ``(B, T, H)`` fp32 (else
    None). dz is dq's stand-in without a gate; do is dy without a gate.
    """
    batch, length, heads, head_dim = k.shape
    q, k, v, y, dy = rows_contiguous(q), k.contiguous(), v.contiguous(), y.contiguous(), dy.contiguous()
    z = rows_contiguous(gate) if gate is not None else q
    dq = dq if dq is not None else torch.empty_like(q)
    dz = dgate if dgate is not None else (torch.empty_like(z) if gate is not None else dq)
    check_output("dq", dq, q)
    check_output("dgate", dz, z)
    chunks = length // chunk_size
    if factored:
        dk, dv = k.new_empty(batch, chunks, heads, head_dim), v.new_empty(batch, chunks, heads, head_dim)
        own_c, own_p = lse.new_empty(batch, length, heads), lse.new_empty(batch, length, heads)
    else:
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        own_c = own_p = None
    # Written by the rows pass for the dq and dkv kernels: delta = rowsum(dO * O), the rotated
    # queries, the own part of dq and, with a gate, dO = dy * sigmoid(gate).
    do = torch.empty_like(dy) if gate is not None else dy
    if k.numel() == 0:
        return dq, dk, dv, dz, do, own_c, own_p
    config_rows = _config("rows", q.dtype, chunks)
    config_dq = config_dq or _config("dq", q.dtype, chunks)
    config_dkv = config_dkv or _config("dkv", q.dtype, chunks)
    groups = q.shape[2]
    delta, qr = torch.empty_like(lse), torch.empty_like(q, memory_format=torch.contiguous_format)
    dq_own = torch.empty(q.shape, device=q.device, dtype=torch.float32)
    options = _launch_options(q, k)
    cos, sin = _tables(length, chunk_size, head_dim, rope_base, q.device)
    kr = _rotated_summaries(k, chunk_size, cos, sin, options)
    grid = (triton.cdiv(length, config_rows.block_m), batch * groups)
    chunk_attention_bwd_kernel_rows[grid](
        q, k, v, z, y, dy, lse, delta, qr, do, dq_own, own_c if factored else dk, own_p if factored else dv, dz,
        cos, sin, length, chunk_size, q.stride(0), q.stride(1), z.stride(0), z.stride(1), dz.stride(0), dz.stride(1),
        scale, scale * _LOG2E, BLOCK_M=config_rows.block_m, GATED=gate is not None, FACTORED=factored,
        num_warps=config_rows.num_warps, num_stages=config_rows.num_stages,
        **_options_of(chunk_attention_bwd_kernel_rows, options),
    )  # fmt: skip
    grid = (triton.cdiv(length, config_dq.block_m), batch * groups)
    chunk_attention_bwd_kernel_dq[grid](
        kr, v, qr, do, lse, delta, dq_own, dq, cos, sin, length, chunks, chunk_size, dq.stride(0), dq.stride(1),
        scale, scale * _LOG2E, BLOCK_M=config_dq.block_m, BLOCK_N=config_dq.block_n,
        num_warps=config_dq.num_warps, num_stages=config_dq.num_stages,
        **_options_of(chunk_attention_bwd_kernel_dq, options),
    )  # fmt: skip
    if chunks:
        grid = (triton.cdiv(chunks, config_dkv.block_n), batch * heads)
        chunk_attention_bwd_kernel_dkv[grid](
            q, k, v, kr, qr, do, lse, delta, dk, dv, cos, sin, length, chunks, chunk_size, q.stride(0), q.stride(1),
            scale, scale * _LOG2E, BLOCK_M=config_dkv.block_m, BLOCK_N=config_dkv.block_n, FACTORED=factored,
            num_warps=config_dkv.num_warps, num_stages=config_dkv.num_stages, **options,
        )  # fmt: skip
    return dq, dk, dv, dz, do, own_c, own_p


def chunk_attention_bwd(
    dy: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    y: torch.Tensor,
    lse: torch.Tensor,
    chunk_size: int,
    rope_base: float,
    scale: float,
    gate: torch.Tensor | None = None,
    *,
    dq: torch.Tensor | None = None,
    dgate: torch.Tensor | None = None,
    config_dq: KernelConfig | None = None,
    config_dkv: KernelConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Launch the backward kernels (gate and own-state terms, dq, then the summaries).

    Args:
        dy: ``(B, T, H, P)`` upstream gradient of y.
        q, k, v, y, lse, gate: the forward's inputs and outputs (see :func:`chunk_attention_fwd`).
        chunk_size, rope_base, scale: as in the forward.
        dq, dgate: where to write the gradients of q and gate (shapes of q and gate, last two
            dims contiguous, e.g. slices of one gradient buffer for a fused projection), or None
            for new tensors.
        config_dq, config_dkv: tiles and launch options; default from :data:`CONFIGS`.

    Returns:
        ``(dq, dk, dv, dgate)`` in their inputs' dtypes; dgate is None without a gate.
    """
    dq, dk, dv, dz, _, _, _ = _launch_bwd(
        dy, q, k, v, y, lse, chunk_size, rope_base, scale, gate, dq, dgate, config_dq, config_dkv, factored=False
    )
    return dq, dk, dv, dz if gate is not None else None


def chunk_attention_bwd_factored(
    dy: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    y: torch.Tensor,
    lse: torch.Tensor,
    chunk_size: int,
    rope_base: float,
    scale: float,
    gate: torch.Tensor | None = None,
    *,
    dq: torch.Tensor | None = None,
    dgate: torch.Tensor | None = None,
    config_dq: KernelConfig | None = None,
    config_dkv: KernelConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, StateGrads]:
    """The backward with the gradients of k and v (the recurrent states) left factored, for the
    recurrence's backward to expand (:class:`~rat_lightning.ops.recurrence.triton.StateGrads`):
    two numbers per row instead of two rows written here and read there.

    Args: as :func:`chunk_attention_bwd`.

    Returns:
        ``(dq, dgate, state_grads)``; dgate None without a gate.
    """
    dq, dk, dv, dz, do, own_c, own_p = _launch_bwd(
        dy, q, k, v, y, lse, chunk_size, rope_base, scale, gate, dq, dgate, config_dq, config_dkv, factored=True
    )
    return dq, dz if gate is not None else None, StateGrads(do, q, own_c, own_p, dk, dv)


@torch.library.custom_op("rat_lightning::chunk_attention_fwd", mutates_args=())
def _fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate: torch.Tensor | None,
    chunk_size: int,
    rope_base: float,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return chunk_attention_fwd(q, k, v, chunk_size, rope_base, scale, gate)


@_fwd_op.register_fake
def _fwd_fake(q, k, v, gate, chunk_size, rope_base, scale):
    batch, length, heads, _ = k.shape
    return k.new_empty(k.shape, dtype=q.dtype), q.new_empty((batch, heads, length), dtype=torch.float32)


@torch.library.custom_op("rat_lightning::chunk_attention_bwd", mutates_args=())
def _bwd_op(
    dy: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    y: torch.Tensor,
    lse: torch.Tensor,
    gate: torch.Tensor | None,
    chunk_size: int,
    rope_base: float,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`chunk_attention_bwd` as a custom op; the gate's gradient is empty without a gate."""
    dq, dk, dv, dgate = chunk_attention_bwd(dy, q, k, v, y, lse, chunk_size, rope_base, scale, gate)
    return dq, dk, dv, dgate if dgate is not None else q.new_empty(0)


@_bwd_op.register_fake
def _bwd_fake(dy, q, k, v, y, lse, gate, chunk_size, rope_base, scale):
    dgate = torch.empty_like(gate) if gate is not None else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dgate


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, gate, chunk_size, rope_base, scale = inputs
    y, lse = output
    ctx.save_for_backward(q, k, v, gate, y, lse)
    ctx.args = (chunk_size, rope_base, scale)
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # no zero-filled gradient for lse


def _backward(ctx, dy, dlse):
    if dy is None:
        return None, None, None, None, None, None, None
    q, k, v, gate, y, lse = ctx.saved_tensors
    dq, dk, dv, dgate = _bwd_op(dy, q, k, v, y, lse, gate, *ctx.args)
    return dq, dk, dv, dgate if gate is not None else None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def chunk_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    chunk_size: int,
    rope_base: float = 10000.0,
    scale: float | None = None,
    gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """Differentiable Triton chunk attention (torch custom op ``rat_lightning::chunk_attention_fwd``).

    Args:
        q: ``(B, T, G, P)`` queries in G groups; k, v: ``(B, T, H, P)``; fp16 / bf16 / fp32 (promoted
            to one dtype), P even.
        chunk_size: L.
        rope_base: RoPE base; positions are chunk indices.
        scale: default ``P ** -0.5``.
        gate: ``(B, T, H, P)`` output-gate logits or None.

    Returns:
        ``(B, T, H, P)`` in q's dtype.
    """
    dtypes = [t.dtype for t in (q, k, v, gate) if t is not None]
    dtype = functools.reduce(torch.promote_types, dtypes)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    gate = gate.to(dtype) if gate is not None else None
    y, _ = _fwd_op(q.to(dtype), k.to(dtype), v.to(dtype), gate, chunk_size, float(rope_base), scale)
    return y.to(q.dtype)
