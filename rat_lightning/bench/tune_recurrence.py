"""Sweep the recurrence kernels' tiles (heads x channels x chunks per program, warps) on a GPU.

    python -m rat_lightning.bench.tune_recurrence out.json

Prints forward and forward+backward medians per tile for the restart (L=16) and full forms at
the benchmark shape, one tile for both passes; ``_tiles`` in ``ops/recurrence/triton.py`` takes the
forward's winner by forward time and the backward's by forward+backward time (minus the forward).
"""

from __future__ import annotations

import itertools
import json
import sys

import torch
import triton
import triton.testing

from rat_lightning.ops.recurrence import gated_recurrence
from rat_lightning.ops.recurrence import triton as kernels


def sweep(tokens: int = 262_144, heads: int = 16, groups: int = 2, dim: int = 128, length: int = 4096) -> list[dict]:
    """Time every (BP, NC, warps) tile, the same for the forward and backward kernels."""
    batch = tokens // length
    x, g = (torch.randn(batch, length, heads, dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    k = torch.randn(batch, length, groups, dim, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(heads, dim, device="cuda")
    for t in (x, g, k, bias):
        t.requires_grad_()
    original = kernels._tiles
    rows = []
    for bp, nc, warps in itertools.product((32, 64, 128), (1, 2, 4), (4, 8)):
        hpg = heads // groups

        def tiles(h: int, p: int, heads_per_group: int, forward: bool, bp=bp, nc=nc, warps=warps) -> dict:
            bh = triton.next_power_of_2(heads_per_group)
            return {"BH": bh, "BP": min(bp, p), "NC": nc, "NPB": triton.cdiv(p, min(bp, p)), "num_warps": warps}

        kernels._tiles = tiles
        for chunk in (16, None):
            try:
                fwd = triton.testing.do_bench(
                    lambda: gated_recurrence(x, g, k, gate_bias=bias, chunk_size=chunk), return_mode="median"
                )

                def fwd_bwd() -> None:
                    sx, sk = gated_recurrence(x, g, k, gate_bias=bias, chunk_size=chunk)
                    torch.autograd.backward((sx, sk), (sx, sk))

                both = triton.testing.do_bench(fwd_bwd, grad_to_none=[x, g, k, bias], return_mode="median")
            except Exception as error:  # a tile that does not compile (registers) is skipped
                fwd = both = float("nan")
                print(f"BP={bp} NC={nc} warps={warps}: {type(error).__name__}", file=sys.stderr)
            row = {"BP": bp, "NC": nc, "warps": warps, "hpg": hpg, "chunk": chunk, "fwd_ms": fwd, "fwd_bwd_ms": both}
            rows.append(row)
            print(f"BP={bp:4} NC={nc} warps={warps} chunk={chunk!s:5} fwd {fwd:7.3f} f+b {both:7.3f}", flush=True)
    kernels._tiles = original
    return rows


if __name__ == "__main__":
    result = sweep()
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as handle:
            json.dump(result, handle, indent=1)
