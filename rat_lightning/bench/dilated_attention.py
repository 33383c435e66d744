"""Dilated-attention benchmark: the Triton forward against masked SDPA and dense causal flash.

Configuration of the issue: bf16, 262,144 tokens per step (batch = tokens / T), 16 heads of 128,
T in {4K, 16K, 64K}, (D, W, I) in {(16, 0, 0), (64, 0, 0), (16, 256, 4)}. For each (T, D, W, I):

- check: the Triton output (bf16) of batch element 0 against the fp32 reference (masked SDPA at
  the same bf16 inputs upcast) on the first 4096 and the last 2048 queries, all heads: the tail
  rows are built with ``dilated_mask_rows`` (a 2048 x T mask), so T = 64K is checked without a
  T x T mask; max abs error and ``||a - e|| / ||e||``;
- times (medians of ``triton.testing.do_bench``, forward only, no autograd): the Triton kernel
  through the dispatcher; the reference's masked SDPA with its T x T bool mask built beforehand
  (skipped where the mask and its 16-bit bias, 3 T^2 bytes, would pass ~8 GB); dense causal flash
  SDPA of the same shape (``SDPBackend.FLASH_ATTENTION``), the baseline, once per T.

TFLOP/s count the useful work, 4 B H P x (allowed (t, j) pairs): T(T+1)/2 pairs for dense causal.
Run on a GPU:

    python -m rat_lightning.bench.dilated_attention --out docs/benchmarks/dilated_attention_h100.json

``--smoke`` runs every code path at toy sizes (T in {32, 64}, 2 heads of 16); without CUDA it
sets TRITON_INTERPRET=1 (before triton is imported) and runs the kernel under the interpreter.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from rat_lightning.bench.report import write_report
from rat_lightning.bench.timing import median_ms
from rat_lightning.ops.dilated_attention import (
    dilated_attention,
    dilated_mask,
    dilated_mask_rows,
)

PATTERNS = ((16, 0, 0), (64, 0, 0), (16, 256, 4))
SEQ_LENS = (4096, 16384, 65536)
# The reference's T x T bool mask plus the 16-bit bias SDPA may make of it.
REFERENCE_MASK_LIMIT = 8e9


def _time(fn: Callable[[], object], device: torch.device) -> float:
    return median_ms(fn, device, warmup=10, rep=50)


def allowed_pairs(length: int, dilation: int, window: int, sinks: int) -> int:
    """Number of allowed (t, j) pairs, sum over t of |keys of query t| (closed form per part)."""
    t = torch.arange(length, dtype=torch.int64)
    count = t.clamp(max=window) + 1  # window, the diagonal included: j in [max(0, t - W), t]
    beyond = (t - window).clamp(min=0)  # keys j < t - W
    count += beyond // dilation  # dilated: j = nD + D - 1 < t - W
    for j in range(min(sinks, length)):
        if (j + 1) % dilation:  # sinks off the dilated positions
            count += (beyond > j).long()
    return int(count.sum())


def check_against_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dilation: int,
    window: int,
    sinks: int,
    head_rows: int = 4096,
    tail_rows: int = 2048,
    head_group: int = 4,
) -> dict[str, float]:
    """Errors of the Triton output against the fp32 reference on batch element 0.

    Args:
        q, k, v: ``(B, T, H, P)`` inputs (any float dtype; the reference runs on them upcast).
        dilation, window, sinks: D, W, I.
        head_rows, tail_rows: the first and last query rows compared (all of them if T is smaller
            than their sum); the reference sees keys up to each piece's last row, which is exact
            for causal attention.
        head_group: heads per reference call (bounds the memory of a math-fallback SDPA).

    Returns:
        ``{"max_abs_err", "rel_err", "rows_checked"}``; rel_err is ``||a - e|| / ||e||``.
    """
    length, heads = q.shape[1], q.shape[2]
    q0, k0, v0 = q[:1], k[:1], v[:1]
    with torch.no_grad():
        out = dilated_attention(q0, k0, v0, dilation=dilation, window=window, sinks=sinks, backend="triton")
    if length <= head_rows + tail_rows:
        pieces = [(0, length)]
    else:
        pieces = [(0, head_rows), (length - tail_rows, length)]
    max_abs, err_sq, ref_sq = 0.0, 0.0, 0.0
    for start, stop in pieces:
        mask = dilated_mask_rows(start, stop, dilation, window, sinks, device=q.device)
        for h0 in range(0, heads, head_group):
            heads_ = slice(h0, h0 + head_group)
            with torch.no_grad():
                expected = F.scaled_dot_product_attention(
                    q0[:, start:stop, heads_].float().transpose(1, 2),
                    k0[:, :stop, heads_].float().transpose(1, 2),
                    v0[:, :stop, heads_].float().transpose(1, 2),
                    attn_mask=mask,
                ).transpose(1, 2)
            diff = (out[:, start:stop, heads_].float() - expected).double()
            max_abs = max(max_abs, diff.abs().max().item())
            err_sq += diff.square().sum().item()
            ref_sq += expected.double().square().sum().item()
    rows = sum(stop - start for start, stop in pieces)
    return {"max_abs_err": max_abs, "rel_err": math.sqrt(err_sq / max(ref_sq, 1e-300)), "rows_checked": rows}


def _flash_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Callable[[], object]:
    """Dense causal SDPA on (B, H, T, P) views of the inputs: flash on CUDA, any backend on CPU."""
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    if q.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def run() -> torch.Tensor:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)

        return run
    return lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)


def bench_dilated_attention(
    tokens: int = 262_144,
    heads: int = 16,
    head_dim: int = 128,
    seq_lens: Sequence[int] = SEQ_LENS,
    patterns: Sequence[tuple[int, int, int]] = PATTERNS,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cuda",
    check_rows: tuple[int, int] = (4096, 2048),
) -> list[dict]:
    """Check and time the Triton kernel, the masked-SDPA reference and dense causal flash.

    Args:
        tokens: batch * T per step (each T must divide it).
        heads, head_dim: H and P.
        seq_lens: the values of T.
        patterns: the (D, W, I) triples.
        dtype: input dtype.
        device: ``"cuda"``, or ``"cpu"`` for the smoke run (kernel under the Triton interpreter).
        check_rows: first and last query rows compared against the reference.

    Returns:
        One dict per (T, D, W, I): ``T``, ``batch``, ``dilation``, ``window``, ``sinks``,
        ``keys_per_query`` (mean allowed keys), ``triton_ms``, ``triton_tflops``,
        ``reference_ms`` (None where skipped, with ``reference_note``), ``flash_causal_ms``,
        ``flash_causal_tflops``, ``speedup_vs_flash`` (flash ms / Triton ms) and ``check``.
    """
    device = torch.device(device)
    rows = []
    for length in seq_lens:
        if tokens % length:
            raise ValueError(f"tokens ({tokens}) must be a multiple of every T, got T = {length}")
        rows += _bench_length(tokens // length, length, heads, head_dim, patterns, dtype, device, check_rows)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _bench_length(
    batch: int,
    length: int,
    heads: int,
    head_dim: int,
    patterns: Sequence[tuple[int, int, int]],
    dtype: torch.dtype,
    device: torch.device,
    check_rows: tuple[int, int],
) -> list[dict]:
    """The rows of :func:`bench_dilated_attention` for one T (inputs freed on return)."""
    q, k, v = (torch.randn(batch, length, heads, head_dim, device=device, dtype=dtype) for _ in range(3))
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    flash_ms = _time(_flash_causal(q, k, v), device)
    flash_flops = 4 * batch * heads * head_dim * length * (length + 1) // 2
    rows = []
    for dilation, window, sinks in patterns:
        pairs = allowed_pairs(length, dilation, window, sinks)
        if device.type == "cpu":
            # Smoke: the closed form against the mask it counts.
            assert pairs == int(dilated_mask(length, dilation, window, sinks).sum()), "allowed_pairs is off"
        check = check_against_reference(q, k, v, dilation, window, sinks, *check_rows)
        triton_fwd = functools.partial(
            dilated_attention, q, k, v, dilation=dilation, window=window, sinks=sinks, backend="triton"
        )
        triton_ms = _time(triton_fwd, device)
        reference_ms, note = None, ""
        if 3 * length * length > REFERENCE_MASK_LIMIT:
            note = f"skipped: the T x T mask and its bias would take ~{3 * length * length / 1e9:.0f} GB"
        else:
            mask = dilated_mask(length, dilation, window, sinks, device=device)
            try:
                reference = functools.partial(F.scaled_dot_product_attention, qt, kt, vt, attn_mask=mask)
                reference_ms = _time(reference, device)
            except (RuntimeError, torch.OutOfMemoryError) as error:
                note = f"failed: {error}"[:200]
            del mask
        flops = 4 * batch * heads * head_dim * pairs
        rows.append({
            "T": length, "batch": batch, "dilation": dilation, "window": window, "sinks": sinks,
            "keys_per_query": pairs / length, "triton_ms": triton_ms, "triton_tflops": flops / triton_ms / 1e9,
            "reference_ms": reference_ms, "reference_note": note, "flash_causal_ms": flash_ms,
            "flash_causal_tflops": flash_flops / flash_ms / 1e9, "speedup_vs_flash": flash_ms / triton_ms,
            "check": check,
        })  # fmt: skip
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def format_table(rows: list[dict]) -> str:
    """The rows as a fixed-width text table."""
    header = (
        f"{'T':>6} {'B':>4} {'D':>3} {'W':>4} {'I':>2} {'keys/q':>8} {'triton ms':>10} {'TFLOP/s':>8} "
        f"{'ref ms':>9} {'flash ms':>9} {'flash TF':>8} {'vs flash':>8} {'max abs':>8} {'rel err':>8}"
    )
    lines = [header]
    for row in rows:
        reference = f"{row['reference_ms']:>9.3f}" if row["reference_ms"] is not None else f"{'-':>9}"
        lines.append(
            f"{row['T']:>6} {row['batch']:>4} {row['dilation']:>3} {row['window']:>4} {row['sinks']:>2} "
            f"{row['keys_per_query']:>8.1f} {row['triton_ms']:>10.3f} {row['triton_tflops']:>8.1f} {reference} "
            f"{row['flash_causal_ms']:>9.3f} {row['flash_causal_tflops']:>8.1f} {row['speedup_vs_flash']:>7.2f}x "
            f"{row['check']['max_abs_err']:>8.1e} {row['check']['rel_err']:>8.1e}"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command line: ``--out`` (JSON path), ``--smoke``, ``--seq-lens``, ``--tokens``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="write the rows and the environment as JSON here")
    parser.add_argument(
        "--smoke", action="store_true", help="toy sizes; on CPU the kernel runs under TRITON_INTERPRET=1"
    )
    parser.add_argument("--seq-lens", type=int, nargs="+", default=None, help=f"values of T (default {SEQ_LENS})")
    parser.add_argument("--tokens", type=int, default=None, help="batch * T (default 262144; smoke 128)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Run the benchmark from the command line; prints the table, writes ``--out``."""
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if args.smoke:
        if not cuda:
            # Read by triton.jit when the kernel module is imported (on the first Triton call).
            os.environ.setdefault("TRITON_INTERPRET", "1")
        sizes = {"tokens": args.tokens or 128, "heads": 2, "head_dim": 16, "seq_lens": args.seq_lens or (32, 64)}
    elif not cuda:
        raise SystemExit("the benchmark needs a CUDA GPU; use --smoke for a CPU run at toy sizes")
    else:
        sizes = {"tokens": args.tokens or 262_144, "heads": 16, "head_dim": 128, "seq_lens": args.seq_lens or SEQ_LENS}
    rows = bench_dilated_attention(**sizes, device="cuda" if cuda else "cpu")
    print(format_table(rows))
    if args.out:
        from rat_lightning.ops.dilated_attention import triton as dilated_triton

        write_report(args.out, {
            "dtype": "bfloat16",
            "sizes": {key: list(value) if key == "seq_lens" else value for key, value in sizes.items()},
            "configs": {name: config._asdict() for name, config in dilated_triton.CONFIGS.items()},
            "rows": rows,
        })  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
