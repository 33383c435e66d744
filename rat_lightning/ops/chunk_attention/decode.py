"""Triton decode kernel for one step of RAT's inter-chunk attention (flash-decoding style).

Maths (see :func:`.reference.chunk_attention_step`): the query q of the current token, in chunk
c = C, attends in one softmax to the C finished chunk summaries K_j, V_j (j < C; K_j stored with
RoPE at j already applied, as the caches hold them) and to its own running state (score q . k_own
unrotated, value v_own). Forward only.

Kernel ``chunk_attention_decode_kernel``, grid (B * H, splits): one program owns one (b, h) and
a contiguous range of tiles of BLOCK_N summaries. Single query, so no tl.dot: scores are
elementwise products summed over P, the value update a weighted sum over the tile's rows. The
online softmax is fp32 in base 2 (scores times scale * log2(e)); split 0 seeds it with the own
term, so with one split the running max is finite from the start. With one split the program
writes o = acc / l; with several (long C at small B * H, see :func:`num_splits`) each writes
its partial (m, l, acc) and ``chunk_attention_decode_merge_kernel`` (grid B * H) combines them.

RoPE costs P/2 cosines and sines per program: keys arrive rotated (rotating them at cache-write
time is one rotation per summary for its whole life, instead of one per summary per decoding
step), so only q is rotated, once, by R(C). The per-key work is then a load, a product and the
softmax update: an earlier version that rotated unrotated keys in-kernel (a (BLOCK_N, P/2) cos /
sin table per program plus four products per key pair) reached only 45-52% of the HBM bound with
bf16 caches on an H100. The angle C * inv_freq is computed in turns (from a per-(P, base) fp64
table), reduced to [-1/2, 1/2] in fp64, then cos / sin run in fp32 on an argument in [-pi, pi]:
the rotation matches the reference's fp64 angles to ~1e-7 at any C (fp32 angles lose ~5e-4 rad
at C = 8192; ``angle_fp64=False`` gives that behaviour, kept for the error comparison in tests).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from rat_lightning.ops.backend import TRITON_DTYPES
from rat_lightning.ops.triton_common import check_device, col_mask, register_forward_only

__all__ = [
    "CONFIGS",
    "DecodeConfig",
    "chunk_attention_decode",
    "chunk_attention_decode_triton",
    "num_splits",
]

# Log2(e): the kernel works in base 2 (exp2 is one instruction), scores scaled by scale * log2(e).
_LOG2E = 1.4426950408889634
# H100 SXM; the CPU interpreter has no device properties (only num_splits' choice depends on it).
_DEFAULT_SMS = 132


class DecodeConfig(NamedTuple):
    """Launch configuration: block_n summaries per tile (a power of two), warps, pipeline stages."""

    block_n: int
    num_warps: int
    num_stages: int


# Per summary dtype, from ``python -m rat_lightning.bench.decode --sweep`` on an H100 (bf16 cache,
# 24 configs, docs/benchmarks/decode_sweep_h100.json): tiles of 32 summaries at 2 warps reach 94%
# of the HBM bound at 4K (B = 4096) and 93% at 64K (B = 476); 4 warps, the first guess, 77-78%.
# The fp32 cache is at the bound with (32, 4, 2) already (docs/benchmarks/decode_h100.json).
# With V loaded beside K (2026-12-03, H200, docs/benchmarks/decode_probe_h200.json, 9 configs x 3
# rounds) (32, 2, 1) stays best at 64K (96% of the bound) and is 1% behind (16, 2, 1) at 4K (93%).
CONFIGS = {
    "decode": DecodeConfig(32, 2, 1),
    "decode_fp32": DecodeConfig(32, 4, 2),
}
# Warps per SM that num_splits aims at (many resident warps hide load latency: at 64K, B = 39 the
# 2-warp config with 4 programs per SM read at 45% of the bound on an H100), and the fewest tiles a
# split gets (a split costs a q rotation, a partial write and a merge).
_WARPS_PER_SM = 32
_MIN_TILES_PER_SPLIT = 2


@triton.jit
def _cos_sin(b_turns):
    """cos and sin (fp32) of 2 pi * turns: reduced to [-1/2, 1/2] turn in the turns' dtype first."""
    b_frac = b_turns - tl.floor(b_turns + 0.5)
    b_angle = b_frac.to(tl.float32) * 6.283185307179586
    return tl.cos(b_angle), tl.sin(b_angle)


