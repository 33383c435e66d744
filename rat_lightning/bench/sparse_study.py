"""The RAT+ sparse-inference study, end to end through the app (``rat-lightning fit``).

1. Pretrain, on the same tokens, a RAT+ model and its attention baseline (both with active
   recurrence learning, the paper's recipe) and an attention model trained dense only.
2. At the end of pretraining, :class:`SparseInferenceEval` scores each model under the grid
   (dense, dilation D in {4, 16, 64} with and without a local window, layer and head hybrids,
   top-k block).
3. Resolution adaptation: each model is fine-tuned briefly from its checkpoint under a few
   patterns and scored again under that pattern.
4. One JSON, a markdown table and a plot summarise it.

    python -m rat_lightning.bench.sparse_study --out docs/benchmarks/sparse_study

Runs in-process (one Python, one CUDA context); needs the prepared corpus (``data/prepared``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import yaml

GRID: list[dict[str, Any]] = [
    {"dilation": 4},
    {"dilation": 16},
    {"dilation": 64},
    {"dilation": 4, "window": 64},
    {"dilation": 16, "window": 64},
    {"dilation": 64, "window": 64},
    {"dilation": 16, "window": 64, "sinks": 4},
    {"dilation": 64, "dense_layers": [0, -1]},
    {"dilation": 64, "dense_heads": 1},
    {"topk_blocks": 4, "block_size": 16},
    {"topk_blocks": 2, "block_size": 64},
]
# Every structured pattern of the grid with D > 1 and no hybrid, adapted one by one.
ADAPT: list[dict[str, Any]] = [{"dilation": d, **({"window": w} if w else {})} for w in (0, 64) for d in (4, 16, 64)]
MODELS = {
    # name: (mixer, joint pattern)
    "rat_plus": ("rat_plus", {"dilation": 64}),
    "attention_joint": ("gated_attention", {"dilation": 64}),
    "attention_dense": ("gated_attention", None),
}


def _config(args: argparse.Namespace, run: Path, mixer: str, joint: dict | None, steps: int, lr: float,
            patterns: list[dict[str, Any]], warmup: float) -> dict[str, Any]:
    return {
        "seed_everything": args.seed,
        "trainer": {
            "accelerator": "auto",
            "devices": 1,
            "precision": args.precision,
            "max_steps": steps,
            "val_check_interval": steps,
            "check_val_every_n_epoch": None,
            "log_every_n_steps": 20,
            "gradient_clip_val": 1.0,
            "enable_progress_bar": False,
            "default_root_dir": str(run),
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(run), "name": "tb"},
            },
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(run / "ckpt"), "save_last": True}},
                {"class_path": "rat_lightning.training.SparseInferenceEval",
                 "init_args": {"patterns": patterns, "max_batches": None}},
            ],
        },
        "model": {
            "config": {"d_model": args.d_model, "n_layers": args.layers, "n_heads": args.heads, "mixer": mixer},
            "lr": lr,
            "min_lr": 1e-6 if warmup == 0 else lr / 10,
            "warmup": warmup,
            "weight_decay": 0.1,
            "joint_pattern": joint,
        },
        "data": {
            "data_dir": args.data_dir,
            "seq_len": args.seq_len,
            "batch_size": args.batch_size,
            "val_fraction": args.val_fraction,
        },
    }


def _fit(config: dict[str, Any], run: Path, extra: list[str]) -> tuple[list[dict[str, Any]], float]:
    from rat_lightning.cli import main

    run.mkdir(parents=True, exist_ok=True)
    path = run / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    started = time.perf_counter()
    main(["fit", "--config", str(path), *extra])
    seconds = time.perf_counter() - started
    table = sorted(run.glob("tb/version_*/sparse_eval/step*.json"))[-1]
    return json.loads(table.read_text())["results"], seconds


def run_study(args: argparse.Namespace) -> dict[str, Any]:
    """Pretrain, score, adapt and score again; returns the summary (also written to --out)."""
    out = Path(args.out)
    work = Path(args.work)
    summary: dict[str, Any] = {"settings": {k: v for k, v in vars(args).items()}, "models": {}}
    for name, (mixer, joint) in MODELS.items():
        run = work / name / "pretrain"
        config = _config(args, run, mixer, joint, args.steps, args.lr, GRID, warmup=0.05)
        before, seconds = _fit(config, run, [])
        entry = {"mixer": mixer, "joint_pattern": joint, "pretrain_seconds": seconds, "before": before, "after": {}}
        for pattern in ADAPT:
            label_run = work / name / ("adapt_" + "_".join(f"{k}{v}" for k, v in pattern.items()))
            config = _config(args, label_run, mixer, None, args.adapt_steps, args.lr / 10, [pattern], warmup=0)
            config["model"]["init_from"] = str(run / "ckpt" / "last.ckpt")
            config["model"]["config"]["pattern"] = pattern
            after, seconds = _fit(config, label_run, [])
            entry["after"][after[1]["pattern"]] = {**after[1], "adapt_seconds": seconds, "dense_after": after[0]}
        summary["models"][name] = entry
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "table.md").write_text(markdown_table(summary))
    plot(summary, out / "loss_vs_kv.png")
    return summary


def markdown_table(summary: dict[str, Any]) -> str:
    """Validation loss per pattern (rows) and model (columns), before and after adaptation."""
    models = list(summary["models"])
    first = summary["models"][models[0]]["before"]
    header = "| pattern | KV bytes/seq (RAT+) | " + " | ".join(models) + " |"
    lines = [header, "|" + "---|" * (len(models) + 2)]
    for index, row in enumerate(first):
        cells = [f"{summary['models'][m]['before'][index]['loss']:.3f}" for m in models]
        lines.append(f"| {row['pattern']} | {row['kv_bytes']:,} | " + " | ".join(cells) + " |")
    for label in summary["models"][models[0]]["after"]:
        cells = [f"{summary['models'][m]['after'][label]['loss']:.3f}" for m in models]
        lines.append(f"| {label}, adapted | {summary['models'][models[0]]['after'][label]['kv_bytes']:,} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path) -> None:
    """Loss against KV bytes read per token, one series per model, adapted points hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 5))
    for (name, entry), colour in zip(summary["models"].items(), ("C0", "C1", "C2")):
        rows = [r for r in entry["before"] if not r["pattern"].startswith("top")]
        axis.scatter([r["kv_read_bytes"] for r in rows], [r["loss"] for r in rows], color=colour, label=name)
        tops = [r for r in entry["before"] if r["pattern"].startswith("top")]
        axis.scatter([r["kv_read_bytes"] for r in tops], [r["loss"] for r in tops], color=colour, marker="^")
        adapted = list(entry["after"].values())
        axis.scatter([r["kv_read_bytes"] for r in adapted], [r["loss"] for r in adapted], facecolors="none",
                     edgecolors=colour, s=80, label=f"{name}, adapted")
    axis.set_xscale("log")
    axis.set_xlabel("KV bytes read per token (bf16, all layers)")
    axis.set_ylabel("validation loss")
    axis.set_title("Sparse inference: circles structured patterns, triangles top-k block")
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=130)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/benchmarks/sparse_study")
    parser.add_argument("--work", default="runs/sparse_study", help="checkpoints and TensorBoard runs")
    parser.add_argument("--data-dir", default="data/prepared/corpus")
    parser.add_argument("--d-model", type=int, default=384)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--val-fraction", type=float, default=0.05)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--adapt-steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--seed", type=int, default=1234)
    summary = run_study(parser.parse_args())
    print(markdown_table(summary))


if __name__ == "__main__":
    main()
