"""Layer benchmark: one RAT layer against attention and the floor parts, forward+backward.

The configuration of the kernels issue: d_model 2048, 16 heads of 128, G=2, L=16, bf16,
262,144 tokens per step, T in {4K, 16K, 64K, 128K}. Times are medians of
``triton.testing.do_bench`` (warm-up excluded). Run on a GPU:

    python -m rat_lightning.bench.layer docs/benchmarks/layer.json
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

from rat_lightning.layers import RAT, Attention


def _time(
    fn: Callable[[], object], warmup: int = 10, rep: int = 50, grad_to_none: list[torch.Tensor] | None = None
) -> float:
    """Median ms of ``fn``; the ``.grad`` of ``grad_to_none`` is reset before each call, so a
    backward writes the gradients instead of adding to the last call's (an add that is the
    harness's, not the layer's: 1.1 ms per step for x.grad at 262K tokens x 2048)."""
    import triton.testing

    return float(
        triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median")
    )


def _fwd_bwd(module: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    # The upstream gradient is made once: a fill per call would be timed with the layer.
    grad = torch.ones_like(x)

    def run() -> None:
        module(x).backward(grad)

    return run


def _forward(module: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            module(x)

    return run


def bench_layer(
    tokens: int = 262_144,
    d_model: int = 2048,
    heads: int = 16,
    groups: int = 2,
    chunk_size: int = 16,
    seq_lens: tuple[int, ...] = (4096, 16384, 65536, 131072),
    dtype: torch.dtype = torch.bfloat16,
    reference_max_len: int = 16384,
    baselines: bool = True,
    rat_backends: tuple[str, ...] = ("auto",),
) -> list[dict]:
    """Time RAT (default backend), RAT reference under torch.compile, attention, and the floor parts.

    Args:
        reference_max_len: longest T at which the compiled reference is timed.
        baselines: also time the attention layer and the compiled reference (else RAT and the floors).
        rat_backends: the RAT layer's backends to time, one variant each: ``"rat"`` for "auto",
            ``"rat_<backend>"`` for the others (e.g. "triton": the Triton kernels without cuDNN).

    Returns:
        One dict per (T, variant) with ``fwd_bwd_ms`` and ``fwd_ms``.
    """
    device = torch.device("cuda")
    rows = []
    for length in seq_lens:
        batch = tokens // length
        x = torch.randn(batch, length, d_model, device=device, dtype=dtype, requires_grad=True)
        rat = RAT(d_model, heads, groups, chunk_size).to(device, dtype)
        attention = Attention(d_model, heads).to(device, dtype)
        variants: dict[str, torch.nn.Module] = {}
        for backend in rat_backends:
            layer = RAT(d_model, heads, groups, chunk_size, backend=backend).to(device, dtype)
            layer.load_state_dict(rat.state_dict())
            variants["rat" if backend == "auto" else f"rat_{backend}"] = layer
        if baselines:
            variants["attention_sdpa"] = attention
        # The reference materialises T x T/L scores: past 16K they no longer fit in memory.
        if baselines and length <= reference_max_len:
            reference = RAT(d_model, heads, groups, chunk_size, backend="reference").to(device, dtype)
            reference.load_state_dict(rat.state_dict())
            variants["rat_reference_compiled"] = torch.compile(reference)
        for name, module in variants.items():
            try:
                fwd_bwd = _time(_fwd_bwd(module, x), grad_to_none=[x, *module.parameters()])
                fwd = _time(_forward(module, x))
            except torch.OutOfMemoryError:
                fwd_bwd = fwd = float("nan")
            x.grad = None
            torch.cuda.empty_cache()
            rows.append({"T": length, "batch": batch, "variant": name, "fwd_bwd_ms": fwd_bwd, "fwd_ms": fwd})
        # Floor parts: the projections alone, and flash SDPA over T/L keys (causal half).
        w_in = torch.randn(rat.w_in.weight.shape, device=device, dtype=dtype, requires_grad=True)
        w_out = torch.randn(d_model, d_model, device=device, dtype=dtype, requires_grad=True)

        def projections(backward: bool = True) -> None:
            out = F.linear(F.linear(x, w_in)[..., :d_model], w_out)
            if backward:
                out.sum().backward()

        def projections_forward() -> None:
            with torch.no_grad():
                projections(backward=False)

        rows.append({"T": length, "batch": batch, "variant": "floor_projections",
                     "fwd_bwd_ms": _time(projections, grad_to_none=[x, w_in, w_out]),
                     "fwd_ms": _time(projections_forward)})  # fmt: skip
        chunks = length // chunk_size
        q = torch.randn(batch, heads, chunks, d_model // heads, device=device, dtype=dtype, requires_grad=True)

        def summaries() -> None:
            F.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()

        def summaries_forward() -> None:
            with torch.no_grad():
                F.scaled_dot_product_attention(q, q, q, is_causal=True)

        # T/L queries against T/L keys scaled by L queries per chunk: the same FLOPs as T
        # queries against T/L keys with the causal half. Forward times give the prefill floor.
        rows.append({"T": length, "batch": batch, "variant": "floor_chunk_attention",
                     "fwd_bwd_ms": _time(summaries, grad_to_none=[q]) * chunk_size,
                     "fwd_ms": _time(summaries_forward) * chunk_size})  # fmt: skip
        del x, q, w_in, w_out, variants, rat, attention
        torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> None:
    """Print the table and write JSON to ``argv[0]`` if given; ``--no-baselines`` times RAT and the
    floors only; ``--rat-backends auto,triton`` times the RAT layer with each backend."""
    argv = sys.argv[1:] if argv is None else argv
    baselines = "--no-baselines" not in argv
    argv = [arg for arg in argv if arg != "--no-baselines"]
    backends = ("auto",)
    if "--rat-backends" in argv:
        at = argv.index("--rat-backends")
        backends = tuple(argv[at + 1].split(","))
        del argv[at : at + 2]
    rows = bench_layer(baselines=baselines, rat_backends=backends)
    for row in rows:
        fwd = row.get("fwd_ms", float("nan"))
        print(f"{row['T']:>7} {row['variant']:<26} fwd+bwd {row['fwd_bwd_ms']:8.2f} ms  fwd {fwd:8.2f} ms")
    if argv:
        with open(argv[0], "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
