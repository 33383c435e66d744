"""Plot a layer-benchmark JSON (from :mod:`rat_lightning.bench.layer`) beside the targets.

    python -m rat_lightning.bench.plot docs/benchmarks/layer_h100.json docs/benchmarks/layer_h100.png [GPU]

GPU names the machine in the title (default H100); the issue's reference lines are H100 numbers.
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# The kernels issue's H100 reference points (fwd+bwd ms at 262,144 tokens per step).
FLOOR = {4096: 47, 16384: 53, 65536: 72, 131072: 101}
TARGET = {4096: 52, 16384: 58, 65536: 80, 131072: 112}
PAPER_CODE = {4096: 153, 16384: 161, 65536: 190, 131072: 227}


def plot_layer(path: str, out: str, gpu: str = "H100") -> plt.Figure:
    """Forward+backward ms against T for each variant and the floors measured with them, beside the
    issue's target, floor and the paper's code (H100 numbers); ``gpu`` names the measured machine.
    Writes the PNG ``out`` and returns the figure."""
    rows = json.load(open(path))
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    measured = (("rat", "o-"), ("attention_sdpa", "o-"), ("rat_reference_compiled", "o-"), ("floor", "s--"),
                ("floor_in_sequence", "d--"), ("floor_noncausal_half", "s:"))  # fmt: skip
    for variant, style in measured:
        # NaN (out of memory) never equals itself: those points are left out.
        timed = [r for r in rows if r["variant"] == variant and r["fwd_bwd_ms"] == r["fwd_bwd_ms"]]
        points = sorted((r["T"], r["fwd_bwd_ms"]) for r in timed)
        if points:
            ax.plot(*zip(*points), style, label=f"{variant} (measured, same run)")
    references = (("target (issue 6, H100)", TARGET, "r-."), ("floor (issue 6, H100)", FLOOR, "k--"),
                  ("paper's RAT code (issue 6, H100)", PAPER_CODE, "k:"))
    for name, table, style in references:
        ax.plot(list(table), list(table.values()), style, label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length T (batch = 262,144 / T)")
    ax.set_ylabel("forward + backward, ms")
    ax.set_title(f"One layer, d=2048, 16x128 heads, L=16, G=2, bf16, {gpu}")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return fig


if __name__ == "__main__":
    plot_layer(*sys.argv[1:4])
