"""Decode benchmark: one layer's attention-side step, RAT's decode kernel against SDPA over a KV cache.

Configuration: d_model 2048, 16 heads of 128, L = 16, contexts T in {4096, 65536}. For each T:

- RAT: ``chunk_attention_step`` (the Triton decode kernel, through the dispatcher) over C = T / L
  chunk summaries (k and v, (B, C, H, P), keys pre-rotated), with bf16 caches (what a bf16
  model's RATCache holds) and fp32 caches (an fp32 model's), at the largest batch whose
  summaries fit in ``--cache-gb`` (64 GB) capped at ``--max-batch`` (4096); the reference step
  (plain PyTorch) at a smaller batch; and both at batch 1 (latency; the kernel splits C over the
  SMs there, flash-decoding style).
- attention: ``F.scaled_dot_product_attention`` with one query (B, H, 1, P) over a bf16 KV cache
  (B, H, T, P), at its largest batch in the same budget and at batch 1; flash and
  memory-efficient backends both timed, the faster one reported.
- check: before timing, the kernel's output for the first sequences of the full batch, and for the
  whole reference batch, against the fp32 reference (max abs error, ``||a - e|| / ||e||``).
- bound: copy bandwidth measured with ``torch.Tensor.copy_`` of a 4 GB buffer ((read + written
  bytes) / time); the HBM bound in tokens/s is bandwidth / (cache bytes read per token: the
  summaries of all H heads for RAT, the T keys and values for attention); ``frac_of_bound`` is the
  measured tokens/s over it. Tokens/s = batch / time per step (one token per sequence).

Times are medians of ``triton.testing.do_bench``. Run on a GPU:

    python -m rat_lightning.bench.decode --out docs/benchmarks/decode_h100.json

``--sweep`` also times the decode kernel's launch configurations at every (T, dtype) for the
full batch and records them (for ``decode.CONFIGS``); it adds a few minutes, so run it
on its own if needed (``--sweep --contexts 65536 --out ...``). ``--smoke`` runs every code path at toy
sizes; without CUDA it sets TRITON_INTERPRET=1 (before triton is imported) and runs the kernel under
the interpreter.
"""

from __future__ import annotations

import argparse
import itertools
import os
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from rat_lightning.bench.report import write_report
from rat_lightning.bench.timing import median_ms
from rat_lightning.ops.chunk_attention import (
    chunk_attention_step,
    chunk_attention_step_reference,
)

CONTEXTS = (4096, 65536)
# Peak temporaries of the reference step: about 6 fp32 copies of the summaries (upcast, rotated
# halves, cos / sin broadcast, rotated keys, fp32 values).
REFERENCE_BUDGET = 8e9
REFERENCE_COPIES = 6
SWEEP = {"block_n": (16, 32, 64, 128), "num_warps": (2, 4, 8), "num_stages": (1, 2)}


def _time(fn: Callable[[], object], device: torch.device) -> float:
    return median_ms(fn, device, warmup=25, rep=200)


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes per second of ``dst.copy_(src)`` on ``nbytes`` (read + written bytes / time)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    ms = _time(lambda: dst.copy_(src), device)
    return 2 * nbytes / (ms * 1e-3)


