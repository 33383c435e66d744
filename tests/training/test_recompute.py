"""Activation checkpointing through the app: RAT+ joint training recomputes under its patterns,
and a second recompute from the strategy is refused."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from lightning.pytorch.strategies import FSDPStrategy

from rat_lightning.cli import main
from rat_lightning.errors import ConfigError
from rat_lightning.model import ModelConfig
from rat_lightning.model.lm import Block
from rat_lightning.training import LanguageModelModule

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_joint_training_with_activation_checkpointing_runs_through_the_cli(tmp_path, monkeypatch):
    from rat_lightning.data import prepare

    corpus = Path(__file__).resolve().parents[2] / "data" / "corpus" / "alice.txt"
    prepare([str(corpus)], str(tmp_path / "data"), vocab_size=300)
    monkeypatch.chdir(tmp_path)
    configs = [CONFIGS / "model" / "rat_plus-tiny.yaml", CONFIGS / "trainer" / "cpu.yaml",
               CONFIGS / "experiment" / "rat_plus-pretrain.yaml"]
    flags = ["--data.data_dir", str(tmp_path / "data"), "--data.seq_len", "64", "--data.batch_size", "2",
             "--model.config.activation_checkpointing", "true", "--trainer.max_steps", "2",
             "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "2"]
    main(["fit", *[arg for path in configs for arg in ("--config", str(path))], *flags])
    assert list((tmp_path / "runs" / "rat_plus-pretrain").rglob("last.ckpt"))


def test_recompute_in_the_model_and_the_strategy_is_refused():
    module = LanguageModelModule(ModelConfig(activation_checkpointing=True))
    module._trainer = SimpleNamespace(strategy=FSDPStrategy(activation_checkpointing_policy={Block}))
    with pytest.raises(ConfigError, match="activation_checkpointing_policy"):
        module.setup("fit")
    module._trainer = SimpleNamespace(strategy=FSDPStrategy())
    module.setup("fit")
