"""Chunk-attention benchmark: the Triton kernels against SDPA floors.

RAT's inter-chunk attention at the configuration of the kernels issue: 16 heads of 128 with
G = 2 query groups and the output gate (the RAT layer's call), L = 16, bf16, 262,144 tokens per
step, T in {4K, 16K, 64K, 128K} (batch = tokens / T). For each T the Triton op is first checked
against the reference on a slice that fits (batch 1, the heads of as many query groups as keep
the reference's (T, T / L) fp32 scores near 4 GB), then timed; times are medians of
``triton.testing.do_bench``. Run on a GPU:

    python -m rat_lightning.bench.chunk_attention docs/benchmarks/chunk_attention.json

The floors are SDPA with flash (``SDPBackend.FLASH_ATTENTION``) and with cuDNN
(``CUDNN_ATTENTION``, Hopper's fastest fused attention in torch, the floor the kernels issue
quotes) doing the same work without RoPE, the own state and the gate: the queries regrouped by
their offset i in the chunk into (B, H * L, C, P) (query c of group i is token cL + i), the C
summaries as keys and values (B, H, C, P) shared by the L groups of a head (GQA), causal. Query
c then attends to keys j <= c, one more than ours (j < c), so the floor has the same FLOPs up to
a 1/C term. SDPA has no block mask for T queries against C keys (its causal mask aligns the two
sequences at the top left), hence the regrouping. Where a kernel refuses GQA the keys are
repeated per group instead (``floor_keys`` says which). The regrouping copies are outside the
timed region.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

from rat_lightning.bench.report import write_report
from rat_lightning.bench.timing import median_ms
from rat_lightning.ops.chunk_attention import chunk_attention
from rat_lightning.ops.chunk_attention.reference import chunk_attention_reference


def _time(fn: Callable[[], object], device: torch.device) -> float:
    return median_ms(fn, device, warmup=10, rep=50)


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp(min=1e-30)).item()


def check_against_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor, chunk_size: int, max_scores: int = 2**30
) -> dict[str, float]:
    """Relative errors of the Triton output and gradients on a slice of (q, k, v, gate).

    Args:
        q: ``(B, T, G, P)`` queries; k, v, gate: ``(B, T, H, P)``.
        chunk_size: L.
        max_scores: the slice keeps batch 1 and as many heads (whole query groups where they fit,
            at least one head) as keep the reference's scores within ``max_scores``.

    Returns:
        ``{"out", "dq", "dk", "dv", "dgate"}``, each ``||a - e|| / ||e||`` against the fp32 reference
        at the same (rounded) inputs under one random upstream gradient.
    """
    length, heads, groups = k.shape[1], k.shape[2], q.shape[2]
    per_group = heads // groups
    keep = max(1, min(heads, max_scores // max(1, length * (length // chunk_size))))
    # Whole groups where they fit, else part of the first group's heads (still one query group).
    keep = keep // per_group * per_group or keep
    leaves = [q[:1, :, : -(-keep // per_group)]] + [x[:1, :, :keep] for x in (k, v, gate)]
    leaves = [x.detach().clone().requires_grad_() for x in leaves]
    out = chunk_attention(*leaves[:3], chunk_size, gate=leaves[3], backend="triton")
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad)
    expected_leaves = [x.detach().float().requires_grad_() for x in leaves]
    expected = chunk_attention_reference(*expected_leaves[:3], chunk_size, gate=expected_leaves[3])
    expected_grads = torch.autograd.grad(expected, expected_leaves, grad.float())
    errors = {"out": _relative_error(out, expected)}
    for name, actual, reference in zip(("dq", "dk", "dv", "dgate"), grads, expected_grads):
        errors[name] = _relative_error(actual, reference)
    return errors


def _sdpa_floor(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_size: int, kernel: str = "FLASH_ATTENTION"
) -> tuple[dict, str]:
    """fwd and fwd+bwd times of the SDPA floor (see the module docstring) with one SDPA ``kernel``
    (an ``SDPBackend`` name: flash, or cuDNN, whose fused attention is faster on Hopper)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    batch, length, heads, dim = q.shape
    chunks = length // chunk_size
    # (B, C, L, H, P) -> (B, H, L, C, P) -> (B, H * L, C, P): group h * L + i holds offset i of head h.
    queries = q[:, : chunks * chunk_size].reshape(batch, chunks, chunk_size, heads, dim)
    queries = queries.permute(0, 3, 2, 1, 4).reshape(batch, heads * chunk_size, chunks, dim).contiguous()
    keys = k[:, chunk_size - 1 :: chunk_size][:, :chunks].transpose(1, 2).contiguous()
    values = v[:, chunk_size - 1 :: chunk_size][:, :chunks].transpose(1, 2).contiguous()
    queries.requires_grad_()
    keys.requires_grad_()
    values.requires_grad_()
    grad = torch.randn_like(queries)

    def attend(keys_: torch.Tensor, values_: torch.Tensor, gqa: bool) -> torch.Tensor:
        with sdpa_kernel(getattr(SDPBackend, kernel)):
            return F.scaled_dot_product_attention(queries, keys_, values_, is_causal=True, enable_gqa=gqa)

    try:
        attend(keys, values, True)
        key_mode, floor_keys, floor_values, gqa = "gqa", keys, values, True
    except RuntimeError:
        floor_keys = keys.detach().repeat_interleave(chunk_size, dim=1).requires_grad_()
        floor_values = values.detach().repeat_interleave(chunk_size, dim=1).requires_grad_()
        key_mode, gqa = "repeated", False

    def forward() -> None:
        with torch.no_grad():
            attend(floor_keys, floor_values, gqa)

    def forward_backward() -> None:
        out = attend(floor_keys, floor_values, gqa)
        torch.autograd.grad(out, (queries, floor_keys, floor_values), grad)

    return {"fwd_ms": _time(forward, q.device), "fwd_bwd_ms": _time(forward_backward, q.device)}, key_mode


