"""Gated-recurrence benchmark: the Triton kernels against the reference, forward and forward+backward.

The configuration of the kernels issue: 262,144 tokens per step, d = 2048 (16 heads of 128),
G = 2 key groups, bf16, T in {4K, 16K, 64K, 128K} (batch = tokens / T), the restart form at L = 16
(RAT) and the full-sequence form (RAT+ / gated RNN). Times are medians of
``triton.testing.do_bench``. Run on a GPU:

    python -m rat_lightning.bench.recurrence docs/benchmarks/recurrence.json

Bytes are the minimum any implementation moves (each input read once, each output written once):
forward reads x, g (d each) and k (G * P) and writes sx, sk (d each); backward reads dsx, dsk, x, g,
k and the saved sx, sk, and writes dx, dg, dk. The full-sequence form reads x, g, k (forward) and
dsx, dsk, g (backward) once more for its block summaries, so its achieved GB/s understates its
bandwidth use.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

from rat_lightning.bench.report import write_report
from rat_lightning.bench.timing import median_ms
from rat_lightning.ops import gated_recurrence

# Tokens of the correctness check (a slice of the timed inputs, fp32 reference).
_CHECK_TOKENS = 65_536
_CHECK_RTOL = 2e-2


def _time(fn: Callable[[], object], device: torch.device, grad_to_none: list[torch.Tensor] | None = None) -> float:
    return median_ms(fn, device, warmup=25, rep=100, grad_to_none=grad_to_none)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def _check(
    x: torch.Tensor, g: torch.Tensor, k: torch.Tensor, bias: torch.Tensor, chunk_size: int | None
) -> float:
    """Largest relative error of Triton (bf16 in, fp32 inside) against the fp32 reference of the
    same inputs, over the outputs and every input gradient, on a slice of the batch and time."""
    batch, length = x.shape[:2]
    rows = max(1, min(batch, _CHECK_TOKENS // length))
    steps = min(length, _CHECK_TOKENS)
    leaves = [t[:rows, :steps].detach().clone().requires_grad_() for t in (x, g, k)]
    leaves.append(bias.detach().clone().requires_grad_())
    xs, gs, ks, bs = leaves
    out = gated_recurrence(xs, gs, ks, gate_bias=bs, chunk_size=chunk_size, backend="triton")
    upstream = [torch.randn_like(s) for s in out]
    grads = torch.autograd.grad(out, leaves, upstream)
    ref_leaves = [t.detach().float().requires_grad_() for t in leaves]
    xr, gr, kr, br = ref_leaves
    ref = gated_recurrence(xr, gr, kr, gate_bias=br, chunk_size=chunk_size, backend="reference")
    ref_grads = torch.autograd.grad(ref, ref_leaves, [u.float() for u in upstream])
    errors = [_relative_error(a, b) for a, b in zip((*out, *grads), (*ref, *ref_grads))]
    return max(errors)


def _fla_hgrn_rows(x: torch.Tensor, g: torch.Tensor, k: torch.Tensor, chunk_size: int) -> list[dict]:
    """flash-linear-attention's HGRN kernels (if installed) on the same work: x and k (repeated to
    the heads) as 2d channels sharing the gate, over the full sequence, and restarted every L
    tokens (each chunk as its own sequence of the batch, which is exact). Inputs are prepared
    outside the timed region ((1 - a) v and log a in fp32, as HGRN takes them): only the scan is
    timed, so the comparison favours HGRN."""
    try:
        from fla.ops.hgrn import chunk_hgrn, fused_recurrent_hgrn
    except ImportError:
        return []
    batch, length, heads = x.shape[:3]
    keys = k.repeat_interleave(heads // k.shape[2], dim=2)
    values = torch.cat([x, keys], dim=2).flatten(2).float()
    gate = torch.cat([g, g], dim=2).flatten(2).float()
    v_in = (torch.sigmoid(-gate) * values).to(x.dtype)
    log_a = torch.nn.functional.logsigmoid(gate)
    rows = []
    restart = (-1, chunk_size, v_in.shape[-1])
    for form, shape in (("full_sequence", (batch, length, -1)), (f"restart_L{chunk_size}", restart)):
        vf = v_in.reshape(shape).detach().requires_grad_()
        gf = log_a.reshape(shape).detach().requires_grad_()
        upstream = torch.randn_like(vf)
        for name, kernel in (("fla_chunk_hgrn", chunk_hgrn), ("fla_fused_recurrent_hgrn", fused_recurrent_hgrn)):

            def forward(kernel=kernel) -> None:
                with torch.no_grad():
                    kernel(vf, gf)

            def forward_backward(kernel=kernel) -> None:
                out, _ = kernel(vf, gf)
                out.backward(upstream)

            rows.append({"impl": name, "form": form, "T": length, "batch": batch, "fwd_ms": _time(forward, x.device),
                         "fwd_bwd_ms": _time(forward_backward, x.device, grad_to_none=[vf, gf])})  # fmt: skip
    return rows


def bench_recurrence(
    tokens: int = 262_144,
    d: int = 2048,
    heads: int = 16,
    groups: int = 2,
    seq_lens: tuple[int, ...] = (4096, 16384, 65536, 131072),
    dtype: torch.dtype = torch.bfloat16,
    chunk_size: int = 16,
    fla_seq_lens: tuple[int, ...] = (4096,),
    device: str | torch.device = "cuda",
) -> list[dict]:
    """Check and time the Triton recurrence per sequence length, restart and full-sequence forms,
    and flash-linear-attention's HGRN at ``fla_seq_lens`` when it is installed.

    Args:
        tokens: batch * T per step.
        d, heads, groups: model width, heads (head dim d / heads) and key groups G.
        seq_lens: the T values; batch = tokens // T.
        dtype: input dtype.
        chunk_size: L of the restart form.
        device: where to run (a CPU run is a smoke test: the kernels run under TRITON_INTERPRET=1).

    Returns:
        One dict per (T, form): ``fwd_ms``, ``fwd_bwd_ms``, model bytes and achieved GB/s for
        both, and ``max_rel_error`` against the fp32 reference (``ok`` when below 2e-2).
    """
    device = torch.device(device)
    dim = d // heads
    elem = torch.tensor([], dtype=dtype).element_size()
    fwd_bytes = tokens * elem * (4 * d + groups * dim)
    bwd_bytes = tokens * elem * (8 * d + 2 * groups * dim)
    rows: list[dict] = []
    for length in seq_lens:
        batch = tokens // length
        x = torch.randn(batch, length, heads, dim, device=device, dtype=dtype, requires_grad=True)
        g = (2 * torch.randn(batch, length, heads, dim, device=device)).to(dtype).requires_grad_()
        k = torch.randn(batch, length, groups, dim, device=device, dtype=dtype, requires_grad=True)
        bias = torch.randn(heads, dim, device=device, requires_grad=True)
        for form, chunk in (("restart_L%d" % chunk_size, chunk_size), ("full_sequence", None)):
            error = _check(x, g, k, bias, chunk)
            torch.cuda.empty_cache()
            fwd_ms, fwd_bwd_ms = _time_triton(x, g, k, bias, chunk)
            rows.append({
                "impl": "triton", "form": form, "T": length, "batch": batch, "d": d, "heads": heads,
                "groups": groups, "dtype": str(dtype).removeprefix("torch."),
                "fwd_ms": fwd_ms, "fwd_bwd_ms": fwd_bwd_ms,
                "fwd_gb": fwd_bytes / 1e9, "fwd_bwd_gb": (fwd_bytes + bwd_bytes) / 1e9,
                "fwd_gbps": fwd_bytes / fwd_ms / 1e6, "fwd_bwd_gbps": (fwd_bytes + bwd_bytes) / fwd_bwd_ms / 1e6,
                "max_rel_error": error, "ok": error < _CHECK_RTOL,
            })  # fmt: skip
            torch.cuda.empty_cache()
        if length in fla_seq_lens:
            rows.extend(_fla_hgrn_rows(x.detach(), g.detach(), k.detach(), chunk_size))
        del x, g, k, bias
        torch.cuda.empty_cache()
    return rows


def _time_triton(
    x: torch.Tensor, g: torch.Tensor, k: torch.Tensor, bias: torch.Tensor, chunk: int | None
) -> tuple[float, float]:
    """Forward and forward+backward ms of the Triton recurrence (random upstream gradients; the
    inputs' gradients reset before each run)."""

    def forward() -> None:
        with torch.no_grad():
            gated_recurrence(x, g, k, gate_bias=bias, chunk_size=chunk, backend="triton")

    with torch.no_grad():
        states = gated_recurrence(x, g, k, gate_bias=bias, chunk_size=chunk, backend="triton")
        upstream = tuple(torch.randn_like(state) for state in states)

    def forward_backward() -> None:
        out = gated_recurrence(x, g, k, gate_bias=bias, chunk_size=chunk, backend="triton")
        torch.autograd.backward(out, upstream)

    return _time(forward, x.device), _time(forward_backward, x.device, grad_to_none=[x, g, k, bias])


def _table(rows: list[dict]) -> str:
    head = f"{'impl':<24}{'form':<16}{'T':>8}{'B':>5}{'fwd ms':>9}{'GB/s':>7}{'f+b ms':>9}{'GB/s':>7}{'err':>10}"
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['impl']:<24}{r.get('form', '-'):<16}{r['T']:>8}{r['batch']:>5}{r['fwd_ms']:>9.3f}"
            f"{r.get('fwd_gbps', float('nan')):>7.0f}{r['fwd_bwd_ms']:>9.3f}{r.get('fwd_bwd_gbps', float('nan')):>7.0f}"
            f"{r.get('max_rel_error', float('nan')):>10.1e}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    results = bench_recurrence()
    print(_table(results))
    if len(sys.argv) > 1:
        write_report(sys.argv[1], {"rows": results})
