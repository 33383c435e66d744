"""``SparseInferenceEval``: score one model under a grid of inference patterns at validation.

For every pattern: validation loss, perplexity and next-token accuracy on the first
``max_batches`` validation batches, and the KV-cache bytes per sequence that pattern holds (and
reads per token) at the validation length. Logged as TensorBoard scalars ``sparse/<label>/...``,
a loss-vs-KV-bytes figure, and a CSV and JSON table under ``<log_dir>/sparse_eval/``.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from rat_lightning.errors import ConfigError
from rat_lightning.model.loss import IGNORE_INDEX, cross_entropy_sum
from rat_lightning.sparse.pattern import InferencePattern

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
COLUMNS = ("pattern", "loss", "ppl", "accuracy", "tokens", "kv_bytes", "kv_read_bytes", "kv_fraction")


class SparseInferenceEval(L.Callback):
    """Evaluate the model under several inference patterns after validation.

    Runs in ``fit`` (every ``every_n_validations``-th validation) and in ``validate``. The model's
    own pattern is restored afterwards; training is not affected.

    Args:
        patterns: the grid; each an :class:`InferencePattern` (``dilation``, ``window``, ``sinks``,
            ``topk_blocks``, ``dense_layers``, ``dense_heads``, ``name``). Dense is added first if
            missing, as the reference row.
        every_n_validations: run at every n-th validation of ``fit`` (1 = each).
        max_batches: validation batches scored per pattern (None: all); keeps it cheap to leave on.
        cache_dtype: dtype the KV bytes are counted in (the decoding cache's dtype).
        output_dir: where the tables go; default ``<log_dir>/sparse_eval``.
    """

    def __init__(
        self,
        patterns: list[InferencePattern],
        every_n_validations: int = 1,
        max_batches: int | None = 16,
        cache_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16",
        output_dir: str | None = None,
    ) -> None:
        if every_n_validations < 1:
            raise ConfigError(f"SparseInferenceEval.every_n_validations must be >= 1, got {every_n_validations}")
        if max_batches is not None and max_batches < 1:
            raise ConfigError(f"SparseInferenceEval.max_batches must be >= 1 or null, got {max_batches}")
        patterns = [InferencePattern(**p) if isinstance(p, dict) else p for p in patterns]
        if not any(p.is_dense and not p.dense_layers for p in patterns):
            patterns.insert(0, InferencePattern(name="dense"))
        labels = [p.label() for p in patterns]
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise ConfigError(f"SparseInferenceEval.patterns: labels {repeated} repeat; give each a distinct name")
        self.patterns = patterns
        self.every_n_validations = every_n_validations
        self.max_batches = max_batches
        self.cache_dtype = _DTYPES[cache_dtype]
        self.output_dir = output_dir
        self._validations = 0
        self._step: int | None = None  # the evaluated checkpoint's step, outside fit
        self.last_results: list[dict[str, Any]] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Fail before any training if a pattern cannot apply to this model or sequence length.
        seq_len = getattr(trainer.datamodule, "seq_len", None) if trainer.datamodule is not None else None
        for pattern in self.patterns:
            pl_module.model.check_pattern(pattern, seq_len)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn != "fit" and trainer.ckpt_path:
            # validate restores the weights but not the step; tables are named by the step trained.
            saved = torch.load(trainer.ckpt_path, map_location="cpu", weights_only=True, mmap=True)
            self._step = int(saved.get("global_step", 0))

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._validations += 1
        if trainer.state.fn == "fit" and (self._validations - 1) % self.every_n_validations:
            return
        loader = trainer.val_dataloaders
        loader = loader[0] if isinstance(loader, (list, tuple)) else loader
        self.last_results = [self._score(trainer, pl_module, loader, p) for p in self.patterns]
        dense_bytes = self.last_results[0]["kv_bytes"]
        for row in self.last_results:
            row["kv_fraction"] = row["kv_bytes"] / dense_bytes if dense_bytes else math.nan
        self._report(trainer)

    @torch.no_grad()
    def _score(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loader: Any, pattern: InferencePattern
    ) -> dict[str, Any]:
        model = pl_module.model
        total = torch.zeros(3, dtype=torch.float64, device=pl_module.device)  # loss sum, correct, tokens
        length = 0
        with model.using_pattern(pattern), trainer.precision_plugin.forward_context():
            for index, batch in enumerate(loader):
                if self.max_batches is not None and index >= self.max_batches:
                    break
                input_ids, targets = (t.to(pl_module.device) for t in batch)
                length = max(length, input_ids.shape[1])
                logits = model(input_ids)
                kept = targets != IGNORE_INDEX
                loss = cross_entropy_sum(logits, targets)
                correct = ((logits.argmax(-1) == targets) & kept).sum()
                total += torch.stack([loss.double(), correct.double(), kept.sum().double()])
            total = trainer.strategy.reduce(total, reduce_op="sum")
            kv_bytes = model.cache_bytes(length, self.cache_dtype)
            read_bytes = model.cache_bytes(length, self.cache_dtype, read=True)
        loss, correct, tokens = total.tolist()
        mean = loss / max(tokens, 1)
        return {
            "pattern": pattern.label(),
            "loss": mean,
            "ppl": math.exp(min(mean, 50.0)),
            "accuracy": correct / max(tokens, 1),
            "tokens": int(tokens),
            "kv_bytes": kv_bytes,
            "kv_read_bytes": read_bytes,
        }

    @rank_zero_only
    def _report(self, trainer: L.Trainer) -> None:
        step = trainer.global_step if trainer.state.fn == "fit" or self._step is None else self._step
        metrics = {}
        for row in self.last_results:
            for key in ("loss", "ppl", "accuracy", "kv_bytes"):
                metrics[f"sparse/{row['pattern']}/{key}"] = float(row[key])
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        folder = Path(self.output_dir or Path(trainer.log_dir or trainer.default_root_dir) / "sparse_eval")
        folder.mkdir(parents=True, exist_ok=True)
        stem = folder / f"step{step:08d}"
        with open(stem.with_suffix(".csv"), "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(self.last_results)
        stem.with_suffix(".json").write_text(json.dumps({"step": step, "results": self.last_results}, indent=2))
        figure = loss_vs_kv_figure(self.last_results, f"step {step}")
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure("sparse/loss_vs_kv_bytes", figure, global_step=step)
        figure.savefig(stem.with_suffix(".png"), dpi=120, bbox_inches="tight")


def loss_vs_kv_figure(results: list[dict[str, Any]], title: str) -> Any:
    """A matplotlib figure: validation loss against KV bytes read per token, one labelled point
    per pattern (log x axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for row in results:
        axis.scatter(row["kv_read_bytes"], row["loss"])
        axis.annotate(row["pattern"], (row["kv_read_bytes"], row["loss"]), fontsize=7, xytext=(3, 3),
                      textcoords="offset points")
    axis.set_xscale("log")
    axis.set_xlabel("KV bytes read per token (per sequence, all layers)")
    axis.set_ylabel("validation loss")
    axis.set_title(title)
    axis.grid(True, alpha=0.3)
    figure.tight_layout()
    return figure
