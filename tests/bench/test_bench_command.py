"""``rat-lightning bench NAME [args]`` runs a benchmark module with its own arguments."""

import json

import pytest

from rat_lightning.cli import bench_names, main


def test_lists_the_benchmarks(capsys):
    assert main(["bench"]) is None
    out = capsys.readouterr().out
    assert {"layer", "decode", "generation", "recurrence"} <= set(bench_names())
    assert "layer" in out and "generation" in out and "timing" not in out


def test_unknown_benchmark_is_named_with_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "layers"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown benchmark 'layers'" in err and "layer" in err


# In-process the module was imported by an earlier test; runpy then warns that it runs a second
# copy. From the command line it is a fresh process.
@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")
def test_runs_a_benchmark_with_its_arguments(tmp_path):
    out = tmp_path / "generation.json"
    main(["bench", "generation", "--smoke", "--prompt-len", "12", "--new-tokens", "3", "--micro-batch", "1",
          "--batch", "2", "--warmup", "1", "--mixers", "rat", "--out", str(out)])  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert [row["mixer"] for row in rows] == ["rat"] and rows[0]["batch"] == 2
