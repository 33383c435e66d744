"""The clock sampler that records the GPU's SM clock and power beside a benchmark's times."""

import itertools
import time

import pytest
import torch

from rat_lightning.bench.timing import ClockSampler


def test_clock_sampler_means_the_readings_taken_inside_the_block(monkeypatch):
    clocks, powers = itertools.cycle([1400, 1455, 1980]), itertools.cycle([700_000, 612_500])
    seen: list[tuple[float, float]] = []

    def clock_rate(device=None):
        seen.append((next(clocks), next(powers)))
        return seen[-1][0]

    monkeypatch.setattr(torch.cuda, "clock_rate", clock_rate)
    monkeypatch.setattr(torch.cuda, "power_draw", lambda device=None: seen[-1][1])
    with ClockSampler(interval=0.002) as sampler:
        time.sleep(0.1)
    taken = len(seen)
    time.sleep(0.02)
    assert len(seen) == taken, "the thread kept sampling after the block"
    samples = seen[1:]  # the first reading is the probe on entry
    result = sampler.result()
    assert result["clock_samples"] == len(samples) >= 5
    assert result["sm_mhz"] == pytest.approx(sum(s[0] for s in samples) / len(samples))
    assert result["power_w"] == pytest.approx(sum(s[1] for s in samples) / len(samples) / 1e3)


def test_clock_sampler_without_nvml_records_nothing_and_lets_the_block_run(monkeypatch):
    def no_nvml(device=None):
        raise ModuleNotFoundError("pynvml does not seem to be installed")

    monkeypatch.setattr(torch.cuda, "clock_rate", no_nvml)
    ran = False
    with ClockSampler(interval=0.001) as sampler:
        ran = True
    assert ran and sampler.result() == {}


def test_median_ms_times_a_slow_function_again_until_it_has_min_runs(monkeypatch):
    import triton.testing

    from rat_lightning.bench.timing import median_ms

    budgets = []

    def do_bench(fn, warmup, rep, grad_to_none, return_mode):
        # A 113 ms step: do_bench times rep // 113 runs, at least one.
        assert return_mode == "all"
        budgets.append(rep)
        return [113.0 + i for i in range(max(1, int(rep // 113)))]

    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    ms = median_ms(lambda: None, torch.device("cuda"), warmup=10, rep=50, min_runs=5)
    assert budgets[0] == 50 and budgets[1] >= 5 * 113  # the second call has the budget for 5 runs
    assert ms == 115.5  # the median of the second call's 6 runs, 113..118


def test_median_ms_on_cpu_resets_the_gradients_before_each_run():
    from rat_lightning.bench.timing import median_ms

    x = torch.ones(3, requires_grad=True)

    def step():
        (2 * x).sum().backward()

    median_ms(step, torch.device("cpu"), grad_to_none=[x])
    assert torch.equal(x.grad, torch.full((3,), 2.0))  # written by the last run, not summed over four
