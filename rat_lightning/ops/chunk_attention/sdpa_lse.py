"""Causal grouped-query attention through a library kernel, with the log-sum-exp in and out.

cuDNN's fused attention (Hopper's wgmma / TMA / warp-specialised kernels, 1.5-1.8x faster than
flash at RAT's long-context inter-chunk attention) is reached through torch's private aten ops,
which, unlike ``F.scaled_dot_product_attention``, return the log-sum-exp and take ``out`` and the
log-sum-exp back in the backward. That is what lets the caller merge extra softmax terms (RAT's
own state) into the output, and get exact gradients by handing the backward the *merged* output
and log-sum-exp: the kernel then recomputes P from the full softmax's normaliser and
delta = rowsum(dO * O) from the full output, as ring attention does with its partial blocks.

Tensors are ``(B, heads, S, P)`` with any strides whose last dim is contiguous; the query heads
are a multiple of the key heads (query head i reads key head i // (Hq / Hk)). Causal: query s
sees keys 0..s. Off CUDA (the kernels' tests under TRITON_INTERPRET=1), and for the one position
cuDNN refuses, the same contract runs in plain PyTorch (:func:`_torch_fwd`, :func:`_torch_bwd`).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch


def cudnn_attention_usable(x: torch.Tensor, head_dim: int) -> bool:
    """Whether cuDNN's fused attention can take heads of ``head_dim`` in ``x``'s dtype on its device
    (fp16 / bf16 on a Hopper-or-newer GPU, head dim a multiple of 8 up to 128, torch's cuDNN SDPA
    backend enabled, and a first tiny call that agreed with the PyTorch stand-in). Other GPUs are
    left out: the speed that makes the path worth taking was measured on an H100 only."""
    return (
        x.is_cuda
        and x.dtype in (torch.float16, torch.bfloat16)
        and head_dim <= 128
        and head_dim % 8 == 0
        and _cudnn_ready(x.device.index)
    )


@torch.compiler.assume_constant_result
def _cudnn_ready(device_index: int) -> bool:
    """torch's cuDNN SDPA backend enabled, GPU ``device_index`` a Hopper or newer, and the probe passed
    there. A constant to torch.compile, which cannot trace these queries (a graph break per call
    otherwise)."""
    return (
        torch.backends.cuda.cudnn_sdp_enabled()
        and torch.cuda.get_device_capability(device_index)[0] >= 9
        and _cudnn_works(device_index)
    )


@functools.lru_cache(maxsize=None)
def _cudnn_works(device_index: int) -> bool:
    """Probe once per GPU: cuDNN's forward and backward through these aten ops (private, so their
    contract may move between torch releases) against the PyTorch stand-in."""
    # It may first run inside a model's autocast region, which would lower the stand-in's fp32 matmuls.
    with torch.autocast("cuda", enabled=False):
        return agrees_with_stand_in(torch.device("cuda", device_index), attention_with_lse, attention_with_lse_backward)


def agrees_with_stand_in(device: torch.device, forward: Callable, backward: Callable, rtol: float = 3e-2) -> bool:
    """Whether ``forward`` / ``backward`` (the contracts of :func:`attention_with_lse` and
    :func:`attention_with_lse_backward`) match the PyTorch stand-in on a tiny bf16 GQA problem with
    a merged log-sum-exp; False, with a warning that names the failure, where they raise or differ."""
    generator = torch.Generator().manual_seed(0)
    q, do = (torch.randn(1, 4, 8, 64, generator=generator).to(device, torch.bfloat16) for _ in range(2))
    k, v = (torch.randn(1, 2, 8, 64, generator=generator).to(device, torch.bfloat16) for _ in range(2))
    # An extra softmax term per row, as RAT's own state: the backward gets the merged lse.
    extra = torch.randn(1, 4, 8, generator=generator).to(device)
    try:
        o, lse = forward(q, k, v, 0.125)
        grads = backward(do, q, k, v, o, torch.logaddexp(lse, extra).contiguous(), 0.125)
    except RuntimeError as error:
        warnings.warn(f"cuDNN's fused attention failed a probe ({error}); RAT keeps its Triton kernels", stacklevel=2)
        return False
    o_ref, lse_ref = _torch_fwd(q, k, v, 0.125)
    grads_ref = _torch_bwd(do, q, k, v, o_ref, torch.logaddexp(lse_ref, extra), 0.125)
    for name, actual, expected in zip(("o", "lse", "dq", "dk", "dv"), (o, lse, *grads), (o_ref, lse_ref, *grads_ref)):
        error = ((actual.float() - expected.float()).norm() / expected.float().norm()).item()
        if not error <= rtol:
            warnings.warn(
                f"cuDNN's fused attention disagrees with the PyTorch stand-in in {name} (relative error {error:.2g}); "
                "RAT keeps its Triton kernels", stacklevel=2,
            )  # fmt: skip
            return False
    return True


def attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(o, lse)``: o ``(B, Hq, S, P)`` in q's dtype, lse ``(B, Hq, S)`` fp32 natural-log
    log-sum-exp of the scaled scores (a view; its last dim has stride 1)."""
    if not q.is_cuda or q.shape[2] == 1:  # cuDNN refuses one position ("s_q = s_kv = 1 is not supported")
        return _torch_fwd(q, k, v, scale)
    out = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False, scale=scale)
    return out[0], out[1][..., 0]


