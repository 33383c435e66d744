"""Layer benchmark: one RAT layer against attention and the floor parts, forward+backward.

The configuration of the kernels issue: d_model 2048, 16 heads of 128, G=2, L=16, bf16,
262,144 tokens per step, T in {4K, 16K, 64K, 128K}. Times are medians of
``triton.testing.do_bench`` in the GPU's steady state (a second of warm-up excluded, then two
seconds of runs), each row with the mean SM clock and power while it was timed where NVML can
tell (on an H100 a layer step runs at the power cap, near 1.5 GHz). The floor is measured in the same run: the
projections' GEMMs, the inter-chunk attention at the fastest library kernel (cuDNN where it runs)
and the fused recurrence, each alone, ``floor`` their sum, and ``floor_in_sequence`` the three run
back to back in one timed call (the GPU's power cap clocks them then as it clocks the layer); the
table ends with the RAT layer over each floor. Run on a GPU:

    python -m rat_lightning.bench.layer docs/benchmarks/layer.json
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F

from rat_lightning.bench.timing import ClockSampler, median_ms
from rat_lightning.layers import RAT, Attention


def _time(fn: Callable[[], object], grad_to_none: list[torch.Tensor] | None = None) -> float:
    """Median ms of ``fn`` in the GPU's steady state (:func:`median_ms`): a second of warm-up, then two
    of timed runs (17 or more at 128K). A layer step draws the H100's full power, and the clock
    settles under its power cap only after the first few hundred milliseconds: fewer runs, as this
    benchmark took before 2026-11-24 (one timed run of a 50 ms step), catch the clock still high."""
    return median_ms(fn, torch.device("cuda"), warmup=1000, rep=2000, grad_to_none=grad_to_none)


def _fwd_bwd(module: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    # The upstream gradient is made once: a fill per call would be timed with the layer.
    grad = torch.ones_like(x)

    def run() -> None:
        module(x).backward(grad)

    return run


@dataclass
class _Workload:
    """A layer or a part of the floor as closures: ``fwd_bwd`` and ``fwd`` (no grad) run it once,
    ``grads`` are the tensors whose ``.grad`` is reset before each call, and its time is ``scale``
    x the measured one (the non-causal attention's half)."""

    variant: str
    fwd_bwd: Callable[[], None]
    fwd: Callable[[], None]
    grads: list[torch.Tensor] = field(default_factory=list)
    kernel: str | None = None
    scale: float = 1.0

    def timed(self) -> dict:
        """Its row: forward+backward and forward ms, each timed alone, and the mean SM clock and
        power during the forward+backward timing, warm-up included, where NVML can tell
        (:class:`ClockSampler`)."""
        # One run first, so that compiling (Triton, cuDNN plans) happens outside the clock's samples.
        self.fwd_bwd()
        for tensor in self.grads:
            tensor.grad = None
        with ClockSampler() as clocks:
            fwd_bwd = _time(self.fwd_bwd, grad_to_none=self.grads) * self.scale
        row = {"variant": self.variant, "fwd_bwd_ms": fwd_bwd, "fwd_ms": _time(self.fwd) * self.scale,
               **clocks.result()}  # fmt: skip
        return row if self.kernel is None else {**row, "kernel": self.kernel}


def _projections_floor(x: torch.Tensor, rat: RAT) -> _Workload:
    """The layer's GEMMs alone: the packed in-projection and the out-projection, with a given upstream
    gradient (a ``.sum().backward()`` would time a stride-0 gradient's copy with them)."""
    d_model = x.shape[-1]
    w_in = torch.randn(rat.w_in.weight.shape, device=x.device, dtype=x.dtype, requires_grad=True)
    w_out = torch.randn(d_model, d_model, device=x.device, dtype=x.dtype, requires_grad=True)
    grad = torch.ones_like(x)

    def forward() -> torch.Tensor:
        return F.linear(F.linear(x, w_in)[..., :d_model], w_out)

    return _Workload("floor_projections", lambda: forward().backward(grad), _no_grad(forward), [x, w_in, w_out])


def _attention_floors(
    batch: int, length: int, heads: int, dim: int, chunk_size: int, dtype: torch.dtype
) -> tuple[_Workload, _Workload]:
    """The inter-chunk attention's FLOPs (T queries over the T/L chunk summaries, causal) at the
    fastest library kernel, in one call each:

    - ``floor_chunk_attention``: causal attention of exactly that work. Through cuDNN where it runs
      (queries regrouped by offset in the chunk: H L query heads over H key heads, C - 1 positions,
      which is what the RAT layer's long-sequence path calls), else SDPA over ``(B L, H, C, P)``.
    - ``floor_chunk_attention_noncausal_half``: half the time of non-causal attention of T queries
      over all C summaries (SDPA). Half the FLOPs is the causal half, but no causal kernel runs at the
      non-causal one's rate (diagonal tiles, uneven rows): a lower bound, not a reachable time.
    """
    from rat_lightning.ops.chunk_attention.sdpa_lse import (
        attention_with_lse,
        attention_with_lse_backward,
        cudnn_attention_usable,
    )

    chunks = length // chunk_size
    scale = dim**-0.5

    def randn(*shape: int, grad: bool = False) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", dtype=dtype, requires_grad=grad)

    if cudnn_attention_usable(randn(1), dim):
        q, grad = randn(batch, heads * chunk_size, chunks - 1, dim), randn(batch, heads * chunk_size, chunks - 1, dim)
        k, v = randn(batch, heads, chunks - 1, dim), randn(batch, heads, chunks - 1, dim)

        def cudnn_fwd_bwd() -> None:
            o, lse = attention_with_lse(q, k, v, scale)
            attention_with_lse_backward(grad, q, k, v, o, lse.contiguous(), scale)

        causal = _Workload("floor_chunk_attention", cudnn_fwd_bwd, lambda: attention_with_lse(q, k, v, scale),
                            kernel="cudnn, regrouped GQA")  # fmt: skip
    else:
        q, k, v = (randn(batch * chunk_size, heads, chunks, dim, grad=True) for _ in range(3))
        grad = torch.randn_like(q)

        def sdpa() -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        causal = _Workload("floor_chunk_attention", lambda: sdpa().backward(grad), _no_grad(sdpa), [q, k, v], "sdpa")
    # Names of their own: the closures above are called after this point.
    queries, full_grad = randn(batch, heads, length, dim, grad=True), randn(batch, heads, length, dim)
    keys, values = randn(batch, heads, chunks, dim, grad=True), randn(batch, heads, chunks, dim, grad=True)

    def full() -> torch.Tensor:
        return F.scaled_dot_product_attention(queries, keys, values)

    noncausal_half = _Workload("floor_chunk_attention_noncausal_half", lambda: full().backward(full_grad),
                                _no_grad(full), [queries, keys, values], "sdpa", scale=0.5)  # fmt: skip
    return causal, noncausal_half


def _recurrence_floor(x: torch.Tensor, heads: int, groups: int, chunk_size: int) -> _Workload:
    """The fused recurrence alone (restart form, x and k, shared gate), forward+backward."""
    from rat_lightning.ops import gated_recurrence

    batch, length, d_model = x.shape
    dim = d_model // heads
    xs, gs, ks = (torch.randn(batch, length, width, dim, device=x.device, dtype=x.dtype, requires_grad=True)
                  for width in (heads, heads, groups))  # fmt: skip
    bias = torch.zeros(heads, dim, device=x.device, requires_grad=True)
    grads = (torch.ones_like(xs), torch.ones_like(xs))

    def forward() -> tuple[torch.Tensor, torch.Tensor]:
        return gated_recurrence(xs, gs, ks, gate_bias=bias, chunk_size=chunk_size)

    return _Workload("floor_recurrence", lambda: torch.autograd.backward(forward(), grads), _no_grad(forward),
                      [xs, gs, ks, bias])  # fmt: skip


def _in_sequence(variant: str, parts: list[_Workload]) -> _Workload:
    """The parts run back to back in one timed call."""
    def fwd_bwd() -> None:
        for part in parts:
            part.fwd_bwd()

    def fwd() -> None:
        for part in parts:
            part.fwd()

    return _Workload(variant, fwd_bwd, fwd, [t for part in parts for t in part.grads])


def _floor_rows(x: torch.Tensor, rat: RAT, groups: int, chunk_size: int) -> list[dict]:
    """The floor's parts at x's shape (projections, inter-chunk attention, recurrence, each at the
    speed of the best kernel we have for it; see :func:`_attention_floors`) and three floors:

    - ``floor``: the sum of the parts' times, each part timed alone, with the causal attention;
    - ``floor_noncausal_half``: the same with the attention's lower bound;
    - ``floor_in_sequence``: projections, causal attention and recurrence run back to back in one
      timed call, as a layer runs them. A layer's step draws the H100's full power (700 W): its GEMMs
      hold the SM clock near 1.45 GHz, and the attention after them runs at that clock, while alone it
      draws less and runs faster. This floor prices the parts at the clock the layer gets.
    """
    batch, length, d_model = x.shape
    heads = rat.n_heads
    causal, noncausal_half = _attention_floors(batch, length, heads, d_model // heads, chunk_size, x.dtype)
    projections = _projections_floor(x, rat)
    recurrence = _recurrence_floor(x, heads, groups, chunk_size)
    parts = [part.timed() for part in (projections, causal, noncausal_half, recurrence)]
    sequence = _in_sequence("floor_in_sequence", [projections, causal, recurrence]).timed()
    del projections, causal, noncausal_half, recurrence
    torch.cuda.empty_cache()
    times = ("fwd_bwd_ms", "fwd_ms")
    projections, causal, noncausal_half, recurrence = parts
    totals = [
        {"variant": name, **{key: projections[key] + attention[key] + recurrence[key] for key in times}}
        for name, attention in (("floor", causal), ("floor_noncausal_half", noncausal_half))
    ]
    return [*parts, *totals, sequence]


def _no_grad(fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` run under ``torch.no_grad()`` (the forward-only timings)."""
    def run() -> None:
        with torch.no_grad():
            fn()

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
            workload = _Workload(name, _fwd_bwd(module, x), _no_grad(partial(module, x)), [x, *module.parameters()])
            try:
                row = workload.timed()
            except torch.OutOfMemoryError:
                row = {"variant": name, "fwd_bwd_ms": float("nan"), "fwd_ms": float("nan")}
            x.grad = None
            torch.cuda.empty_cache()
            rows.append({"T": length, "batch": batch, **row})
        rows += [{"T": length, "batch": batch, **row} for row in _floor_rows(x, rat, groups, chunk_size)]
        del x, variants, rat, attention
        torch.cuda.empty_cache()
    return rows


def floor_ratios(rows: list[dict]) -> list[str]:
    """One line per T: the RAT layer's forward+backward and prefill over the floor measured in the same run."""
    lines = []
    for length in sorted({row["T"] for row in rows}):
        at = {row["variant"]: row for row in rows if row["T"] == length}
        for name in ("floor", "floor_in_sequence", "floor_noncausal_half"):
            if "rat" in at and name in at:
                rat, floor = at["rat"], at[name]
                lines.append(f"{length:>7} rat / {name}: fwd+bwd {rat['fwd_bwd_ms'] / floor['fwd_bwd_ms']:.3f}x "
                             f"({rat['fwd_bwd_ms']:.1f} / {floor['fwd_bwd_ms']:.1f} ms), "
                             f"prefill {rat['fwd_ms'] / floor['fwd_ms']:.3f}x")  # fmt: skip
    return lines


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
        clock = f"  {row['sm_mhz']:5.0f} MHz {row['power_w']:4.0f} W" if "sm_mhz" in row else ""
        print(f"{row['T']:>7} {row['variant']:<38} fwd+bwd {row['fwd_bwd_ms']:8.2f} ms  fwd {fwd:8.2f} ms{clock}")
    for line in floor_ratios(rows):
        print(line)
    if argv:
        with open(argv[0], "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
