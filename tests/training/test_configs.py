"""Every shipped YAML parses, composes and builds; the tiny ones train a step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from rat_lightning.cli import main
from rat_lightning.model import ModelConfig, RATLanguageModel

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
MODEL_CONFIGS = sorted((CONFIGS / "model").glob("*.yaml"))


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_is_valid_yaml_with_known_sections(path):
    content = yaml.safe_load(path.read_text())
    assert set(content) <= {"seed_everything", "trainer", "model", "data", "ckpt_path"}


@pytest.mark.parametrize("path", MODEL_CONFIGS, ids=lambda p: p.stem)
def test_model_configs_build(path):
    fields = yaml.safe_load(path.read_text())["model"]["config"]
    config = ModelConfig(vocab_size=32000, **fields)
    with torch.device("meta"):
        model = RATLanguageModel(config)
    limits = {"tiny": (0.5e6, 20e6), "130m": (100e6, 190e6), "1.3b": (1.1e9, 1.6e9), "1.5b": (1.3e9, 1.7e9)}
    expected = limits[path.stem.split("-")[-1]]
    assert expected[0] < model.num_parameters() < expected[1]


@pytest.mark.parametrize("path", [p for p in MODEL_CONFIGS if p.stem.endswith("tiny")], ids=lambda p: p.stem)
def test_tiny_configs_train_through_the_cli(tmp_path, path):
    from rat_lightning.data import prepare

    corpus = Path(__file__).resolve().parents[2] / "data" / "corpus" / "alice.txt"
    prepare([str(corpus)], str(tmp_path / "data"), vocab_size=300)
    main(
        ["fit", "--config", str(path), "--config", str(CONFIGS / "trainer" / "cpu.yaml"),
         "--data.data_dir", str(tmp_path / "data"), "--data.seq_len", "64", "--data.batch_size", "2",
         "--trainer.fast_dev_run", "1", "--trainer.default_root_dir", str(tmp_path)]
    )


def test_quickstart_composes_with_the_data_config():
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--config", str(CONFIGS / "data" / "corpus.yaml"),
              "--print_config"])
    assert exit_info.value.code == 0


def test_rat_plus_recipes_compose_and_train(tmp_path, monkeypatch):
    from rat_lightning.data import prepare

    corpus = Path(__file__).resolve().parents[2] / "data" / "corpus" / "alice.txt"
    prepare([str(corpus)], str(tmp_path / "data"), vocab_size=300)
    monkeypatch.chdir(tmp_path)  # the recipes write under runs/
    common = [
        "--config", str(CONFIGS / "model" / "rat_plus-tiny.yaml"), "--config", str(CONFIGS / "trainer" / "cpu.yaml"),
    ]  # fmt: skip
    small = ["--data.data_dir", str(tmp_path / "data"), "--data.seq_len", "64", "--data.batch_size", "2",
             "--trainer.limit_val_batches", "1"]
    main(["fit", *common, "--config", str(CONFIGS / "experiment" / "rat_plus-pretrain.yaml"), *small,
          "--trainer.max_steps", "2", "--trainer.val_check_interval", "2"])
    pretrain = tmp_path / "runs" / "rat_plus-pretrain"
    assert list(pretrain.rglob("sparse_eval/step00000002.json")), "the recipe's grid ran at validation"
    main(["fit", *common, "--config", str(CONFIGS / "experiment" / "rat_plus-adapt.yaml"), *small,
          "--model.init_from", str(pretrain / "checkpoints" / "last.ckpt"), "--model.config.pattern.window", "8",
          "--trainer.max_steps", "1"])
    adapted = torch.load(tmp_path / "runs" / "rat_plus-adapt" / "checkpoints" / "last.ckpt", weights_only=True)
    assert adapted["hyper_parameters"]["config"]["pattern"] == {
        "dilation": 16, "window": 8, "sinks": 4, "topk_blocks": None, "block_size": 64, "dense_layers": [],
        "dense_heads": 0, "name": None,
    }