# C and the split sizes vary from step to step: no value specialisation (one compile for every C).
@triton.jit(do_not_specialize=["C", "tiles_per_split", "n_splits"])
def chunk_attention_decode_kernel(
    q,
    k_own,
    v_own,
    k_chunks,
    v_chunks,
    turns,
    o,
    m_part,
    l_part,
    acc_part,
    C,
    tiles_per_split,
    n_splits,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_qp,
    stride_kob,
    stride_koh,
    stride_kop,
    stride_vob,
    stride_voh,
    stride_vop,
    stride_kb,
    stride_kc,
    stride_kh,
    stride_kp,
    stride_vb,
    stride_vc,
    stride_vh,
    stride_vp,
    H: tl.constexpr,
    P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_P: tl.constexpr,
    SPLIT: tl.constexpr,
    ANGLE_DTYPE: tl.constexpr,
):
    """One (split, b, h): online softmax over its summary tiles (plus the own term on split 0).

    q, k_own, v_own: (B, H, P) any strides; k_chunks, v_chunks: (B, C, H, P) any strides, keys
    rotated at their chunk index; turns: (P/2,) fp64 inv_freq / (2 pi); o: (B, H, P) fp32 contiguous (SPLIT=False);
    m_part, l_part (B * H, n_splits) and acc_part (B * H, n_splits, P) fp32 (SPLIT=True).
    """
    i_bh, i_s = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_n = tl.arange(0, BLOCK_N)
    o_p = tl.arange(0, BLOCK_P)
    m_p = col_mask(o_p, P, BLOCK_P)
    # Rotate-half partner of channel p (p + P/2 or p - P/2) and its sign in the rotation.
    o_partner = tl.where(o_p < P // 2, o_p + P // 2, o_p - P // 2)
    sign = tl.where(o_p < P // 2, -1.0, 1.0)

    # Query (and its partner channels) and own state, full rows of P.
    p_q = q + i_b.to(tl.int64) * stride_qb + i_h * stride_qh
    b_q = tl.load(p_q + o_p * stride_qp, mask=m_p, other=0.0).to(tl.float32)
    b_q_partner = tl.load(p_q + o_partner * stride_qp, mask=m_p, other=0.0).to(tl.float32)
    p_ko = k_own + i_b.to(tl.int64) * stride_kob + i_h * stride_koh + o_p * stride_kop
    b_ko = tl.load(p_ko, mask=m_p, other=0.0).to(tl.float32)
    p_vo = v_own + i_b.to(tl.int64) * stride_vob + i_h * stride_voh + o_p * stride_vop
    b_vo = tl.load(p_vo, mask=m_p, other=0.0).to(tl.float32)

    # Own term (q and k_own both at chunk C: the rotations cancel), on split 0 only.
    own = i_s == 0
    b_m = tl.where(own, tl.sum(b_q * b_ko, 0) * qk_scale, float("-inf"))
    b_l = tl.where(own, 1.0, 0.0)
    b_acc = tl.where(own, b_vo, 0.0)

    # q rotated by R(C): q_p cos + sign_p q_partner(p) sin, angle of pair p mod P/2; scale folded in.
    b_turns = tl.load(turns + o_p % (P // 2), mask=m_p, other=0.0).to(ANGLE_DTYPE)
    b_cq, b_sq = _cos_sin(C.to(ANGLE_DTYPE) * b_turns)
    b_qr = (b_q * b_cq + sign * b_q_partner * b_sq) * qk_scale

    k_bh = k_chunks + i_b.to(tl.int64) * stride_kb + i_h * stride_kh
    v_bh = v_chunks + i_b.to(tl.int64) * stride_vb + i_h * stride_vh
    o_kp = (o_p * stride_kp)[None, :]
    o_vp = (o_p * stride_vp)[None, :]
    n_tiles = tl.cdiv(C, BLOCK_N)
    tile_lo = i_s * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, n_tiles)
    for i_t in range(tile_lo, tile_hi):
        o_j = i_t * BLOCK_N + o_n
        m_j = o_j < C
        m_jp = m_j[:, None] & m_p[None, :]
        b_k = tl.load(k_bh + o_j.to(tl.int64)[:, None] * stride_kc + o_kp, mask=m_jp, other=0.0).to(tl.float32)
        # V is loaded with K, before the scores need K: both tiles are in flight at once (one
        # memory latency per tile instead of two; H200, B = 4096: 85% -> 93% of the copy bound at 4K).
        b_v = tl.load(v_bh + o_j.to(tl.int64)[:, None] * stride_vc + o_vp, mask=m_jp, other=0.0).to(tl.float32)
        b_s = tl.where(m_j, tl.sum(b_k * b_qr[None, :], 1), float("-inf"))
        # Every tile of a split has a key j < C, so b_m_new is finite.
        b_m_new = tl.maximum(b_m, tl.max(b_s, 0))
        b_alpha = tl.exp2(b_m - b_m_new)
        b_p = tl.exp2(b_s - b_m_new)
        b_l = b_l * b_alpha + tl.sum(b_p, 0)
        b_acc = b_acc * b_alpha + tl.sum(b_p[:, None] * b_v, 0)
        b_m = b_m_new

    if SPLIT:
        o_part = i_bh.to(tl.int64) * n_splits + i_s
        tl.store(m_part + o_part, b_m)
        tl.store(l_part + o_part, b_l)
        tl.store(acc_part + o_part * P + o_p, b_acc, mask=m_p)
    else:
        tl.store(o + i_bh.to(tl.int64) * P + o_p, b_acc / b_l, mask=m_p)


@triton.jit
def chunk_attention_decode_merge_kernel(
    m_part,
    l_part,
    acc_part,
    o,
    n_splits,
    P: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Combine the partial (m, l, acc) of every split of one (b, h): o = sum w acc / sum w l."""
    i_bh = tl.program_id(0)
    o_s = tl.arange(0, BLOCK_S)
    m_s = o_s < n_splits
    o_p = tl.arange(0, BLOCK_P)
    m_p = col_mask(o_p, P, BLOCK_P)
    o_part = i_bh.to(tl.int64) * n_splits + o_s
    b_m = tl.load(m_part + o_part, mask=m_s, other=float("-inf"))
    # Split 0 holds the own term, so the max is finite; padded splits get weight exp2(-inf) = 0.
    b_w = tl.exp2(b_m - tl.max(b_m, 0))
    b_l = tl.sum(b_w * tl.load(l_part + o_part, mask=m_s, other=0.0), 0)
    b_acc = tl.load(acc_part + o_part[:, None] * P + o_p[None, :], mask=m_s[:, None] & m_p[None, :], other=0.0)
    b_o = tl.sum(b_w[:, None] * b_acc, 0) / b_l
    tl.store(o + i_bh.to(tl.int64) * P + o_p, b_o, mask=m_p)


_TURNS: dict[tuple[int, float, str], torch.Tensor] = {}


def _turns_table(head_dim: int, base: float, device: torch.device) -> torch.Tensor:
    """(P/2,) fp64 inv_freq / (2 pi), inv_freq as in :func:`rat_lightning.ops.rope.rope_angles`; cached."""
    key = (head_dim, float(base), str(device))
    table = _TURNS.get(key)
    if table is None:
        # Built on the device (no host copy: fine under CUDA graph capture).
        inv_freq = base ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim)
        table = _TURNS[key] = inv_freq / (2 * math.pi)
    return table


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _DEFAULT_SMS


def num_splits(batch_heads: int, chunks: int, block_n: int, sm_count: int = _DEFAULT_SMS, num_warps: int = 4) -> int:
    """Splits over C per (b, h): enough programs for ``_WARPS_PER_SM`` warps per SM, no empty split.

    Args:
        batch_heads: B * H programs without a split.
        chunks: C finished chunks.
        block_n: summaries per tile.
        sm_count: SMs of the GPU (132 on an H100 SXM).
        num_warps: warps per program.

    Returns:
        s >= 1 such that each split has the same number of tiles (the last one fewer) and at
        least ``_MIN_TILES_PER_SPLIT`` where s > 1.
    """
    tiles = triton.cdiv(chunks, block_n)
    wanted = triton.cdiv(_WARPS_PER_SM // num_warps * sm_count, max(batch_heads, 1))
    splits = max(1, min(wanted, tiles // _MIN_TILES_PER_SPLIT))
    # Even out the tiles per split, then drop the splits that the rounding left empty.
    return triton.cdiv(tiles, triton.cdiv(tiles, splits)) if tiles else 1


def _check_inputs(q, k_own, v_own, k_chunks, v_chunks) -> None:
    if q.dim() != 3 or k_own.shape != q.shape or v_own.shape != q.shape:
        raise ValueError(
            f"q, k_own, v_own must be (batch, heads, head_dim) of one shape; got {tuple(q.shape)}, "
            f"{tuple(k_own.shape)}, {tuple(v_own.shape)}"
        )
    batch, heads, head_dim = q.shape
    if k_chunks.dim() != 4 or v_chunks.shape != k_chunks.shape or (
        k_chunks.shape[0], k_chunks.shape[2], k_chunks.shape[3]) != (batch, heads, head_dim):  # fmt: skip
        raise ValueError(
            f"k_chunks, v_chunks must be (batch, chunks, heads, head_dim) = ({batch}, C, {heads}, {head_dim}); "
            f"got {tuple(k_chunks.shape)}, {tuple(v_chunks.shape)}"
        )
    dtypes = tuple(x.dtype for x in (q, k_own, v_own, k_chunks, v_chunks))
    if any(dtype not in TRITON_DTYPES for dtype in dtypes):
        raise ValueError(f"the Triton decode kernel takes fp16, bf16 or fp32 tensors, got {dtypes}")
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}; pick d_model / n_heads even")
    check_device(q, "the Triton decode kernel")


def chunk_attention_decode(
    q: torch.Tensor,
    k_own: torch.Tensor,
    v_own: torch.Tensor,
    k_chunks: torch.Tensor,
    v_chunks: torch.Tensor,
    rope_base: float,
    scale: float,
    config: DecodeConfig | None = None,
    splits: int | None = None,
    angle_fp64: bool = True,
) -> torch.Tensor:
    """Launch the decode kernel (and the merge kernel where C is split); no autograd.

    Args:
        q, k_own, v_own: ``(B, H, P)``; k_chunks, v_chunks: ``(B, C, H, P)`` (keys RoPE'd at their
            chunk index); each fp16, bf16 or fp32 (dtypes may differ), any strides (read in place),
            P even.
        rope_base, scale: as in the reference.
        config: tile and launch options; default ``CONFIGS["decode"]`` (``"decode_fp32"`` for
            fp32 summaries).
        splits: splits over C; default :func:`num_splits` (clamped so that no split is empty).
        angle_fp64: reduce RoPE angles in fp64 (default); False computes them in fp32.

    Returns:
        ``(B, H, P)`` fp32, contiguous.
    """
    _check_inputs(q, k_own, v_own, k_chunks, v_chunks)
    batch, heads, head_dim = q.shape
    chunks = k_chunks.shape[1]
    o = torch.empty((batch, heads, head_dim), device=q.device, dtype=torch.float32)
    if o.numel() == 0:
        return o
    config = config or CONFIGS["decode_fp32" if k_chunks.dtype == torch.float32 else "decode"]
    tiles = triton.cdiv(chunks, config.block_n)
    if splits is None:
        splits = num_splits(batch * heads, chunks, config.block_n, _sm_count(q.device), config.num_warps)
    splits = max(1, min(int(splits), tiles))
    tiles_per_split = triton.cdiv(tiles, splits) if tiles else 0
    splits = triton.cdiv(tiles, tiles_per_split) if tiles else 1
    if chunks == 0:
        # Nothing is read from the summaries; the own state stands in so that no kernel gets the
        # null pointer of an empty tensor.
        k_chunks, v_chunks = k_own.unsqueeze(1), v_own.unsqueeze(1)
    if splits > 1:
        m_part = torch.empty((batch * heads, splits), device=q.device, dtype=torch.float32)
        l_part = torch.empty_like(m_part)
        acc_part = torch.empty((batch * heads, splits, head_dim), device=q.device, dtype=torch.float32)
    else:
        m_part = l_part = acc_part = o
    chunk_attention_decode_kernel[(batch * heads, splits)](
        q, k_own, v_own, k_chunks, v_chunks, _turns_table(head_dim, rope_base, q.device), o, m_part, l_part,
        acc_part, chunks, tiles_per_split, splits, scale * _LOG2E,
        *q.stride(), *k_own.stride(), *v_own.stride(), *k_chunks.stride(), *v_chunks.stride(),
        H=heads, P=head_dim, BLOCK_N=config.block_n, BLOCK_P=triton.next_power_of_2(head_dim),
        SPLIT=splits > 1, ANGLE_DTYPE=tl.float64 if angle_fp64 else tl.float32, num_warps=config.num_warps,
        num_stages=config.num_stages,
    )  # fmt: skip
    if splits > 1:
        chunk_attention_decode_merge_kernel[(batch * heads,)](
            m_part, l_part, acc_part, o, splits, P=head_dim, BLOCK_S=triton.next_power_of_2(splits),
            BLOCK_P=triton.next_power_of_2(head_dim), num_warps=4 if head_dim * splits >= 4096 else 1,
        )  # fmt: skip
    return o


@torch.library.custom_op("rat_lightning::chunk_attention_decode", mutates_args=())
def _decode_op(
    q: torch.Tensor,
    k_own: torch.Tensor,
    v_own: torch.Tensor,
    k_chunks: torch.Tensor,
    v_chunks: torch.Tensor,
    rope_base: float,
    scale: float,
) -> torch.Tensor:
    return chunk_attention_decode(q, k_own, v_own, k_chunks, v_chunks, rope_base, scale)


@_decode_op.register_fake
def _decode_fake(q, k_own, v_own, k_chunks, v_chunks, rope_base, scale):
    return q.new_empty(q.shape, dtype=torch.float32)


register_forward_only(_decode_op, "decode kernel", "chunk_attention_step")


def chunk_attention_decode_triton(
    q: torch.Tensor,
    k_own: torch.Tensor,
    v_own: torch.Tensor,
    k_chunks: torch.Tensor,
    v_chunks: torch.Tensor,
    rope_base: float = 10000.0,
    scale: float | None = None,
) -> torch.Tensor:
    """Forward-only Triton decode step (torch custom op ``rat_lightning::chunk_attention_decode``).

    Args:
        q, k_own, v_own: ``(B, H, P)``; k_chunks, v_chunks: ``(B, C, H, P)`` summaries, keys RoPE'd
            at their chunk index; fp16 / bf16 / fp32, any strides, P even.
        rope_base: RoPE base; positions are chunk indices.
        scale: default ``P ** -0.5``.

    Returns:
        ``(B, H, P)`` fp32.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _decode_op(q, k_own, v_own, k_chunks, v_chunks, float(rope_base), scale)