def attention_with_lse_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of the attention whose probabilities are ``exp(scale q.k - lse)`` and whose
    output is ``o``: pass the merged o and lse of a larger softmax to get that softmax's gradients
    through these keys.

    Args:
        do, o: ``(B, Hq, S, P)`` with the same strides as q; lse ``(B, Hq, S)`` fp32 contiguous.
    """
    if not q.is_cuda or q.shape[2] == 1:
        return _torch_bwd(do, q, k, v, o, lse, scale)
    length = q.shape[2]
    seed = torch.empty((), dtype=torch.int64, device=q.device)
    return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        do, q, k, v, o, lse[..., None], seed, seed, None, None, None, length, k.shape[2], 0.0, True, scale=scale
    )


def _scores(q: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """fp32 causal scores ``(B, Hq, S, S)`` against ``keys`` repeated to the query heads, -inf
    above the diagonal."""
    s = q.float() @ keys.transpose(-1, -2) * scale
    causal = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril()
    return s.masked_fill(~causal, float("-inf"))


def _to_query_heads(x: torch.Tensor, query_heads: int) -> torch.Tensor:
    """``(B, Hk, S, P)`` keys or values repeated to ``(B, query_heads, S, P)`` fp32."""
    return x.float().repeat_interleave(query_heads // x.shape[1], dim=1)


def _group_sum(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Sum ``(B, Hq, S, P)`` over the query heads of each key head: ``(B, heads, S, P)``."""
    return x.unflatten(1, (heads, -1)).sum(2)


def _torch_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    s = _scores(q, _to_query_heads(k, q.shape[1]), scale)
    lse = torch.logsumexp(s, dim=-1)
    o = torch.exp(s - lse[..., None]) @ _to_query_heads(v, q.shape[1])
    return o.to(q.dtype), lse


def _torch_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    heads = k.shape[1]
    keys, values = _to_query_heads(k, q.shape[1]), _to_query_heads(v, q.shape[1])
    p = torch.exp(_scores(q, keys, scale) - lse[..., None].float())
    do32 = do.float()
    delta = (do32 * o.float()).sum(-1, keepdim=True)
    ds = p * (do32 @ values.transpose(-1, -2) - delta)
    dq = ds @ keys * scale
    dk = _group_sum(ds.transpose(-1, -2) @ q.float(), heads) * scale
    dv = _group_sum(p.transpose(-1, -2) @ do32, heads)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
