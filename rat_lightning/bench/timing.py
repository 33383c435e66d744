"""Timing shared by the kernel benches."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable

import torch


def median_ms(
    fn: Callable[[], object],
    device: torch.device,
    warmup: int = 25,
    rep: int = 200,
    grad_to_none: list[torch.Tensor] | None = None,
    min_runs: int = 5,
) -> float:
    """Median milliseconds of ``fn`` over at least ``min_runs`` timed runs.

    On CUDA, events through ``triton.testing.do_bench``: about ``warmup`` ms of untimed runs, then
    timed runs for about ``rep`` ms, the L2 cache flushed and the ``.grad`` of ``grad_to_none`` reset
    before each (so a backward writes its gradients instead of adding to the last run's). do_bench
    sizes both phases by a first estimate and runs a slow ``fn`` only once for a short ``rep`` (a
    113 ms layer step timed with ``rep=50`` is one run), so where fewer than ``min_runs`` come back
    it times again with the budget for ``min_runs``. On CPU (smoke runs), a host clock over 3 calls
    after one warm-up.
    """
    if device.type == "cuda":
        import triton.testing

        def bench(budget_ms: float) -> list[float]:
            return triton.testing.do_bench(fn, warmup=warmup, rep=budget_ms, grad_to_none=grad_to_none,
                                           return_mode="all")  # fmt: skip

        times = bench(rep)
        if len(times) < min_runs:
            times = bench(statistics.median(times) * min_runs * 1.2)
        return statistics.median(times)
    fn()
    times = []
    for _ in range(3):
        for tensor in grad_to_none or ():
            tensor.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


class ClockSampler:
    """The GPU's mean SM clock and board power while a block runs, sampled through NVML.

    A benchmark's time depends on the clock it ran at, and on an H100 a step that draws the full
    power budget (700 W) runs well below the boost clock: a RAT layer's step near 1.45 GHz, the
    same attention kernels alone at 1.65-1.98 GHz (docs/kernels.md). Recording both beside a time
    says which regime it was taken in. A daemon thread reads ``torch.cuda.clock_rate`` (MHz) and
    ``torch.cuda.power_draw`` (mW) every ``interval`` seconds; with no NVML (pynvml missing, or no
    GPU) :meth:`result` is empty and timing goes on.

        with ClockSampler(device) as clocks:
            ms = median_ms(fn, device)
        row.update(clocks.result())   # {"sm_mhz": ..., "power_w": ..., "clock_samples": ...}
    """

    def __init__(self, device: torch.device | int | None = None, interval: float = 0.02) -> None:
        self.device, self.interval = device, interval
        self._samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> tuple[float, float]:
        return float(torch.cuda.clock_rate(self.device)), torch.cuda.power_draw(self.device) / 1e3

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._samples.append(self._read())

    def __enter__(self) -> ClockSampler:
        try:
            self._read()
        except Exception:  # noqa: BLE001 - NVML absent or unusable: sample nothing, time anyway
            return self
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def result(self) -> dict[str, float]:
        """``{"sm_mhz", "power_w", "clock_samples"}``: means over the block, or ``{}`` without samples."""
        if not self._samples:
            return {}
        count = len(self._samples)
        return {"sm_mhz": sum(s[0] for s in self._samples) / count,
                "power_w": sum(s[1] for s in self._samples) / count, "clock_samples": count}  # fmt: skip
