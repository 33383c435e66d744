"""Sweep the chunk-attention kernels' tiles on a GPU, one kernel at a time.

    python -m rat_lightning.bench.tune_chunk_attention docs/benchmarks/chunk_attention_tiles_h100.json
    python -m rat_lightning.bench.tune_chunk_attention out.json --quick --seq-lens 4096 131072

At the benchmark shape (16 heads of 128 with 2 query groups and the output gate, as in the RAT
layer; L = 16, bf16, 262,144 tokens) and each T, times the
forward kernel under every forward tile, and the backward (both kernels, in the factored form
the RAT layer runs: :func:`chunk_attention_bwd_factored`) under every dq tile with the default
dkv tile and every dkv tile with the default dq tile. Tiles that do not
compile (shared memory, registers) are recorded as NaN. ``--quick`` tries only the current
default and a few other tiles. The default is timed first and again last, to show the drift of the GPU's clocks
over the sweep (on an H100 a config timed right after another ran up to 10% slower: confirm a
winner by an A/B in alternating order before moving a default). The winners go into
``ops/chunk_attention/triton.py:CONFIGS``.
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch
import triton
import triton.testing

from rat_lightning.bench.report import write_report
from rat_lightning.ops.chunk_attention.triton import (
    KernelConfig,
    _config,
    chunk_attention_bwd_factored,
    chunk_attention_fwd,
)

_STAGES = (2, 3)
_WARPS = (4, 8)
# --quick: (block_m, block_n, warps, stages) per kernel, tried beside the default.
_QUICK = {
    "fwd": [(64, 32, 4, 2), (128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3)],
    "dq": [(64, 32, 4, 3), (64, 32, 4, 2), (64, 64, 4, 3), (128, 32, 8, 3), (128, 64, 8, 2), (128, 64, 8, 3),
           (128, 128, 8, 2)],
    "dkv": [(64, 128, 8, 2), (64, 128, 8, 3), (128, 128, 8, 2)],
}


def candidates(kernel: str, chunks: int, quick: bool = False) -> list[KernelConfig]:
    """The tiles tried for ``kernel`` in {"fwd", "dq", "dkv"}, the current default at ``chunks`` first.

    The A operand of the second dot puts the warps along its rows, so dq keeps
    block_m >= 16 * warps and dkv block_n >= 16 * warps (smaller ones spill).
    """
    default = _config(kernel, torch.bfloat16, chunks)
    if quick:
        configs = [KernelConfig(*tile) for tile in _QUICK[kernel]]
        return [default] + [c for i, c in enumerate(configs) if c != default and c not in configs[:i]]
    if kernel == "fwd":
        tiles = [(m, n) for m, n in itertools.product((64, 128), (32, 64, 128)) if not (m == 64 and n == 128)]
    elif kernel == "dq":
        tiles = list(itertools.product((64, 128), (32, 64)))
    else:
        tiles = list(itertools.product((32, 64), (64, 128)))
    configs = [default]
    for (block_m, block_n), warps, stages in itertools.product(tiles, _WARPS, _STAGES):
        rows = block_m if kernel == "dq" else block_n if kernel == "dkv" else 16 * warps
        config = KernelConfig(block_m, block_n, warps, stages)
        if rows >= 16 * warps and config not in configs:
            configs.append(config)
    return configs


def _bench(fn) -> float:
    try:
        return float(triton.testing.do_bench(fn, warmup=5, rep=60, return_mode="median"))
    except (triton.runtime.errors.OutOfResources, RuntimeError) as error:
        print(f"    skipped: {type(error).__name__}: {str(error)[:80]}", file=sys.stderr)
        return float("nan")


def sweep(seq_lens: tuple[int, ...] = (4096, 16384, 131072), tokens: int = 262_144, heads: int = 16,
          groups: int = 2, head_dim: int = 128, chunk_size: int = 16, quick: bool = False,
          kernels: tuple[str, ...] = ("fwd", "dq", "dkv")) -> list[dict]:
    """Rows ``{"T", "kernel", "config", "ms", "max_diff"}``: fwd rows time the forward, dq / dkv rows
    the backward; max_diff is the largest difference of the outputs from the default config's."""
    rows = []
    scale = head_dim**-0.5
    for length in seq_lens:
        batch = tokens // length
        k, v, do, gate = (torch.randn(batch, length, heads, head_dim, device="cuda", dtype=torch.bfloat16)
                          for _ in range(4))  # fmt: skip
        q = torch.randn(batch, length, groups, head_dim, device="cuda", dtype=torch.bfloat16)
        o, lse = chunk_attention_fwd(q, k, v, chunk_size, 10000.0, scale, gate)
        for kernel in kernels:
            expected = None
            configs = candidates(kernel, length // chunk_size, quick)
            # The default again at the end: clocks drift under sustained load (a later run of the
            # same config measured up to 10% slower on an H100), so the two bracket the sweep's drift.
            for config in [*configs, configs[0]]:
                if kernel == "fwd":
                    def run(config=config):
                        return chunk_attention_fwd(q, k, v, chunk_size, 10000.0, scale, gate, config)
                else:
                    tiles = {"config_dq" if kernel == "dq" else "config_dkv": config}

                    def run(tiles=tiles):
                        dq, dgate, state_grads = chunk_attention_bwd_factored(
                            do, q, k, v, o, lse, chunk_size, 10000.0, scale, gate, **tiles
                        )
                        return dq, dgate, *state_grads[2:]
                ms = _bench(run)
                diff = float("nan")
                if ms == ms:
                    outputs = run()
                    expected = outputs if expected is None else expected
                    diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(outputs, expected))
                rows.append({"T": length, "kernel": kernel, "config": list(config), "ms": ms, "max_diff": diff})
                print(f"T={length:>6} {kernel:<4} {tuple(config)} {ms:8.3f} ms  max diff {diff:.2e}", flush=True)
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", nargs="?", help="JSON file to write")
    parser.add_argument("--seq-lens", nargs="+", type=int, default=[4096, 16384, 131072])
    parser.add_argument("--quick", action="store_true", help="the default and a few large tiles only")
    parser.add_argument("--kernels", nargs="+", default=["fwd", "dq", "dkv"], choices=["fwd", "dq", "dkv"])
    args = parser.parse_args()
    results = sweep(tuple(args.seq_lens), quick=args.quick, kernels=tuple(args.kernels))
    for length in sorted({row["T"] for row in results}):
        for kernel in args.kernels:
            timed = [row for row in results if (row["T"], row["kernel"]) == (length, kernel) and row["ms"] == row["ms"]]
            best = min(timed, key=lambda row: row["ms"])
            default, again = timed[0], timed[-1]
            print(f"T={length} {kernel}: default {default['config']} {default['ms']:.3f} ms ({again['ms']:.3f} ms "
                  f"again at the end), best {best['config']} {best['ms']:.3f} ms")  # fmt: skip
    if args.output:
        write_report(args.output, {"rows": results})
