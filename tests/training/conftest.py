"""Shared pieces of the app tests: a tokenized slice of the shipped corpus, a small fit config,
and a reader of the TensorBoard scalars a run wrote."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "data" / "corpus" / "alice.txt"


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> Path:
    """Alice in Wonderland tokenized once for the session (vocab 512)."""
    from rat_lightning.data import prepare

    out = tmp_path_factory.mktemp("prepared")
    prepare([str(CORPUS)], str(out), vocab_size=512)
    return out


def write_config(tmp_path: Path, prepared: Path, max_steps: int = 6) -> Path:
    run = tmp_path / "run"
    config = {
        "seed_everything": 7,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": max_steps,
            "val_check_interval": 3,
            "limit_val_batches": 2,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "default_root_dir": str(run),
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(run), "name": "tb"},
            },
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {
                        "dirpath": str(run / "ckpt"),
                        "save_last": True,
                        "every_n_train_steps": 3,
                        "save_top_k": -1,
                    },
                }
            ],
        },
        "model": {"config": {"d_model": 32, "n_layers": 2, "n_heads": 2, "chunk_size": 8}, "lr": 1e-2, "warmup": 2},
        "data": {"data_dir": str(prepared), "seq_len": 32, "batch_size": 4},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def scalars(run: Path) -> dict[str, list[float]]:
    values: dict[str, list[float]] = {}
    for events in run.glob("tb/version_*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            values.setdefault(tag, []).extend(e.value for e in accumulator.Scalars(tag))
    return values


