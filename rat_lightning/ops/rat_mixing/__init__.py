"""Dispatcher for the mixing core of a RAT layer: packed projection in, gated attention out.

Maths in :mod:`.reference`; the Triton path (:mod:`.triton`) is one op whose backward writes
every gradient of the packed projection into one buffer.
"""

from __future__ import annotations

import importlib.util

import torch

from rat_lightning.ops.backend import TRITON_DTYPES, resolve_backend
from rat_lightning.ops.chunk_attention.sdpa_lse import cudnn_attention_usable
from rat_lightning.ops.rat_mixing.reference import rat_mixing_reference, split_projection

__all__ = ["CUDNN_MIN_CHUNKS", "attention_path", "rat_mixing", "split_projection"]

_AVAILABLE = ("triton",) if importlib.util.find_spec("triton") is not None else ()
# From this many chunks on, "auto" runs the chunk attention around cuDNN's fused attention where
# cuDNN can take it (:mod:`rat_lightning.ops.chunk_attention.regrouped`). Its extra passes cost
# about as much as cuDNN saves over the Triton kernels at 1K chunks (T = 16K at L = 16) on an
# H100, and it wins from there on (docs/kernels.md).
CUDNN_MIN_CHUNKS = 2048


def attention_path(h: torch.Tensor, head_dim: int, chunk_size: int, backend: str) -> str:
    """Which chunk attention the Triton op runs for ``h`` ``(B, T, ...)``: ``"cudnn"`` when asked, or
    under ``"auto"`` from :data:`CUDNN_MIN_CHUNKS` chunks on where cuDNN takes h; else ``"triton"``."""
    if backend == "cudnn":
        return "cudnn"
    chunks = -(-h.shape[1] // chunk_size)
    # cuDNN's backward sums dq in an order that varies between runs; the Triton kernels do not.
    long_enough = (
        backend == "auto"
        and chunks >= CUDNN_MIN_CHUNKS
        and cudnn_attention_usable(h, head_dim)
        and not _deterministic()
    )
    return "cudnn" if long_enough else "triton"


@torch.compiler.assume_constant_result
def _deterministic() -> bool:
    """``torch.use_deterministic_algorithms`` on (a constant to torch.compile, which guards on it)."""
    return torch.are_deterministic_algorithms_enabled()


def rat_mixing(
    h: torch.Tensor,
    gate_bias: torch.Tensor,
    heads: int,
    groups: int,
    chunk_size: int,
    rope_base: float = 10000.0,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RAT's recurrence, inter-chunk attention and output gate on a packed projection.

    Args:
        h: ``(B, T, (3 H + 2 G) P)`` the input projection laid out ``[z | x | g | q | k]``
            (:func:`split_projection`).
        gate_bias: ``(H, P)`` bias of the recurrence gate.
        heads, groups: H and G (H % G == 0).
        chunk_size: L.
        rope_base: RoPE base over chunk indices.
        backend: ``"auto"`` (Triton on CUDA for fp16 / bf16 / fp32, with the chunk attention
            around cuDNN from :data:`CUDNN_MIN_CHUNKS` chunks on where cuDNN takes the dtype and
            GPU, unless ``torch.use_deterministic_algorithms`` is on; else the reference),
            ``"reference"``, ``"triton"`` (the Triton kernels alone; also CPU tensors under
            TRITON_INTERPRET=1) or ``"cudnn"`` (the cuDNN path at any length; on CPU under
            TRITON_INTERPRET=1 a PyTorch stand-in takes cuDNN's place).

    Returns:
        ``y`` ``(B, T, H * P)`` in h's dtype, differentiable in h and gate_bias; the states
        ``sx, sk`` ``(B, T, H, P)`` in h's dtype without gradient (a cache's summaries).
    """
    if heads % groups:
        raise ValueError(f"heads ({heads}) must be divisible by groups ({groups})")
    parts = 3 * heads + 2 * groups
    if h.dim() != 3 or h.shape[-1] % parts:
        raise ValueError(
            f"h must be (batch, seq, (3 * heads + 2 * groups) * head_dim) = (batch, seq, {parts} * head_dim), "
            f"got {tuple(h.shape)}"
        )
    dim = h.shape[-1] // parts
    if gate_bias.shape != (heads, dim):
        raise ValueError(f"gate_bias must be (heads, head_dim) = {(heads, dim)}, got {tuple(gate_bias.shape)}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    supported = h.dtype in TRITON_DTYPES
    if backend == "cudnn" and h.is_cuda and not cudnn_attention_usable(h, dim):
        raise ValueError(
            f"backend='cudnn' needs fp16 / bf16 heads of at most 128 on a Hopper or newer GPU with torch's cuDNN "
            f"attention enabled, got {h.dtype}, head_dim {dim}; use backend='auto' or 'triton'"
        )
    if backend in ("triton", "cudnn") and not supported:
        raise ValueError(f"the Triton kernels take fp16, bf16 or fp32 h, got {h.dtype}; use backend='reference'")
    resolved = resolve_backend("triton" if backend == "cudnn" else backend, h, _AVAILABLE if supported else ())
    if resolved == "triton":
        if dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {dim}; pick d_model / n_heads even")
        from rat_lightning.ops.rat_mixing.triton import rat_mixing_fwd

        attention = attention_path(h, dim, chunk_size, backend)
        y, sx, sk, _ = rat_mixing_fwd(h, gate_bias, heads, groups, chunk_size, float(rope_base), attention)
        return y, sx, sk
    return rat_mixing_reference(h, gate_bias, heads, groups, chunk_size, rope_base)
