"""Where one RAT layer's forward+backward time goes: CUDA kernel times by kernel, on a GPU.

    python -m rat_lightning.bench.layer_profile docs/benchmarks/layer_profile.json

Profiles ``iterations`` forward+backward passes of the layer of the kernels issue (d_model 2048,
16 heads of 128, G=2, L=16, bf16, 262,144 tokens) at each T with ``torch.profiler`` and reports
each kernel's mean time per pass, grouped into the projection GEMMs, our Triton kernels and the
rest (the elementwise glue: splits, repeats, the output gate, the gradient concat).
:func:`profile_kernels` profiles any step this way (``bench train_throughput --profile`` uses it).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

from rat_lightning.bench.report import write_report
from rat_lightning.layers import RAT


def _group(name: str) -> str:
    """The kernel's kind: projection/head GEMMs, our Triton kernels, torch.compile's fused kernels,
    the optimizer, the eager loss, or other (elementwise glue)."""
    lowered = name.lower()
    if any(tag in lowered for tag in ("gemm", "nvjet", "cutlass", "sm90_xmma", "cublas")):
        return "gemm"
    if "chunk_attention" in lowered or "recurrence" in lowered:
        return "triton"
    if any(tag in lowered for tag in ("flash", "fmha", "cudnn")):
        return "sdpa"
    if lowered.startswith("triton_"):
        return "inductor"
    if "adam" in lowered or "multi_tensor" in lowered:
        return "optimizer"
    if any(tag in lowered for tag in ("softmax", "nll_loss", "cross_entropy")):
        return "loss"
    return "glue"


def profile_kernels(step: Callable[[], None], iterations: int = 3, warmup: int = 3) -> list[dict]:
    """CUDA kernel rows ``{"kernel", "group", "ms", "calls"}`` per call of ``step``, slowest first
    (none without CUDA: a CPU smoke run gets an empty list)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    sync()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(iterations):
            step()
        sync()
    rows = []
    for event in prof.key_averages():
        total_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if total_us <= 0 or event.key.startswith(("ProfilerStep", "cuda")):
            continue
        rows.append({
            "kernel": event.key[:120], "group": _group(event.key), "ms": total_us / 1e3 / iterations,
            "calls": event.count / iterations,
        })  # fmt: skip
    return sorted(rows, key=lambda row: -row["ms"])


def group_totals(rows: list[dict]) -> dict[str, float]:
    """Milliseconds per kernel group of :func:`profile_kernels` rows."""
    totals: dict[str, float] = {}
    for row in rows:
        totals[row["group"]] = totals.get(row["group"], 0.0) + row["ms"]
    return totals


def profile_layer(
    seq_len: int, tokens: int = 262_144, d_model: int = 2048, heads: int = 16, groups: int = 2,
    chunk_size: int = 16, iterations: int = 3,
) -> list[dict]:
    """Kernel rows ``{"T", "kernel", "group", "ms", "calls"}`` per forward+backward pass, slowest first."""
    device = torch.device("cuda")
    layer = RAT(d_model, heads, groups, chunk_size).to(device, torch.bfloat16)
    x = torch.randn(tokens // seq_len, seq_len, d_model, device=device, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(x)

    def step() -> None:
        # As in ``bench layer``: each backward writes the gradients (no add into the last step's).
        x.grad = None
        layer.zero_grad(set_to_none=True)
        layer(x).backward(grad)

    return [{"T": seq_len, **row} for row in profile_kernels(step, iterations)]


def main(argv: list[str] | None = None) -> None:
    """Print the per-kernel table at T = 4K and 128K; write JSON to ``argv[0]`` if given."""
    argv = sys.argv[1:] if argv is None else argv
    rows = []
    for seq_len in (4096, 131072):
        profiled = profile_layer(seq_len)
        rows += profiled
        totals = group_totals(profiled)
        print(f"T={seq_len}: " + "  ".join(f"{name} {ms:.2f} ms" for name, ms in totals.items()))
        for row in profiled[:25]:
            print(f"  {row['ms']:8.3f} ms  x{row['calls']:<4.0f} {row['group']:<6} {row['kernel']}")
    if argv:
        write_report(argv[0], {"rows": rows})


if __name__ == "__main__":
    main()
