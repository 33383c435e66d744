"""Timing shared by the kernel benches."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int = 25, rep: int = 200) -> float:
    """Median milliseconds of ``fn``: CUDA events through ``triton.testing.do_bench`` (warm-up
    excluded), or a host clock over 3 calls after one warm-up on CPU (smoke runs)."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