def bench_chunk_attention(
    tokens: int = 262_144,
    heads: int = 16,
    groups: int = 2,
    head_dim: int = 128,
    chunk_size: int = 16,
    seq_lens: tuple[int, ...] = (4096, 16384, 65536, 131072),
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cuda",
) -> list[dict]:
    """Check and time the Triton chunk attention and the flash floor at each sequence length.

    Args:
        tokens: batch * T per step.
        heads, groups, head_dim: H, query groups G and P.
        chunk_size: L.
        seq_lens: the values of T (each a multiple of L dividing ``tokens``).
        dtype: input dtype.
        device: where to run (a CPU run is a smoke test: the kernels run under TRITON_INTERPRET=1,
            and the SDPA floors, which need CUDA kernels, report NaN).

    Returns:
        One dict per (T, variant) with ``T``, ``batch``, ``variant`` (``"triton"`` or
        ``"flash_floor"``), ``fwd_ms``, ``fwd_bwd_ms``, ``fwd_tflops`` (the model FLOPs of the
        inter-chunk products, 4 * B * H * P * sum_t c(t), over the forward time), and for
        ``"triton"`` the check errors, for ``"flash_floor"`` ``floor_keys``.
    """
    device = torch.device(device)
    return [row for length in seq_lens for row in _bench_length(length, tokens // length, heads, groups, head_dim,
                                                                  chunk_size, dtype, device)]  # fmt: skip


def _time_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor, chunk_size: int
) -> tuple[float, float]:
    """Forward and forward+backward ms of the Triton chunk attention (random upstream gradient)."""
    leaves = [x.detach().requires_grad_() for x in (q, k, v, gate)]
    grad = torch.randn_like(k)

    def forward() -> None:
        with torch.no_grad():
            chunk_attention(q, k, v, chunk_size, gate=gate, backend="triton")

    def forward_backward() -> None:
        out = chunk_attention(*leaves[:3], chunk_size, gate=leaves[3], backend="triton")
        torch.autograd.grad(out, leaves, grad)

    return _time(forward, q.device), _time(forward_backward, q.device)


def _bench_length(
    length: int, batch: int, heads: int, groups: int, head_dim: int, chunk_size: int, dtype: torch.dtype,
    device: torch.device,
) -> list[dict]:  # fmt: skip
    """The rows of :func:`bench_chunk_attention` at one T; its tensors are freed on return."""
    k, v, gate = (torch.randn(batch, length, heads, head_dim, device=device, dtype=dtype) for _ in range(3))
    q = torch.randn(batch, length, groups, head_dim, device=device, dtype=dtype)
    errors = check_against_reference(q, k, v, gate, chunk_size)
    torch.cuda.empty_cache()
    chunks = length // chunk_size
    # sum over t of c(t) = L * C (C - 1) / 2 plus the tail of a partial last chunk.
    visible = chunk_size * chunks * (chunks - 1) // 2 + (length - chunks * chunk_size) * chunks
    flops = 4 * batch * heads * head_dim * visible
    fwd, fwd_bwd = _time_triton(q, k, v, gate, chunk_size)
    rows = [{
        "T": length, "batch": batch, "variant": "triton", "fwd_ms": fwd, "fwd_bwd_ms": fwd_bwd,
        "fwd_tflops": flops / fwd / 1e9, "check_rel_err": errors,
    }]  # fmt: skip
    torch.cuda.empty_cache()
    # The floor's queries are per head (k stands in): the same FLOPs as our grouped ones.
    for variant, kernel in (("flash_floor", "FLASH_ATTENTION"), ("cudnn_floor", "CUDNN_ATTENTION")):
        try:
            floor, key_mode = _sdpa_floor(k, k, v, chunk_size, kernel)
        except (RuntimeError, torch.OutOfMemoryError) as error:
            floor, key_mode = {"fwd_ms": float("nan"), "fwd_bwd_ms": float("nan")}, f"failed: {error}"[:200]
        torch.cuda.empty_cache()
        rows.append({
            "T": length, "batch": batch, "variant": variant, **floor,
            "fwd_tflops": flops / floor["fwd_ms"] / 1e9, "floor_keys": key_mode,
        })  # fmt: skip
    return rows


def _table(rows: list[dict]) -> str:
    header = f"{'T':>7} {'batch':>5} {'variant':<12} {'fwd ms':>9} {'fwd+bwd ms':>11} {'fwd TFLOP/s':>12}"
    lines = [header + "  check / keys"]
    for row in rows:
        if "check_rel_err" in row:
            note = " ".join(f"{name}={error:.1e}" for name, error in row["check_rel_err"].items())
        else:
            note = row["floor_keys"]
        lines.append(
            f"{row['T']:>7} {row['batch']:>5} {row['variant']:<12} {row['fwd_ms']:>9.3f} {row['fwd_bwd_ms']:>11.3f} "
            f"{row['fwd_tflops']:>12.1f}  {note}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    results = bench_chunk_attention()
    print(_table(results))
    if len(sys.argv) > 1:
        write_report(sys.argv[1], {"rows": results})
