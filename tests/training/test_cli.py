"""End to end through the real LightningCLI on a slice of the shipped corpus."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from rat_lightning.cli import main
from tests.training.conftest import scalars, write_config


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_fit_logs_checkpoints_and_resumes_exactly(tmp_path, prepared):
    config = write_config(tmp_path, prepared)
    main(["fit", "--config", str(config)])
    run = tmp_path / "run"
    logged = scalars(run)
    for tag in ("train/loss", "val/loss", "val/ppl", "train/tokens_per_s"):
        assert logged.get(tag), f"{tag} missing from TensorBoard events"
        assert all(math.isfinite(v) for v in logged[tag])
    assert (run / "tb" / "version_0" / "config.yaml").exists(), "the resolved config is saved with the run"
    ckpts = {p.name for p in (run / "ckpt").iterdir()}
    assert {"last.ckpt", "epoch=0-step=3.ckpt", "epoch=0-step=6.ckpt"} <= ckpts

    # Resume from the step-3 checkpoint in a fresh run: steps 4-6 must reproduce the first run.
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    resumed = write_config(resumed_dir, prepared)
    main(["fit", "--config", str(resumed), "--ckpt_path", str(run / "ckpt" / "epoch=0-step=3.ckpt")])
    final = torch.load(resumed_dir / "run" / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert final["global_step"] == 6
    # data.seq_len and the tokenizer's vocabulary are linked into the model config.
    assert final["hyper_parameters"]["config"]["max_seq_len"] == 32
    assert final["hyper_parameters"]["config"]["vocab_size"] == 512
    uninterrupted = weights(run / "ckpt" / "epoch=0-step=6.ckpt")
    for name, tensor in final["state_dict"].items():
        assert torch.equal(tensor, uninterrupted[name]), f"{name} differs after resume"

    # `--ckpt_path last` continues the same run directory.
    main(["fit", "--config", str(config), "--trainer.max_steps", "8", "--ckpt_path", "last"])
    assert torch.load(run / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 8


def test_validate_test_predict_on_a_checkpoint(tmp_path, prepared):
    config = write_config(tmp_path, prepared, max_steps=3)
    main(["fit", "--config", str(config)])
    ckpt = str(tmp_path / "run" / "ckpt" / "last.ckpt")
    # The Python API: the checkpoint alone rebuilds the model (config saved as plain data).
    from rat_lightning.training import LanguageModelModule

    loaded = LanguageModelModule.load_from_checkpoint(ckpt, map_location="cpu")
    assert loaded.config.d_model == 32 and loaded.config.vocab_size == 512
    for name, tensor in weights(Path(ckpt)).items():
        assert torch.equal(loaded.state_dict()[name], tensor)
    cli = main(["validate", "--config", str(config), "--ckpt_path", ckpt])
    assert math.isfinite(cli.trainer.callback_metrics["val/loss"].item())
    cli = main(["test", "--config", str(config), "--ckpt_path", ckpt, "--trainer.limit_test_batches", "2"])
    assert math.isfinite(cli.trainer.callback_metrics["test/ppl"].item())
    cli = main(
        ["predict", "--config", str(config), "--ckpt_path", ckpt, "--trainer.limit_predict_batches", "1",
         "--model.generate_tokens", "5"]
    )
    assert cli.trainer.predict_loop.predictions[0]["generated"].shape == (4, 5)
    lines = (Path(cli.trainer.log_dir) / "predictions.jsonl").read_text().splitlines()
    predictions = cli.trainer.predict_loop.predictions
    assert len(lines) == sum(len(p["generated"]) for p in predictions)
    record = json.loads(lines[0])
    assert record["prompt"] and isinstance(record["generated"], str)


def test_print_config_shows_every_knob(tmp_path, prepared, capsys):
    config = write_config(tmp_path, prepared)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["config"]["chunk_size"] == 8
    assert {"n_groups", "window", "ffn", "tie_embeddings", "backend"} <= set(printed["model"]["config"])
    assert {"lr", "betas", "weight_decay", "warmup", "min_lr"} <= set(printed["model"])


@pytest.mark.parametrize(
    "override, message",
    [
        (["--model.config.not_a_field", "3"], "not_a_field"),
        (["--model.config.d_model", "12.5"], "d_model"),
        (["--model.config.n_layers", "-1"], "model.n_layers must be a positive integer"),
        (["--model.config.d_model", "30", "--model.config.n_heads", "4"], "must be divisible by model.n_heads"),
        (["--model.config.mixer", "transformer"], "unknown names"),
        (["--data.seq_len", "0"], "data.seq_len must be a positive int"),
        (["--data.data_dir", "/nonexistent/prepared"], "/nonexistent/prepared"),
    ],
)
def test_bad_input_stops_with_a_clear_message(tmp_path, prepared, capsys, override, message):
    config = write_config(tmp_path, prepared)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), *override])
    assert exit_info.value.code not in (0, None)
    assert message in capsys.readouterr().err


def test_bad_yaml_file_names_the_file(tmp_path, capsys):
    config = tmp_path / "broken.yaml"
    config.write_text("model:\n  config:\n    d_model: [unclosed\n")
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config)])
    err = capsys.readouterr().err
    assert f"{config}:4:1: invalid YAML" in err


def test_missing_config_file_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(tmp_path / "nope.yaml")])
    assert "nope.yaml does not exist" in capsys.readouterr().err


def test_bf16_mixed_with_fused_adam_and_clipping_trains(tmp_path, prepared):
    # Lightning's mixed-precision plugin refuses to clip gradients of a fused optimizer; found
    # on the GPU with configs/trainer/gpu-bf16.yaml. bf16 autocast runs on the CPU too.
    config = write_config(tmp_path, prepared, max_steps=2)
    main(["fit", "--config", str(config), "--trainer.precision", "bf16-mixed", "--trainer.gradient_clip_val", "0.5"])
    state = torch.load(tmp_path / "run" / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 2
