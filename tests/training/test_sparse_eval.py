"""RAT+ through the app: joint training, the SparseInferenceEval callback in fit and validate,
resolution adaptation from a dense checkpoint, and clear errors for patterns that do not fit."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rat_lightning.cli import main
from tests.training.conftest import scalars, write_config

GRID = [
    {"dilation": 4},
    {"dilation": 4, "window": 3, "sinks": 1},
    {"dilation": 8, "dense_layers": [0]},
    {"topk_blocks": 1, "block_size": 8},
]


def rat_plus_config(tmp_path: Path, prepared: Path, mixer: str = "rat_plus", **model) -> Path:
    path = write_config(tmp_path, prepared)
    config = yaml.safe_load(path.read_text())
    config["model"]["config"].update({"mixer": mixer, "n_heads": 2})
    config["model"].update(model)
    config["trainer"]["callbacks"].append(
        {
            "class_path": "rat_lightning.training.SparseInferenceEval",
            "init_args": {"patterns": GRID, "max_batches": 2},
        }
    )
    path.write_text(yaml.safe_dump(config))
    return path


def tables(run: Path) -> list[Path]:
    return sorted(run.glob("tb/version_*/sparse_eval/step*.json"))


def test_fit_with_joint_training_writes_scalars_figure_and_tables(tmp_path, prepared):
    config = rat_plus_config(tmp_path, prepared, joint_pattern={"dilation": 8})
    main(["fit", "--config", str(config)])
    run = tmp_path / "run"
    logged = scalars(run)
    assert logged.get("train/loss_joint"), "joint training logs the sparse pass's loss"
    labels = ["dense", "D4", "D4+W3+I1", "D8|dense[0]", "top1x8"]
    for label in labels:
        for key in ("loss", "ppl", "accuracy", "kv_bytes"):
            values = logged.get(f"sparse/{label}/{key}")
            assert values and all(math.isfinite(v) for v in values), f"sparse/{label}/{key}"
    # Validation ran at steps 3 and 6: one table each.
    written = tables(run)
    assert [p.stem for p in written] == ["step00000003", "step00000006"]
    results = json.loads(written[-1].read_text())["results"]
    assert [r["pattern"] for r in results] == labels
    by_label = {r["pattern"]: r for r in results}
    # seq_len 32, 2 layers x 2 heads x head_dim 16, bf16 K and V, plus RAT+'s fp32 states.
    state = 2 * 2 * 32 * 4
    assert by_label["dense"]["kv_bytes"] == 2 * 32 * 2 * 16 * 2 * 2 + state
    assert by_label["D4"]["kv_bytes"] == 2 * 8 * 2 * 16 * 2 * 2 + state
    assert by_label["top1x8"]["kv_bytes"] == by_label["dense"]["kv_bytes"]
    assert by_label["top1x8"]["kv_read_bytes"] < by_label["dense"]["kv_read_bytes"]
    assert by_label["D4"]["loss"] != by_label["dense"]["loss"]
    with open(written[-1].with_suffix(".csv")) as file:
        assert [row["pattern"] for row in csv.DictReader(file)] == labels
    assert written[-1].with_suffix(".png").stat().st_size > 0
    events = EventAccumulator(str(written[-1].parents[1]))
    events.Reload()
    assert "sparse/loss_vs_kv_bytes" in events.Tags()["images"]


def test_validate_scores_a_checkpoint_and_adaptation_starts_from_it(tmp_path, prepared):
    dense = tmp_path / "dense"
    dense.mkdir()
    main(["fit", "--config", str(rat_plus_config(dense, prepared, mixer="gated_attention"))])
    checkpoint = dense / "run" / "ckpt" / "last.ckpt"

    main(["validate", "--config", str(rat_plus_config(dense, prepared, mixer="gated_attention")),
          "--ckpt_path", str(checkpoint)])
    assert tables(dense / "run")[-1].stem == "step00000006"  # the checkpoint's step

    # Resolution adaptation: weights from the dense checkpoint, a sparse pattern, a fresh schedule.
    adapt = tmp_path / "adapt"
    adapt.mkdir()
    config = rat_plus_config(adapt, prepared, mixer="gated_attention", init_from=str(checkpoint))
    main(["fit", "--config", str(config), "--model.config.pattern.dilation", "4", "--trainer.max_steps", "1",
          "--trainer.val_check_interval", "1"])
    start = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    adapted = torch.load(adapt / "run" / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert adapted["hyper_parameters"]["config"]["pattern"]["dilation"] == 4
    moved = [k for k in start if not torch.equal(start[k], adapted["state_dict"][k])]
    assert moved, "one step of adaptation changes the weights"
    step = max((start[k] - adapted["state_dict"][k]).abs().max().item() for k in start)
    assert step < 0.1, "adaptation starts from the dense weights, not from a fresh init"


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ({"dilation": 64}, "dilation 64 is larger than the sequence length 32"),
        ({"window": -1}, "pattern.window must be an int >= 0"),
        ({"dilation": 4, "dense_layers": [5]}, "pattern.dense_layers has [5]"),
    ],
)
def test_a_pattern_that_does_not_fit_fails_before_training(tmp_path, prepared, capsys, pattern, message):
    path = rat_plus_config(tmp_path, prepared)
    config = yaml.safe_load(path.read_text())
    config["trainer"]["callbacks"][-1]["init_args"]["patterns"] = [pattern]
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(path)])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "ckpt").exists(), "nothing trained"


def test_init_from_a_missing_file_fails_clearly(tmp_path, prepared, capsys):
    config = rat_plus_config(tmp_path, prepared, init_from=str(tmp_path / "nope.ckpt"))
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config)])
    assert "model.init_from: no checkpoint at" in capsys.readouterr().err
