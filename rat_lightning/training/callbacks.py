"""Callbacks: writing what ``predict`` generates."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

from rat_lightning.data import load_tokenizer


class GenerationWriter(BasePredictionWriter):
    """Appends each ``predict`` batch to ``predictions.jsonl`` in the run's log directory
    (``predictions.rank<N>.jsonl`` per process when there are several), decoded with the data's
    tokenizer: one line per sequence with the prompt's last ``prompt_chars`` characters and the
    generated text.

    Args:
        prompt_chars: characters of the prompt kept for context.
    """

    def __init__(self, prompt_chars: int = 200) -> None:
        super().__init__(write_interval="batch")
        self.prompt_chars = prompt_chars

    def _path(self, trainer: L.Trainer) -> Path:
        folder = Path(trainer.log_dir or trainer.default_root_dir)
        name = "predictions.jsonl" if trainer.world_size == 1 else f"predictions.rank{trainer.global_rank}.jsonl"
        return folder / name

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = self._path(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
        self._tokenizer = load_tokenizer(trainer.datamodule.tokenizer_path)

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        with self._path(trainer).open("a") as handle:
            for prompt, generated in zip(prediction["prompt"].tolist(), prediction["generated"].tolist()):
                record = {
                    "prompt": self._tokenizer.decode(prompt)[-self.prompt_chars :],
                    "generated": self._tokenizer.decode(generated),
                }
                handle.write(json.dumps(record) + "\n")
