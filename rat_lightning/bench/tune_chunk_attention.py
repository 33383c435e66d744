"""Sweep the chunk-attention kernels' tiles (block_m, block_n, warps, stages) on a GPU, one kernel at a time.

    python -m rat_lightning.bench.tune_chunk_attention [out.json] [--kernels fwd,dkv,prep,dq] [--groups 2]

At the benchmark shape (16 heads of 128, L = 16, bf16, 262,144 tokens) and T in {4096, 65536},
each kernel's grid of configs is timed with the other kernels at their ``CONFIGS`` defaults:
``fwd`` through :func:`chunk_attention_fwd`, ``prep``, ``dkv`` and ``dq`` through
:func:`chunk_attention_bwd` (the whole backward, so a config's number is the backward's time).
Prints every row, then per kernel and T the best config beside the default, and finally the
forward + backward time with the best configs of T = 65536. The winners go into
``ops/chunk_attention/triton.py:CONFIGS``. ``--groups`` is G, the query groups (2 in the RAT
layer; 16 gives one query per head, as in ``bench/chunk_attention.py``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch
import triton.testing

from rat_lightning.ops.chunk_attention import triton as kernels

# Per kernel: (block_m, block_n, num_warps, num_stages) tried. block_n is unused by prep and dq.
GRID = {
    "fwd": list(itertools.product((64, 128), (32, 64, 128), (4, 8), (1, 2, 3))),
    "dkv": list(itertools.product((16, 32, 64, 128), (32, 64, 128), (4, 8), (1, 2, 3))),
    "prep": list(itertools.product((16, 32, 64, 128), (0,), (2, 4, 8), (1,))),
    "dq": list(itertools.product((32, 64, 128, 256), (0,), (2, 4, 8), (1,))),
}


def _inputs(length: int, tokens: int, heads: int, groups: int, dim: int, chunk_size: int, device: str) -> dict:
    batch = tokens // length
    q = torch.randn(batch, length, groups, dim, device=device, dtype=torch.bfloat16)
    k, v, do = (torch.randn(batch, length, heads, dim, device=device, dtype=torch.bfloat16) for _ in range(3))
    scale = dim**-0.5
    o, lse = kernels.chunk_attention_fwd(q, k, v, chunk_size, 10000.0, scale)
    return {"q": q, "k": k, "v": v, "do": do, "o": o, "lse": lse, "chunk_size": chunk_size, "scale": scale}


def _timer(kernel: str, x: dict, config: kernels.KernelConfig | None):
    if kernel == "fwd":
        return lambda: kernels.chunk_attention_fwd(
            x["q"], x["k"], x["v"], x["chunk_size"], 10000.0, x["scale"], config
        )
    return lambda: kernels.chunk_attention_bwd(
        x["do"], x["q"], x["k"], x["v"], x["o"], x["lse"], x["chunk_size"], 10000.0, x["scale"],
        **{f"config_{kernel}": config},
    )  # fmt: skip


def _bench(fn) -> float:
    try:
        return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))
    except Exception as error:  # a config that does not compile (shared memory, registers) is skipped
        print(f"  skipped: {type(error).__name__}: {str(error)[:120]}", file=sys.stderr)
        return float("nan")


def sweep(
    kernel_names: list[str],
    groups: int = 2,
    lengths: tuple[int, ...] = (4096, 65536),
    tokens: int = 262_144,
    heads: int = 16,
    dim: int = 128,
    chunk_size: int = 16,
    device: str = "cuda",
) -> tuple[list[dict], dict]:
    """Time every config of GRID per kernel and T; returns the rows and the best config per (kernel, T)."""
    rows, best = [], {}
    for length in lengths:
        x = _inputs(length, tokens, heads, groups, dim, chunk_size, device)
        for kernel in kernel_names:
            default = kernels.CONFIGS[kernel]
            default_ms = _bench(_timer(kernel, x, None))
            print(f"T={length} {kernel} default {tuple(default)}: {default_ms:.3f} ms", flush=True)
            scored = [(default_ms, tuple(default))] if default_ms == default_ms else []
            for values in GRID[kernel]:
                config = kernels.KernelConfig(*values)
                ms = _bench(_timer(kernel, x, config))
                rows.append({"T": length, "kernel": kernel, "config": list(values), "ms": ms})
                print(f"T={length} {kernel} {values}: {ms:.3f} ms", flush=True)
                if ms == ms:
                    scored.append((ms, values))
            winner = min(scored) if scored else (float("nan"), tuple(default))
            best[(kernel, length)] = {"config": list(winner[1]), "ms": winner[0], "default_ms": default_ms}
        del x
    return rows, best


def _fwd_bwd_ms(
    length: int, groups: int, configs: dict, tokens: int = 262_144, heads: int = 16, dim: int = 128
) -> float:
    """Forward + backward through autograd at T = length with ``configs`` in place of CONFIGS."""
    original = dict(kernels.CONFIGS)
    kernels.CONFIGS.update(configs)
    try:
        batch = tokens // length
        q = torch.randn(batch, length, groups, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k, v = (
            torch.randn(batch, length, heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2)
        )
        grad = torch.randn(batch, length, heads, dim, device="cuda", dtype=torch.bfloat16)

        def step() -> None:
            kernels.chunk_attention_triton(q, k, v, 16).backward(grad)

        return _bench(step)
    finally:
        kernels.CONFIGS.clear()
        kernels.CONFIGS.update(original)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", help="write rows and winners as JSON here")
    parser.add_argument("--kernels", default="fwd,dkv,prep,dq", help="comma-separated subset of fwd,dkv,prep,dq")
    parser.add_argument("--groups", type=int, default=2, help="query groups G (H = 16)")
    args = parser.parse_args(argv)
    names = [name for name in args.kernels.split(",") if name]
    rows, best = sweep(names, groups=args.groups)
    print("\nbest per kernel (ms: the kernel's call; fwd: forward, others: whole backward)")
    for (kernel, length), result in best.items():
        print(
            f"T={length:>6} {kernel:<5} best {tuple(result['config'])} {result['ms']:.3f} ms "
            f"(default {tuple(kernels.CONFIGS[kernel])} {result['default_ms']:.3f} ms)"
        )
    for length in sorted({length for _, length in best}):
        tuned = {k: kernels.KernelConfig(*r["config"]) for (k, t), r in best.items() if t == length}
        print(
            f"T={length:>6} fwd+bwd: defaults {_fwd_bwd_ms(length, args.groups, {}):.3f} ms, "
            f"best of T={length} {_fwd_bwd_ms(length, args.groups, tuned):.3f} ms"
        )
    if args.out:
        with open(args.out, "w") as handle:
            winners = [{"kernel": kernel, "T": length, **result} for (kernel, length), result in best.items()]
            json.dump({"rows": rows, "best": winners}, handle, indent=1)


if __name__ == "__main__":
    main()