def _free(device: torch.device) -> None:
    """Return the cached blocks of the last (returned, hence unreferenced) caches to the driver."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _errors(actual: torch.Tensor, expected: torch.Tensor) -> dict[str, float]:
    diff = (actual.double() - expected.double()).abs()
    rel = (diff.norm() / expected.double().norm().clamp(min=1e-30)).item()
    return {"max_abs_err": diff.max().item(), "rel_err": rel}


def _largest_batch(bytes_per_sequence: int, budget: float, cap: int) -> int:
    return max(1, min(cap, int(budget // bytes_per_sequence)))


def _row(kind, context, dtype, batch, ms, bytes_per_token, bandwidth, **extra) -> dict:
    tokens_per_s = batch / (ms * 1e-3)
    bound = bandwidth / bytes_per_token
    return {
        "kind": kind, "context": context, "dtype": str(dtype).removeprefix("torch."), "batch": batch, "ms": ms,
        "tokens_per_s": tokens_per_s, "cache_bytes_per_token": bytes_per_token, "bound_tokens_per_s": bound,
        "frac_of_bound": tokens_per_s / bound, **extra,
    }  # fmt: skip


def bench_rat(
    context: int,
    dtype: torch.dtype,
    heads: int,
    head_dim: int,
    chunk_size: int,
    budget: float,
    max_batch: int,
    bandwidth: float,
    device: torch.device,
    sweep: bool = False,
    check_batch: int = 4,
) -> tuple[list[dict], list[dict]]:
    """Rows for RAT's step at one context and cache dtype: kernel (full batch, batch 1), reference.

    Returns:
        ``(rows, sweep_rows)``; each row has ``check`` (errors against the fp32 reference).
    """
    from triton.runtime.errors import OutOfResources

    from rat_lightning.ops.chunk_attention import decode

    chunks = context // chunk_size
    bytes_per_token = 2 * chunks * heads * head_dim * torch.finfo(dtype).bits // 8
    batch = _largest_batch(bytes_per_token, budget, max_batch)
    k_chunks, v_chunks = (torch.randn(batch, chunks, heads, head_dim, device=device, dtype=dtype) for _ in range(2))
    # The live token: query (bf16, as the projection gives it) and the fp32 running states.
    q = torch.randn(batch, heads, head_dim, device=device).to(torch.bfloat16)
    k_own, v_own = (torch.randn(batch, heads, head_dim, device=device) for _ in range(2))
    fp32_per_sequence = chunks * heads * head_dim * 4
    ref_batch = max(1, min(batch, int(REFERENCE_BUDGET // (REFERENCE_COPIES * fp32_per_sequence))))

    def inputs(n: int) -> tuple[torch.Tensor, ...]:
        return q[:n], k_own[:n], v_own[:n], k_chunks[:n], v_chunks[:n]

    def kernel(n: int) -> Callable[[], torch.Tensor]:
        args = inputs(n)
        return lambda: chunk_attention_step(*args, backend="triton")

    def reference(n: int) -> Callable[[], torch.Tensor]:
        args = inputs(n)
        return lambda: chunk_attention_step_reference(*args)

    with torch.no_grad():
        full = kernel(batch)()[:check_batch]
        expected = reference(min(check_batch, batch))()
        check_full = _errors(full, expected)
        del full, expected
        expected = reference(ref_batch)()
        check_ref = _errors(kernel(ref_batch)(), expected)
        check_one = _errors(kernel(1)(), expected[:1])
        del expected
        config = decode.CONFIGS["decode_fp32" if dtype == torch.float32 else "decode"]
        sms = decode._sm_count(device)
        splits = {
            n: decode.num_splits(n * heads, chunks, config.block_n, sms, config.num_warps)
            for n in (batch, ref_batch, 1)
        }
        common = {"chunks": chunks, "heads": heads, "head_dim": head_dim}
        rows = [
            _row("rat_kernel", context, dtype, batch, _time(kernel(batch), device), bytes_per_token, bandwidth,
                 splits=splits[batch], check=check_full, **common),
        ]  # fmt: skip
        # The reference's batch, then batch 1 (latency), each skipped where it repeats a batch above.
        for n, check in ((ref_batch, check_ref), (1, check_one)):
            if n != batch and (n == ref_batch or ref_batch != 1):
                rows.append(_row("rat_kernel", context, dtype, n, _time(kernel(n), device), bytes_per_token,
                                 bandwidth, splits=splits[n], check=check, **common))  # fmt: skip
            if n == ref_batch or ref_batch != 1:
                rows.append(_row("rat_reference", context, dtype, n, _time(reference(n), device), bytes_per_token,
                                 bandwidth, check=None, **common))  # fmt: skip
        sweep_rows = []
        if sweep:
            for n in (batch,):
                args = inputs(n)
                scale = head_dim**-0.5
                for block_n, warps, stages in itertools.product(*SWEEP.values()):
                    config = decode.DecodeConfig(block_n, warps, stages)

                    def run(config=config, args=args, scale=scale) -> torch.Tensor:
                        return decode.chunk_attention_decode(*args, 10000.0, scale, config=config)

                    try:
                        ms = median_ms(run, device, warmup=5, rep=50)
                    except OutOfResources as error:  # a config that does not fit is a result, not a failure
                        sweep_rows.append({"context": context, "dtype": str(dtype).removeprefix("torch."), "batch": n,
                                           "config": config._asdict(), "error": str(error)[:200]})  # fmt: skip
                        continue
                    sweep_rows.append({
                        "context": context, "dtype": str(dtype).removeprefix("torch."), "batch": n,
                        "config": config._asdict(), "ms": ms, "tokens_per_s": n / (ms * 1e-3),
                        "frac_of_bound": n / (ms * 1e-3) / (bandwidth / bytes_per_token),
                    })  # fmt: skip
    return rows, sweep_rows


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str | None) -> Callable[[], torch.Tensor]:
    if backend is None:
        return lambda: F.scaled_dot_product_attention(q, k, v)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    choice = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}[backend]

    def run() -> torch.Tensor:
        with sdpa_kernel(choice):
            return F.scaled_dot_product_attention(q, k, v)

    return run


def bench_attention(
    context: int, heads: int, head_dim: int, budget: float, max_batch: int, bandwidth: float, device: torch.device
) -> list[dict]:
    """Rows for one-query SDPA over a bf16 KV cache of ``context`` entries: largest batch and batch 1."""
    bytes_per_token = 2 * context * heads * head_dim * 2
    batch = _largest_batch(bytes_per_token, budget, max_batch)
    q = torch.randn(batch, heads, 1, head_dim, device=device, dtype=torch.bfloat16)
    k, v = (torch.randn(batch, heads, context, head_dim, device=device, dtype=torch.bfloat16) for _ in range(2))
    rows = []
    with torch.no_grad():
        for n in (batch, 1):
            times, notes = {}, {}
            for backend in ("flash", "efficient") if device.type == "cuda" else (None,):
                try:
                    times[backend or "default"] = _time(_sdpa(q[:n], k[:n], v[:n], backend), device)
                except RuntimeError as error:
                    notes[backend] = str(error)[:200]
            best = min(times, key=times.get)
            rows.append(_row(
                "attention_sdpa", context, torch.bfloat16, n, times[best], bytes_per_token, bandwidth,
                sdpa_backend=best, sdpa_ms=times, sdpa_notes=notes, heads=heads, head_dim=head_dim,
            ))  # fmt: skip
    return rows


def bench_decode(
    contexts: Sequence[int] = CONTEXTS,
    heads: int = 16,
    head_dim: int = 128,
    chunk_size: int = 16,
    budget: float = 64e9,
    max_batch: int = 4096,
    copy_bytes: int = 4 * 2**30,
    device: torch.device | str = "cuda",
    sweep: bool = False,
    dtypes: Sequence[torch.dtype] = (torch.bfloat16, torch.float32),
) -> dict:
    """Bandwidth, then RAT (bf16 and fp32 caches) and attention rows per context.

    Returns:
        ``{"copy_bandwidth_bytes_per_s", "rows", "sweep"}``.
    """
    device = torch.device(device)
    bandwidth = copy_bandwidth(device, copy_bytes)
    rows, sweep_rows = [], []
    for context in contexts:
        for dtype in dtypes:
            new_rows, new_sweep = bench_rat(
                context, dtype, heads, head_dim, chunk_size, budget, max_batch, bandwidth, device, sweep
            )
            rows += new_rows
            sweep_rows += new_sweep
            _free(device)
        rows += bench_attention(context, heads, head_dim, budget, max_batch, bandwidth, device)
        _free(device)
    return {"copy_bandwidth_bytes_per_s": bandwidth, "rows": rows, "sweep": sweep_rows}


def format_table(result: dict) -> str:
    """The rows as a fixed-width text table."""
    lines = [f"copy bandwidth: {result['copy_bandwidth_bytes_per_s'] / 1e9:.0f} GB/s"]
    lines.append(
        f"{'kind':<15} {'T':>6} {'dtype':>8} {'B':>5} {'split':>5} {'ms':>9} {'tokens/s':>10} {'bound':>10} "
        f"{'of bound':>8} {'max abs':>8} {'rel err':>8}"
    )
    for row in result["rows"]:
        check = row.get("check") or {}
        err = f"{check['max_abs_err']:>8.1e} {check['rel_err']:>8.1e}" if check else f"{'-':>8} {'-':>8}"
        lines.append(
            f"{row['kind']:<15} {row['context']:>6} {row['dtype']:>8} {row['batch']:>5} {row.get('splits', '-'):>5} "
            f"{row['ms']:>9.3f} {row['tokens_per_s']:>10.0f} {row['bound_tokens_per_s']:>10.0f} "
            f"{row['frac_of_bound']:>7.0%} {err}"
        )
    if result["sweep"]:
        lines.append("sweep (best 3 per context, dtype, batch):")

        def key(row: dict) -> tuple:
            return row["context"], row["dtype"], row["batch"]

        timed = sorted((r for r in result["sweep"] if "ms" in r), key=lambda r: (*key(r), r["ms"]))
        for group, members in itertools.groupby(timed, key=key):
            best = ", ".join(f"{tuple(m['config'].values())} {m['ms']:.3f} ms" for m in list(members)[:3])
            lines.append(f"  T={group[0]} {group[1]} B={group[2]}: {best}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command line: ``--out``, ``--smoke``, ``--sweep``, ``--contexts``, ``--cache-gb``, ``--max-batch``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="write the rows and the environment as JSON here")
    parser.add_argument(
        "--smoke", action="store_true", help="toy sizes; on CPU the kernel runs under TRITON_INTERPRET=1"
    )
    parser.add_argument("--sweep", action="store_true", help="also time the decode kernel's launch configurations")
    parser.add_argument("--contexts", type=int, nargs="+", default=None, help=f"contexts T (default {CONTEXTS})")
    parser.add_argument("--cache-gb", type=float, default=64.0, help="cache budget per batch choice (GB, 1e9)")
    parser.add_argument("--max-batch", type=int, default=4096, help="batch cap")
    parser.add_argument(
        "--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float16", "float32"],
        help="cache dtypes of the RAT rows",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark from the command line; prints the table, writes ``--out``."""
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if args.smoke:
        if not cuda:
            # Read by triton.jit when the kernel module is imported (on the first Triton call).
            os.environ.setdefault("TRITON_INTERPRET", "1")
        from rat_lightning.ops.chunk_attention import decode

        # Tiles of 4 summaries, so that the toy contexts span several tiles and batch 1 splits C.
        decode.CONFIGS = {name: decode.DecodeConfig(4, 4, 1) for name in decode.CONFIGS}
        sizes = {
            "contexts": args.contexts or (32, 64), "heads": 2, "head_dim": 16, "chunk_size": 4,
            "budget": 2 * 16 * 2 * 16 * 4 * 3, "max_batch": 4, "copy_bytes": 2**20,
        }  # fmt: skip
    elif not cuda:
        raise SystemExit("the benchmark needs a CUDA GPU; use --smoke for a CPU run at toy sizes")
    else:
        sizes = {"contexts": args.contexts or CONTEXTS, "budget": args.cache_gb * 1e9, "max_batch": args.max_batch}
    dtypes = [getattr(torch, name) for name in args.dtypes]
    result = bench_decode(**sizes, device="cuda" if cuda else "cpu", sweep=args.sweep, dtypes=dtypes)
    print(format_table(result))
    if args.out:
        from rat_lightning.ops.chunk_attention import decode

        write_report(args.out, {
            "layer": {"d_model": 2048, "heads": 16, "head_dim": 128, "chunk_size": 16} if not args.smoke else "smoke",
            "sizes": {key: list(value) if key == "contexts" else value for key, value in sizes.items()},
            "configs": {name: config._asdict() for name, config in decode.CONFIGS.items()},
            **result,
        })  # fmt: skip
    return result


if __name__ == "__main__":
    main()
