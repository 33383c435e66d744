"""Triton kernels for the gated linear recurrence (maths in :mod:`.reference`).

    a_t = sigmoid(g_t + bias),  1 - a_t = sigmoid(-(g_t + bias))
    s_t = a_t s_{t-1} + (1 - a_t) v_t          v in {x, k repeated from G groups to H heads}

Layout. Inputs ``(B, T, H, P)`` (k: ``(B, T, G, P)``) with the ``(H, P)`` part contiguous; the
batch and time strides are free, so the slices of a fused projection need no copy. One program
owns a tile ``[NC, BH, BP]``: NC time blocks (chunks), the BH heads of one key group (so k is read
once per group and dk is reduced over the group's heads in registers), and BP channels of the
head dimension. It walks the CHUNK positions of its blocks one by one; each step is one coalesced
load of x, g and k and one store of sx and sk for all NC blocks at once.

Restart form (chunk_size = L): CHUNK = L and every block is independent: one pass. (L >= T never
restarts and runs as the full-sequence form.)

Full-sequence form: a chunked parallel scan over time blocks of ``FULL_SEQUENCE_BLOCK`` tokens:
  1. ``recurrence_fwd_kernel_chunk`` (SUMMARY) scans each block from zero and writes only its
     final state and its gate product (fp32, ``(B, NB, H, P)``),
  2. ``recurrence_kernel_carry`` runs the recurrence over blocks (sequential over blocks,
     parallel over batch and channels; U blocks at a time with ``tl.associative_scan``) and writes
     every block's incoming state,
  3. ``recurrence_fwd_kernel_chunk`` scans each block again from its incoming state and writes the
     states (recomputing reads x, g, k twice but writes each state once, which moves fewer bytes
     than storing local states and fixing them up).
The backward is the same three passes run backwards in time, with the gradient that reaches the
block from its right as the carry. It reads s_{t-1} from the saved outputs, writes dk summed over
the group's heads and, per program, the sum of dg over its tokens (summed in torch for the bias).

Numerics: fp32 state and arithmetic, inputs cast on load, outputs cast on store; a and 1 - a
each without a subtraction (exact near a = 1, like the reference's sigmoid(-g)); offsets over
batch and time in int64 (PITFALLS 11).

Both directions are torch custom ops (``rat_lightning::gated_recurrence_fwd`` / ``_bwd``) with
fake implementations and registered autograd, so torch.compile sees opaque calls (PITFALLS 4).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from rat_lightning.ops.layout import check_output, rows_contiguous
from rat_lightning.ops.triton_common import check_device, is_interpreted, to_store


class StateGrads(NamedTuple):
    """Gradients of the restart-form states sx, sk in the factored form the chunk attention's
    backward gives them (:func:`rat_lightning.ops.chunk_attention.triton.chunk_attention_bwd_factored`):

        ds_x[t] = p[t] do[t] + dv_summary[j],   ds_k[t] = c[t] q[t] + dk_summary[j]

    with the summary terms only at the end t = jL + L - 1 of each full chunk j. Two numbers per
    token and head replace two gradient rows.

    Attributes:
        do: the attention's output gradient dO, ``(B, T, H, P)`` contiguous, or with ``regrouped``
            ``(B, H * L, C, P)`` contiguous, element ``[b, h L + i, c]`` the row of token cL + i
            (:mod:`rat_lightning.ops.chunk_attention.regrouped`, C = ceil(T / L)).
        q: ``(B, T, G, P)`` the queries (the key groups), read in place where their last two dims
            are contiguous (a slice of a fused projection).
        c, p: ``(B, T, H)`` fp32 factors.
        dk_summary, dv_summary: ``(B, T // L, H, P)`` contiguous.
        regrouped: the layout of do.
    """

    do: torch.Tensor
    q: torch.Tensor
    c: torch.Tensor
    p: torch.Tensor
    dk_summary: torch.Tensor
    dv_summary: torch.Tensor
    regrouped: bool = False

    def do_strides(self, chunk_size: int) -> tuple[int, int, int, int]:
        """Element strides of dO by (batch, chunk, offset in the chunk, head)."""
        if self.regrouped:
            return self.do.stride(0), self.do.stride(2), self.do.stride(1), chunk_size * self.do.stride(1)
        return self.do.stride(0), chunk_size * self.do.stride(1), self.do.stride(1), self.do.stride(2)

    def do_tokens(self, chunk_size: int) -> torch.Tensor:
        """dO ``(B, T, H, P)`` (a copy when regrouped)."""
        if not self.regrouped:
            return self.do
        batch, rows, chunks, dim = self.do.shape
        tokens = self.do.unflatten(1, (rows // chunk_size, chunk_size)).permute(0, 3, 2, 1, 4)
        return tokens.reshape(batch, chunks * chunk_size, rows // chunk_size, dim)[:, : self.c.shape[1]]

    def expand(self, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The dense ``(ds_x, ds_k)``, each ``(B, T, H, P)`` in dO's dtype."""
        heads = self.c.shape[2]
        dsx = self.p[..., None] * self.do_tokens(chunk_size).float()
        dsk = self.c[..., None] * self.q.float().repeat_interleave(heads // self.q.shape[2], dim=2)
        ends = slice(chunk_size - 1, self.dk_summary.shape[1] * chunk_size, chunk_size)
        dsx[:, ends] += self.dv_summary.float()
        dsk[:, ends] += self.dk_summary.float()
        return dsx.to(self.do.dtype), dsk.to(self.do.dtype)


# Time block of the full-sequence scan (tokens per block in passes 1 and 3).
FULL_SEQUENCE_BLOCK = 64
# Blocks combined per step of the carry pass (rows of its associative scan).
CARRY_BLOCKS = 32


@triton.jit
def _combine2(a1, x1, a2, x2):
    # Compose s -> a1 s + x1 then s -> a2 s + x2.
    return a1 * a2, a2 * x1 + x2


@triton.jit
def _combine3(a1, x1, k1, a2, x2, k2):
    return a1 * a2, a2 * x1 + x2, a2 * k1 + k2


@triton.jit
def _gates(b_g):
    """``(a, 1 - a) = (sigmoid(g), sigmoid(-g))`` from one exp(-|g|), neither by subtraction:
    near a = 1 (or 0) the small one keeps its full relative precision, as in the reference."""
    b_e = tl.exp(-tl.abs(b_g))
    b_big = 1.0 / (1.0 + b_e)
    b_small = b_e * b_big
    m_pos = b_g >= 0
    return tl.where(m_pos, b_big, b_small), tl.where(m_pos, b_small, b_big)


@triton.jit
def recurrence_fwd_kernel_chunk(
    x,
    g,
    k,
    bias,
    h0x,
    h0k,
    sx,
    sk,
    hx,
    hk,
    ha,
    stride_xb,
    stride_xt,
    stride_gb,
    stride_gt,
    stride_kb,
    stride_kt,
    T,
    NB,
    NBT,
    H: tl.constexpr,
    P: tl.constexpr,
    G: tl.constexpr,
    HPG: tl.constexpr,
    CHUNK: tl.constexpr,
    NC: tl.constexpr,
    BH: tl.constexpr,
    BP: tl.constexpr,
    NPB: tl.constexpr,
    HAS_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_H0: tl.constexpr,
    SUMMARY: tl.constexpr,
    EMULATE: tl.constexpr,
):
    """Scan NC blocks of CHUNK tokens for BH heads x BP channels.

    Args (tensors): x, g ``(B, T, H, P)``; k ``(B, T, G, P)``; bias ``(H, P)``; h0x, h0k
    ``(B * NB, H, P)`` fp32 incoming state per block (HAS_H0); sx, sk ``(B, T, H, P)`` outputs
    (not SUMMARY); hx, hk, ha ``(B * NB, H, P)`` fp32 final local state and gate product per
    block (SUMMARY). NB blocks per sequence, NBT = B * NB in all.
    """
    i_n, i_c = tl.program_id(0), tl.program_id(1)
    i_g, i_pb = i_c // NPB, i_c % NPB
    # Blocks of this program: flat index o_n = batch * NB + block.
    o_n = i_n * NC + tl.arange(0, NC)
    m_n = o_n < NBT
    o_b = (o_n // NB).to(tl.int64)
    o_t0 = (o_n % NB) * CHUNK
    o_hh = tl.arange(0, BH)
    o_p = i_pb * BP + tl.arange(0, BP)
    m_p = o_p < P
    # Channels within a token: the group's heads, and the key group's own channels.
    o_d = (i_g * HPG + o_hh)[:, None] * P + o_p[None, :]
    m_d = (o_hh < HPG)[:, None] & m_p[None, :]
    o_dk = i_g * P + o_p

    if HAS_BIAS:
        b_bias = tl.load(bias + o_d, mask=m_d, other=0.0).to(tl.float32)
    o_h = o_n.to(tl.int64)[:, None, None] * (H * P) + o_d[None, :, :]
    m_h = m_n[:, None, None] & m_d[None, :, :]
    if HAS_H0:
        b_hx = tl.load(h0x + o_h, mask=m_h, other=0.0)
        if HAS_K:
            b_hk = tl.load(h0k + o_h, mask=m_h, other=0.0)
    else:
        b_hx = tl.zeros([NC, BH, BP], dtype=tl.float32)
        if HAS_K:
            b_hk = tl.zeros([NC, BH, BP], dtype=tl.float32)
    if SUMMARY:
        b_A = tl.full([NC, BH, BP], 1.0, dtype=tl.float32)

    for i in range(CHUNK):
        o_t = (o_t0 + i).to(tl.int64)
        m_t = m_n & (o_t < T)
        m = m_t[:, None, None] & m_d[None, :, :]
        p_g = g + (o_b * stride_gb + o_t * stride_gt)[:, None, None] + o_d[None, :, :]
        b_g = tl.load(p_g, mask=m, other=0.0).to(tl.float32)
        if HAS_BIAS:
            b_g = b_g + b_bias[None, :, :]
        b_a, b_1ma = _gates(b_g)
        if SUMMARY:
            # Positions past T leave the state as it is, so it ends at the last token.
            b_a = tl.where(m, b_a, 1.0)
            b_1ma = tl.where(m, b_1ma, 0.0)
            b_A = b_A * b_a
        p_x = x + (o_b * stride_xb + o_t * stride_xt)[:, None, None] + o_d[None, :, :]
        b_x = tl.load(p_x, mask=m, other=0.0).to(tl.float32)
        b_hx = b_a * b_hx + b_1ma * b_x
        # Outputs are contiguous (B, T, H, P): row b * T + t.
        o_s = (o_b * T + o_t)[:, None, None] * (H * P) + o_d[None, :, :]
        if not SUMMARY:
            tl.store(sx + o_s, to_store(b_hx, sx.dtype.element_ty, EMULATE), mask=m)
        if HAS_K:
            # One load of the group's key serves its HPG heads.
            p_k = k + (o_b * stride_kb + o_t * stride_kt)[:, None] + o_dk[None, :]
            b_k = tl.load(p_k, mask=m_t[:, None] & m_p[None, :], other=0.0).to(tl.float32)
            b_hk = b_a * b_hk + b_1ma * b_k[:, None, :]
            if not SUMMARY:
                tl.store(sk + o_s, to_store(b_hk, sk.dtype.element_ty, EMULATE), mask=m)

    if SUMMARY:
        tl.store(hx + o_h, b_hx, mask=m_h)
        tl.store(ha + o_h, b_A, mask=m_h)
        if HAS_K:
            tl.store(hk + o_h, b_hk, mask=m_h)


@triton.jit
def recurrence_kernel_carry(
    ha,
    hx,
    hk,
    s0x,
    s0k,
    cx,
    ck,
    fx,
    fk,
    NB,
    D: tl.constexpr,
    U: tl.constexpr,
    BC: tl.constexpr,
    HAS_K: tl.constexpr,
    HAS_S0: tl.constexpr,
    REVERSE: tl.constexpr,
):
    """Recurrence over blocks: ``c <- A_j c + h_j`` per channel, for the x and k parts.

    Forward (REVERSE False): blocks in order from ``s0`` (the initial state, or zero); writes the
    state entering block j to row j of cx, ck and the final state to fx, fk ``(B, D)``.
    Backward (REVERSE True): blocks in reverse from zero (h_j is the gradient a block passes to
    its left, A_j its gate product); writes the gradient entering block j from its right to row
    j and the gradient of the initial state to fx, fk.

    Args (tensors): ha, hx, hk, cx, ck ``(B * NB, D)`` fp32; s0x, s0k ``(B, D)`` any float dtype.
    """
    i_b, i_c = tl.program_id(0), tl.program_id(1)
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < D
    o_b = i_b.to(tl.int64)
    if REVERSE:
        o_first = (o_b * NB + NB - 1) * D + o_c
    else:
        o_first = o_b * NB * D + o_c
    if HAS_S0:
        b_cx = tl.load(s0x + o_b * D + o_c, mask=m_c, other=0.0).to(tl.float32)
        if HAS_K:
            b_ck = tl.load(s0k + o_b * D + o_c, mask=m_c, other=0.0).to(tl.float32)
    else:
        b_cx = tl.zeros([BC], dtype=tl.float32)
        if HAS_K:
            b_ck = tl.zeros([BC], dtype=tl.float32)
    tl.store(cx + o_first, b_cx, mask=m_c)
    if HAS_K:
        tl.store(ck + o_first, b_ck, mask=m_c)

    for i0 in range(0, NB, U):
        # o_u: position in the order of the recurrence; o_j: the block it reads.
        o_u = i0 + tl.arange(0, U)
        m_u = o_u < NB
        if REVERSE:
            o_j = NB - 1 - o_u
            o_next = o_j - 1
        else:
            o_j = o_u
            o_next = o_j + 1
        m = m_u[:, None] & m_c[None, :]
        o_row = (o_b * NB + o_j)[:, None] * D + o_c[None, :]
        # Rows past the last block are the identity (A = 1, h = 0): the scan's last row is the total.
        b_A = tl.load(ha + o_row, mask=m, other=1.0)
        b_hx = tl.load(hx + o_row, mask=m, other=0.0)
        if HAS_K:
            b_hk = tl.load(hk + o_row, mask=m, other=0.0)
            b_A, b_hx, b_hk = tl.associative_scan((b_A, b_hx, b_hk), 0, _combine3)
            b_hk = b_hk + b_A * b_ck[None, :]
        else:
            b_A, b_hx = tl.associative_scan((b_A, b_hx), 0, _combine2)
        b_hx = b_hx + b_A * b_cx[None, :]
        m_next = m & ((o_next >= 0) & (o_next < NB))[:, None]
        o_next_row = (o_b * NB + o_next)[:, None] * D + o_c[None, :]
        tl.store(cx + o_next_row, b_hx, mask=m_next)
        m_last = (o_u == i0 + U - 1)[:, None]
        b_cx = tl.sum(tl.where(m_last, b_hx, 0.0), axis=0)
        if HAS_K:
            tl.store(ck + o_next_row, b_hk, mask=m_next)
            b_ck = tl.sum(tl.where(m_last, b_hk, 0.0), axis=0)

    tl.store(fx + o_b * D + o_c, b_cx, mask=m_c)
    if HAS_K:
        tl.store(fk + o_b * D + o_c, b_ck, mask=m_c)


@triton.jit
def recurrence_bwd_kernel_chunk(
    x,
    g,
    k,
    bias,
    sx,
    sk,
    s0x,
    s0k,
    dsx,
    dsk,
    dcx,
    dck,
    sq,
    own_c,
    own_p,
    dks,
    dvs,
    dx,
    dg,
    dk,
    dbias,
    hx,
    hk,
    ha,
    stride_xb,
    stride_xt,
    stride_gb,
    stride_gt,
    stride_kb,
    stride_kt,
    stride_qb,
    stride_qt,
    stride_dxb,
    stride_dxt,
    stride_dgb,
    stride_dgt,
    stride_dkb,
    stride_dkt,
    stride_dob,
    stride_doc,
    stride_doi,
    stride_doh,
    T,
    NB,
    NBT,
    C,
    H: tl.constexpr,
    P: tl.constexpr,
    G: tl.constexpr,
    HPG: tl.constexpr,
    CHUNK: tl.constexpr,
    NC: tl.constexpr,
    BH: tl.constexpr,
    BP: tl.constexpr,
    NPB: tl.constexpr,
    HAS_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_S0: tl.constexpr,
    HAS_DC: tl.constexpr,
    RESTART: tl.constexpr,
    SUMMARY: tl.constexpr,
    FACTORED: tl.constexpr,
    EMULATE: tl.constexpr,
):
    """Reverse scan of NC blocks: ``d_t = ds_t + a_{t+1} d_{t+1}`` (not across a restart).

    Writes ``dv_t = (1 - a_t) d_t`` (dk summed over the group's heads), ``dg_t = a_t (1 - a_t)
    sum_v d_t (s_{t-1} - v_t)`` with s_{t-1} read from the saved states sx, sk (zero at a
    restart, the initial state s0 at t = 0), and per-program sums of dg for the bias.

    Args (tensors): x, g, sx, dsx ``(B, T, H, P)``; k, dsk-group ``(B, T, G, P)``; sk, dsk
    ``(B, T, H, P)``; s0x, s0k ``(B, H, P)`` (HAS_S0); dcx, dck ``(B * NB, H, P)`` fp32 gradient
    entering each block from its right (HAS_DC); outputs dx ``(B, T, H, P)``, dg like g,
    dk ``(B, T, G, P)``, dbias ``(n_programs_over_blocks, H, P)`` fp32. With SUMMARY, only
    hx, hk (``a_{t0} d_{t0}`` of the block's local scan) and ha (its gate product) are written.
    FACTORED (restart form with k, :class:`StateGrads`): dsx is dO and the state gradients are
    ``ds_x = own_p dO``, ``ds_k = own_c sq`` (own_c, own_p ``(B, T, H)`` fp32, sq the queries
    ``(B, T, G, P)`` with batch / time strides; dO read with strides by (batch, chunk, offset in
    the chunk, head), so in either layout of :class:`StateGrads`), plus at the end of each of the
    C full chunks its summary gradients dvs, dks ``(B, C, H, P)``, which enter the scan as its carry.
    """
    i_n, i_c = tl.program_id(0), tl.program_id(1)
    i_g, i_pb = i_c // NPB, i_c % NPB
    o_n = i_n * NC + tl.arange(0, NC)
    m_n = o_n < NBT
    o_b = (o_n // NB).to(tl.int64)
    o_t0 = (o_n % NB) * CHUNK
    o_hh = tl.arange(0, BH)
    o_p = i_pb * BP + tl.arange(0, BP)
    m_p = o_p < P
    o_d = (i_g * HPG + o_hh)[:, None] * P + o_p[None, :]
    m_d = (o_hh < HPG)[:, None] & m_p[None, :]
    o_dk = i_g * P + o_p

    if HAS_BIAS:
        b_bias = tl.load(bias + o_d, mask=m_d, other=0.0).to(tl.float32)
    o_h = o_n.to(tl.int64)[:, None, None] * (H * P) + o_d[None, :, :]
    m_h = m_n[:, None, None] & m_d[None, :, :]
    # b_rx, b_rk: a_{t+1} d_{t+1}, the gradient reaching s_t through s_{t+1}.
    if HAS_DC:
        b_rx = tl.load(dcx + o_h, mask=m_h, other=0.0)
        if HAS_K:
            b_rk = tl.load(dck + o_h, mask=m_h, other=0.0)
    elif FACTORED:
        # A full chunk's summary is its last state: the summary's gradient reaches that state directly.
        o_sum = (o_b * C + o_n % NB)[:, None, None] * (H * P) + o_d[None, :, :]
        m_sum = m_h & (o_n % NB < C)[:, None, None]
        b_rx = tl.load(dvs + o_sum, mask=m_sum, other=0.0).to(tl.float32)
        b_rk = tl.load(dks + o_sum, mask=m_sum, other=0.0).to(tl.float32)
    else:
        b_rx = tl.zeros([NC, BH, BP], dtype=tl.float32)
        if HAS_K:
            b_rk = tl.zeros([NC, BH, BP], dtype=tl.float32)
    if SUMMARY:
        b_A = tl.full([NC, BH, BP], 1.0, dtype=tl.float32)
    else:
        b_db = tl.zeros([BH, BP], dtype=tl.float32)

    for i_r in range(CHUNK):
        i = CHUNK - 1 - i_r
        o_t = (o_t0 + i).to(tl.int64)
        m_t = m_n & (o_t < T)
        m = m_t[:, None, None] & m_d[None, :, :]
        p_g = g + (o_b * stride_gb + o_t * stride_gt)[:, None, None] + o_d[None, :, :]
        b_g = tl.load(p_g, mask=m, other=0.0).to(tl.float32)
        if HAS_BIAS:
            b_g = b_g + b_bias[None, :, :]
        b_a, b_1ma = _gates(b_g)
        b_a = tl.where(m, b_a, 1.0)
        b_1ma = tl.where(m, b_1ma, 0.0)
        o_s = (o_b * T + o_t)[:, None, None] * (H * P) + o_d[None, :, :]
        if FACTORED:
            o_do = (
                (o_b * stride_dob + (o_n % NB) * stride_doc + i * stride_doi)[:, None, None]
                + ((i_g * HPG + o_hh) * stride_doh)[None, :, None]
                + o_p[None, None, :]
            )
            b_dsx = tl.load(dsx + o_do, mask=m, other=0.0).to(tl.float32)
            o_own = ((o_b * T + o_t) * H + i_g * HPG)[:, None] + o_hh[None, :]
            m_own = m_t[:, None] & (o_hh < HPG)[None, :]
            b_dsx *= tl.load(own_p + o_own, mask=m_own, other=0.0)[:, :, None]
            p_q = sq + (o_b * stride_qb + o_t * stride_qt)[:, None] + o_dk[None, :]
            b_q = tl.load(p_q, mask=m_t[:, None] & m_p[None, :], other=0.0).to(tl.float32)
            b_dsk = tl.load(own_c + o_own, mask=m_own, other=0.0)[:, :, None] * b_q[:, None, :]
        else:
            b_dsx = tl.load(dsx + o_s, mask=m, other=0.0).to(tl.float32)
            if HAS_K:
                b_dsk = tl.load(dsk + o_s, mask=m, other=0.0).to(tl.float32)
        b_dx = b_dsx + b_rx
        if HAS_K:
            b_dk = b_dsk + b_rk
        if SUMMARY:
            b_A = b_A * b_a
        else:
            # s_{t-1}: the saved state, zero at a restart, the initial state at t = 0.
            if RESTART:
                m_prev = m & (o_t > o_t0)[:, None, None]
            else:
                m_prev = m & (o_t > 0)[:, None, None]
            b_sx = tl.load(sx + o_s - H * P, mask=m_prev, other=0.0).to(tl.float32)
            p_x = x + (o_b * stride_xb + o_t * stride_xt)[:, None, None] + o_d[None, :, :]
            b_x = tl.load(p_x, mask=m, other=0.0).to(tl.float32)
            if HAS_S0:
                m_0 = m & (o_t == 0)[:, None, None]
                b_sx += tl.load(s0x + o_b[:, None, None] * (H * P) + o_d[None, :, :], mask=m_0, other=0.0).to(
                    tl.float32
                )
            p_dx = dx + (o_b * stride_dxb + o_t * stride_dxt)[:, None, None] + o_d[None, :, :]
            tl.store(p_dx, to_store(b_1ma * b_dx, dx.dtype.element_ty, EMULATE), mask=m)
            b_dg = b_dx * (b_sx - b_x)
            if HAS_K:
                b_sk = tl.load(sk + o_s - H * P, mask=m_prev, other=0.0).to(tl.float32)
                if HAS_S0:
                    b_sk += tl.load(
                        s0k + o_b[:, None, None] * (H * P) + o_d[None, :, :], mask=m_0, other=0.0
                    ).to(tl.float32)
                p_k = k + (o_b * stride_kb + o_t * stride_kt)[:, None] + o_dk[None, :]
                m_k = m_t[:, None] & m_p[None, :]
                b_k = tl.load(p_k, mask=m_k, other=0.0).to(tl.float32)
                b_dg += b_dk * (b_sk - b_k[:, None, :])
                # The key of a group feeds HPG heads: its gradient is their sum.
                p_dk = dk + (o_b * stride_dkb + o_t * stride_dkt)[:, None] + o_dk[None, :]
                tl.store(p_dk, to_store(tl.sum(b_1ma * b_dk, axis=1), dk.dtype.element_ty, EMULATE), mask=m_k)
            b_dg = b_dg * b_a * b_1ma
            p_dg = dg + (o_b * stride_dgb + o_t * stride_dgt)[:, None, None] + o_d[None, :, :]
            tl.store(p_dg, to_store(b_dg, dg.dtype.element_ty, EMULATE), mask=m)
            b_db += tl.sum(b_dg, axis=0)
        b_rx = b_a * b_dx
        if HAS_K:
            b_rk = b_a * b_dk

    if SUMMARY:
        tl.store(hx + o_h, b_rx, mask=m_h)
        tl.store(ha + o_h, b_A, mask=m_h)
        if HAS_K:
            tl.store(hk + o_h, b_rk, mask=m_h)
    elif HAS_BIAS:
        tl.store(dbias + i_n.to(tl.int64) * (H * P) + o_d, b_db, mask=m_d)


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _tiles(heads: int, dim: int, heads_per_group: int, forward: bool) -> dict:
    """Tile of one program: BH heads (one key group) x BP channels x NC blocks, and its warps.

    Measured on an H100 (bf16, 262,144 tokens, H=16, P=128, G=2; `bench/tune_recurrence.py`,
    docs/benchmarks/recurrence_tiles_h100.json). Backward: 8 heads x 64 channels x 1 chunk at 4
    warps (restart L=16: 4.44 ms forward+backward; full sequence 6.70); 32 channels (64-byte row
    segments) cost 1.5x, 128 channels or several chunks per program cost registers and occupancy.
    Forward: 8 heads x 128 channels at 8 warps, 1.58 / 2.55 ms (restart / full sequence) against
    1.74 / 2.75 at the backward's tile, the same 128 elements per warp.
    """
    bh = _next_power_of_2(heads_per_group)
    bp = min(_next_power_of_2(dim), max(16, (1024 if forward else 512) // bh))
    warps = 8 if forward and bh * bp >= 1024 else 4
    return {"BH": bh, "BP": bp, "NC": 1, "NPB": triton.cdiv(dim, bp), "num_warps": warps}


def _effective_chunk(chunk_size: int | None, length: int) -> int | None:
    # A chunk that holds the whole sequence never restarts: the full-sequence scan is parallel
    # over time blocks, the restart form would run each sequence in one program.
    return None if chunk_size is not None and chunk_size >= length else chunk_size


def _layout(x: torch.Tensor, k: torch.Tensor | None, chunk_size: int | None, forward: bool) -> dict:
    batch, length, heads, dim = x.shape
    groups = heads if k is None else k.shape[2]
    block = chunk_size if chunk_size is not None else min(FULL_SEQUENCE_BLOCK, _next_power_of_2(length))
    nb = triton.cdiv(length, block)
    tiles = _tiles(heads, dim, heads // groups, forward)
    grid = (triton.cdiv(batch * nb, tiles["NC"]), groups * tiles["NPB"])
    # The interpreter's fp32 -> bf16 cast truncates: EMULATE rounds to nearest first, as a GPU does.
    emulate = is_interpreted() and x.dtype == torch.bfloat16
    meta = {"H": heads, "P": dim, "G": groups, "HPG": heads // groups, "CHUNK": block, "EMULATE": emulate, **tiles}
    return {"NB": nb, "NBT": batch * nb, "grid": grid, "meta": meta}


def _carry(
    ha: torch.Tensor,
    hx: torch.Tensor,
    hk: torch.Tensor | None,
    s0: tuple[torch.Tensor | None, torch.Tensor | None],
    reverse: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """Run the recurrence over block summaries ``(B, NB, H, P)``; returns the carry into each
    block ``(B, NB, H, P)`` and the final carry ``(B, H, P)``, fp32, for x and k."""
    batch, nb, heads, dim = ha.shape
    d = heads * dim
    cx, fx = torch.empty_like(hx), hx.new_empty(batch, heads, dim)
    ck = torch.empty_like(hk) if hk is not None else None
    fk = hx.new_empty(batch, heads, dim) if hk is not None else None
    # 32 channels (128 bytes) per program: at batch 1-2 the pass is parallel over channels only.
    bc = min(_next_power_of_2(d), 32)
    u = min(CARRY_BLOCKS, _next_power_of_2(nb))
    grid = (batch, triton.cdiv(d, bc))
    recurrence_kernel_carry[grid](
        ha, hx, hk if hk is not None else hx,
        s0[0] if s0[0] is not None else hx, s0[1] if s0[1] is not None else hx,
        cx, ck if ck is not None else cx, fx, fk if fk is not None else fx,
        nb, D=d, U=u, BC=bc, HAS_K=hk is not None, HAS_S0=s0[0] is not None, REVERSE=reverse,
        num_warps=4,
    )  # fmt: skip
    return cx, ck, fx, fk


def recurrence_fwd(
    x: torch.Tensor,
    g: torch.Tensor,
    k: torch.Tensor | None = None,
    gate_bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    initial_state: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Forward launcher.

    Args:
        x, g: ``(B, T, H, P)`` bf16, fp16 or fp32 (fp64 is computed in fp32).
        k: ``(B, T, G, P)`` or None; gate_bias: ``(H, P)`` or None.
        chunk_size: restart every chunk_size tokens, or None for the full sequence.
        initial_state: ``(sx0, sk0)`` each ``(B, H, P)``, full sequence only.

    Returns:
        ``(sx, sk)`` contiguous ``(B, T, H, P)`` in x's dtype; sk None when k is None.
    """
    check_device(x)
    chunk_size = _effective_chunk(chunk_size, x.shape[1])
    x, g = rows_contiguous(x), rows_contiguous(g)
    k = rows_contiguous(k) if k is not None else None
    bias = gate_bias.contiguous() if gate_bias is not None else None
    if initial_state is not None:
        initial_state = tuple(s.contiguous() if s is not None else None for s in initial_state)
    batch, length, heads, dim = x.shape
    sx = x.new_empty(batch, length, heads, dim)
    sk = x.new_empty(batch, length, heads, dim) if k is not None else None
    if x.numel() == 0:
        return sx, sk
    lay = _layout(x, k, chunk_size, forward=True)
    nb, meta = lay["NB"], lay["meta"]
    kk = k if k is not None else x
    strides = (x.stride(0), x.stride(1), g.stride(0), g.stride(1), kk.stride(0), kk.stride(1))
    common = dict(HAS_K=k is not None, HAS_BIAS=bias is not None, **meta)
    bias_arg = bias if bias is not None else x
    h0x = h0k = None
    if chunk_size is None and (nb > 1 or initial_state is not None):
        # Pass 1: each block's final local state and gate product.
        f32 = dict(device=x.device, dtype=torch.float32)
        hx, ha = torch.empty(batch, nb, heads, dim, **f32), torch.empty(batch, nb, heads, dim, **f32)
        hk = torch.empty(batch, nb, heads, dim, **f32) if k is not None else None
        recurrence_fwd_kernel_chunk[lay["grid"]](
            x, g, kk, bias_arg, hx, hx, sx, sx, hx, hk if hk is not None else hx, ha,
            *strides, length, nb, lay["NBT"], HAS_H0=False, SUMMARY=True, **common,
        )  # fmt: skip
        # Pass 2: the state entering every block.
        s0 = initial_state if initial_state is not None else (None, None)
        h0x, h0k, _, _ = _carry(ha, hx, hk, (s0[0], s0[1] if k is not None else None), reverse=False)
    # Pass 3 (or the only pass of the restart form): states from each block's incoming state.
    recurrence_fwd_kernel_chunk[lay["grid"]](
        x, g, kk, bias_arg, h0x if h0x is not None else sx, h0k if h0k is not None else sx,
        sx, sk if sk is not None else sx, sx, sx, sx,
        *strides, length, nb, lay["NBT"], HAS_H0=h0x is not None, SUMMARY=False, **common,
    )  # fmt: skip
    return sx, sk


def recurrence_bwd(
    dsx: torch.Tensor | StateGrads,
    dsk: torch.Tensor | None,
    x: torch.Tensor,
    g: torch.Tensor,
    k: torch.Tensor | None,
    gate_bias: torch.Tensor | None,
    sx: torch.Tensor,
    sk: torch.Tensor | None,
    chunk_size: int | None = None,
    initial_state: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    grads_out: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, ...]:
    """Backward launcher.

    Args:
        dsx, dsk: gradients of the outputs ``(B, T, H, P)`` (dsk None when k is None); or, in the
            restart form with k, dsx the factored gradients of both (:class:`StateGrads`) and dsk None.
        x, g, k, gate_bias, chunk_size, initial_state: the forward's inputs.
        sx, sk: the forward's outputs (contiguous), read for s_{t-1}.
        grads_out: ``(dx, dg, dk)`` to write the input gradients into (shapes and dtypes of x, g, k,
            the last two dims contiguous: e.g. slices of one gradient buffer of a fused
            projection), or None for new tensors.

    Returns:
        ``(dx, dg, dk, dbias, dsx0, dsk0)`` in the dtypes of their inputs; dk is ``(B, T, G, P)``
        (summed over the H/G heads of each group); entries are None where the input is None.
    """
    check_device(x)
    factored = dsx if isinstance(dsx, StateGrads) else None
    if factored is not None:
        if chunk_size is None or k is None or dsk is not None:
            raise ValueError("factored state gradients need the restart form (a chunk_size), k, and dsk=None")
        if _effective_chunk(chunk_size, x.shape[1]) is None:
            # One chunk holds the sequence and runs as the full-sequence scan: expand (T <= L, short).
            (dsx, dsk), factored = factored.expand(chunk_size), None
        else:
            if factored.do.stride(-1) != 1:
                factored = factored._replace(do=factored.do.contiguous())
            dsx = factored.do
    chunk_size = _effective_chunk(chunk_size, x.shape[1])
    x, g = rows_contiguous(x), rows_contiguous(g)
    k = rows_contiguous(k) if k is not None else None
    bias = gate_bias.contiguous() if gate_bias is not None else None
    dsx = dsx.contiguous() if factored is None else dsx  # a factored dO is read with its strides
    sx = sx.contiguous()
    if k is not None:
        dsk = dsk.contiguous() if dsk is not None else (dsx if factored is not None else torch.zeros_like(sx))
        sk = sk.contiguous()
    else:
        dsk = sk = None
    batch, length, heads, dim = x.shape
    if grads_out is None:
        dx, dg = x.new_empty(x.shape), g.new_empty(g.shape)
        dk = k.new_empty(k.shape) if k is not None else None
    else:
        dx, dg, dk = grads_out
        for name, out, like in (("dx", dx, x), ("dg", dg, g), ("dk", dk, k)):
            if like is not None:
                check_output(name, out, like)
    s0x, s0k = initial_state if initial_state is not None else (None, None)
    s0x = s0x.contiguous() if s0x is not None else None
    s0k = s0k.contiguous() if (s0k is not None and k is not None) else None
    if x.numel() == 0:
        dbias = torch.zeros_like(bias) if bias is not None else None
        d0x = torch.zeros_like(s0x) if s0x is not None else None
        d0k = torch.zeros_like(s0k) if s0k is not None else None
        return dx, dg, dk, dbias, d0x, d0k
    lay = _layout(x, k, chunk_size, forward=False)
    nb, meta, grid = lay["NB"], lay["meta"], lay["grid"]
    kk, dkk = (k, dk) if k is not None else (x, dx)
    # The factored gradients' tensors (dsx stands in for those the kernel does not read).
    if factored is not None:
        # The restart form here has L < T, so at least one full chunk and a non-empty summary buffer.
        chunks = factored.dk_summary.shape[1]
        own = (rows_contiguous(factored.q), factored.c, factored.p, factored.dk_summary, factored.dv_summary)
        own_strides = (own[0].stride(0), own[0].stride(1), *factored.do_strides(chunk_size))
    else:
        chunks, own, own_strides = 0, (dsx,) * 5, (0,) * 6
    strides = (
        x.stride(0), x.stride(1), g.stride(0), g.stride(1), kk.stride(0), kk.stride(1), *own_strides[:2],
        dx.stride(0), dx.stride(1), dg.stride(0), dg.stride(1), dkk.stride(0), dkk.stride(1), *own_strides[2:],
    )  # fmt: skip
    common = dict(HAS_K=k is not None, HAS_BIAS=bias is not None, RESTART=chunk_size is not None, **meta)
    bias_arg = bias if bias is not None else x
    dsk_arg = dsk if dsk is not None else dsx
    sk_arg = sk if sk is not None else sx
    f32 = dict(device=x.device, dtype=torch.float32)
    dcx = dck = d0x = d0k = None
    if chunk_size is None and (nb > 1 or s0x is not None):
        # Pass 1: each block's local reverse scan, summarised as a_{t0} d_{t0} and its gate product.
        hx, ha = torch.empty(batch, nb, heads, dim, **f32), torch.empty(batch, nb, heads, dim, **f32)
        hk = torch.empty(batch, nb, heads, dim, **f32) if k is not None else None
        recurrence_bwd_kernel_chunk[grid](
            x, g, kk, bias_arg, sx, sk_arg, sx, sx, dsx, dsk_arg, hx, hx, *own, dx, dg, dkk, hx,
            hx, hk if hk is not None else hx, ha,
            *strides, length, nb, lay["NBT"], chunks, HAS_S0=False, HAS_DC=False, SUMMARY=True, FACTORED=False,
            **common,
        )  # fmt: skip
        # Pass 2: the gradient entering every block from its right, and the initial state's.
        dcx, dck, d0x, d0k = _carry(ha, hx, hk, (None, None), reverse=True)
    dbias_part = torch.empty(grid[0], heads, dim, **f32) if bias is not None else None
    recurrence_bwd_kernel_chunk[grid](
        x, g, kk, bias_arg, sx, sk_arg, s0x if s0x is not None else sx, s0k if s0k is not None else sx,
        dsx, dsk_arg, dcx if dcx is not None else sx, dck if dck is not None else sx, *own,
        dx, dg, dkk, dbias_part if dbias_part is not None else sx, sx, sx, sx,
        *strides, length, nb, lay["NBT"], chunks, HAS_S0=s0x is not None, HAS_DC=dcx is not None, SUMMARY=False,
        FACTORED=factored is not None, **common,
    )  # fmt: skip
    dbias = dbias_part.sum(0).to(bias.dtype) if bias is not None else None
    if s0x is not None:
        d0x = d0x.to(s0x.dtype)
        d0k = d0k.to(s0k.dtype) if s0k is not None else None
    return dx, dg, dk, dbias, d0x, d0k


# torch custom ops: torch.compile sees one opaque call with a fake (shape-only) implementation
# (PITFALLS 4). Optional inputs are Optional[Tensor]; the optional k-state output is an empty
# tensor when k is None (a custom op returns a fixed number of tensors).


@torch.library.custom_op("rat_lightning::gated_recurrence_fwd", mutates_args=())
def gated_recurrence_op(
    x: torch.Tensor,
    g: torch.Tensor,
    k: torch.Tensor | None,
    gate_bias: torch.Tensor | None,
    sx0: torch.Tensor | None,
    sk0: torch.Tensor | None,
    chunk_size: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`recurrence_fwd` as a custom op; returns ``(sx, sk)``, sk empty when k is None."""
    initial_state = (sx0, sk0) if sx0 is not None else None
    sx, sk = recurrence_fwd(x, g, k, gate_bias, chunk_size, initial_state)
    return sx, sk if sk is not None else x.new_empty(0)


@gated_recurrence_op.register_fake
def _gated_recurrence_fake(x, g, k, gate_bias, sx0, sk0, chunk_size):
    return x.new_empty(x.shape), x.new_empty(x.shape) if k is not None else x.new_empty(0)


@torch.library.custom_op("rat_lightning::gated_recurrence_bwd", mutates_args=())
def gated_recurrence_bwd_op(
    dsx: torch.Tensor,
    dsk: torch.Tensor | None,
    x: torch.Tensor,
    g: torch.Tensor,
    k: torch.Tensor | None,
    gate_bias: torch.Tensor | None,
    sx0: torch.Tensor | None,
    sk0: torch.Tensor | None,
    sx: torch.Tensor,
    sk: torch.Tensor | None,
    chunk_size: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`recurrence_bwd` as a custom op; gradients of absent inputs are empty tensors."""
    initial_state = (sx0, sk0) if sx0 is not None else None
    grads = recurrence_bwd(dsx, dsk, x, g, k, gate_bias, sx, sk, chunk_size, initial_state)
    return tuple(d if d is not None else x.new_empty(0) for d in grads)


@gated_recurrence_bwd_op.register_fake
def _gated_recurrence_bwd_fake(dsx, dsk, x, g, k, gate_bias, sx0, sk0, sx, sk, chunk_size):
    def like(t: torch.Tensor | None) -> torch.Tensor:
        return t.new_empty(t.shape) if t is not None else x.new_empty(0)

    return like(x), like(g), like(k), like(gate_bias), like(sx0), like(sk0 if k is not None else None)


def _setup_context(ctx, inputs, output) -> None:
    x, g, k, gate_bias, sx0, sk0, chunk_size = inputs
    sx, sk = output
    ctx.save_for_backward(x, g, k, gate_bias, sx0, sk0, sx, sk if k is not None else None)
    ctx.chunk_size = chunk_size


def _backward(ctx, dsx, dsk):
    x, g, k, gate_bias, sx0, sk0, sx, sk = ctx.saved_tensors
    if dsx is None:
        dsx = torch.zeros_like(sx)
    if k is None:
        dsk = None
    grads = gated_recurrence_bwd_op(dsx, dsk, x, g, k, gate_bias, sx0, sk0, sx, sk, ctx.chunk_size)
    inputs = (x, g, k, gate_bias, sx0, sk0 if k is not None else None)
    return (*(d if t is not None else None for d, t in zip(grads, inputs)), None)


gated_recurrence_op.register_autograd(_backward, setup_context=_setup_context)


def gated_recurrence_triton(
    x: torch.Tensor,
    g: torch.Tensor,
    k: torch.Tensor | None = None,
    gate_bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    initial_state: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Differentiable Triton recurrence; arguments as in :func:`recurrence_fwd`."""
    sx0, sk0 = initial_state if initial_state is not None else (None, None)
    sx, sk = gated_recurrence_op(x, g, k, gate_bias, sx0, sk0 if k is not None else None, chunk_size)
    return sx, (sk if k is not None else None)
