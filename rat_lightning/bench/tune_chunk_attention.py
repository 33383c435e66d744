"""Sweep the chunk-attention kernels' tiles on a GPU, one kernel at a time.

    python -m rat_lightning.bench.tune_chunk_attention docs/benchmarks/chunk_attention_tiles_h100.json

At the benchmark shape (16 heads of 128 with 2 query groups and the output gate, as in the RAT
layer; L = 16, bf16, 262,144 tokens) and each T, times the
forward kernel under every forward tile, and the backward (both kernels) under every dq tile
with the default dkv tile and every dkv tile with the default dq tile. Tiles that do not
compile (shared memory, registers) are recorded as NaN. The winners go into
``ops/chunk_attention/triton.py:CONFIGS``.
"""

from __future__ import annotations

import itertools
import sys

import torch
import triton
import triton.testing

from rat_lightning.bench.report import write_report
from rat_lightning.ops.chunk_attention.triton import KernelConfig, _config, chunk_attention_bwd, chunk_attention_fwd

_STAGES = (2, 3)
_WARPS = (4, 8)


def candidates(kernel: str, chunks: int) -> list[KernelConfig]:
    """The tiles tried for ``kernel`` in {"fwd", "dq", "dkv"}, the current default at ``chunks`` first.

    The A operand of the second dot puts the warps along its rows, so dq keeps
    block_m >= 16 * warps and dkv block_n >= 16 * warps (smaller ones spill).
    """
    if kernel == "fwd":
        tiles = [(m, n) for m, n in itertools.product((64, 128), (32, 64, 128)) if not (m == 64 and n == 128)]
    elif kernel == "dq":
        tiles = list(itertools.product((64, 128), (32, 64)))
    else:
        tiles = list(itertools.product((32, 64), (64, 128)))
    configs = [_config(kernel, torch.bfloat16, chunks)]
    for (block_m, block_n), warps, stages in itertools.product(tiles, _WARPS, _STAGES):
        rows = block_m if kernel == "dq" else block_n if kernel == "dkv" else 16 * warps
        if rows >= 16 * warps and KernelConfig(block_m, block_n, warps, stages) not in configs:
            configs.append(KernelConfig(block_m, block_n, warps, stages))
    return configs


def _bench(fn) -> float:
    try:
        return float(triton.testing.do_bench(fn, warmup=5, rep=60, return_mode="median"))
    except (triton.runtime.errors.OutOfResources, RuntimeError) as error:
        print(f"    skipped: {type(error).__name__}: {str(error)[:80]}", file=sys.stderr)
        return float("nan")


def sweep(seq_lens: tuple[int, ...] = (4096, 16384, 131072), tokens: int = 262_144, heads: int = 16,
          groups: int = 2, head_dim: int = 128, chunk_size: int = 16) -> list[dict]:
    """Rows ``{"T", "kernel", "config", "ms"}``: fwd rows time the forward, dq / dkv rows the backward."""
    rows = []
    scale = head_dim**-0.5
    for length in seq_lens:
        batch = tokens // length
        k, v, do, gate = (torch.randn(batch, length, heads, head_dim, device="cuda", dtype=torch.bfloat16)
                          for _ in range(4))  # fmt: skip
        q = torch.randn(batch, length, groups, head_dim, device="cuda", dtype=torch.bfloat16)
        o, lse = chunk_attention_fwd(q, k, v, chunk_size, 10000.0, scale, gate)
        for kernel in ("fwd", "dq", "dkv"):
            for config in candidates(kernel, length // chunk_size):
                if kernel == "fwd":
                    def run(config=config):
                        return chunk_attention_fwd(q, k, v, chunk_size, 10000.0, scale, gate, config)
                else:
                    tiles = {"config_dq" if kernel == "dq" else "config_dkv": config}

                    def run(tiles=tiles):
                        return chunk_attention_bwd(do, q, k, v, o, lse, chunk_size, 10000.0, scale, gate, **tiles)
                ms = _bench(run)
                rows.append({"T": length, "kernel": kernel, "config": list(config), "ms": ms})
                print(f"T={length:>6} {kernel:<4} {tuple(config)} {ms:8.3f} ms", flush=True)
    return rows


if __name__ == "__main__":
    results = sweep()
    for length in sorted({row["T"] for row in results}):
        for kernel in ("fwd", "dq", "dkv"):
            timed = [row for row in results if (row["T"], row["kernel"]) == (length, kernel) and row["ms"] == row["ms"]]
            best = min(timed, key=lambda row: row["ms"])
            default = timed[0]
            print(f"T={length} {kernel}: default {default['config']} {default['ms']:.3f} ms, best {best['config']} "
                  f"{best['ms']:.3f} ms")  # fmt: skip
    if len(sys.argv) > 1:
        write_report(sys.argv[1], {"rows": results})
