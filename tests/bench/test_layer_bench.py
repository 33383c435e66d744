"""The layer benchmark's summary: the RAT layer over the floor measured in the same run."""

from rat_lightning.bench.layer import floor_ratios


def _row(length: int, variant: str, fwd_bwd: float, fwd: float) -> dict:
    return {"T": length, "batch": 262_144 // length, "variant": variant, "fwd_bwd_ms": fwd_bwd, "fwd_ms": fwd}


def test_floor_ratios_divide_rat_by_each_floor_of_its_length():
    rows = [
        _row(4096, "rat", 55.0, 18.0),
        _row(4096, "floor", 50.0, 15.0),
        _row(4096, "floor_noncausal_half", 44.0, 12.0),
        _row(4096, "floor_in_sequence", 52.0, 16.0),
        _row(65536, "rat", 88.0, 24.0),
        _row(65536, "floor", 80.0, 20.0),
        # No floor measured at this length: no line for it.
        _row(131072, "rat", 120.0, 30.0),
    ]
    lines = floor_ratios(rows)
    assert lines == [
        "   4096 rat / floor: fwd+bwd 1.100x (55.0 / 50.0 ms), prefill 1.200x",
        "   4096 rat / floor_in_sequence: fwd+bwd 1.058x (55.0 / 52.0 ms), prefill 1.125x",
        "   4096 rat / floor_noncausal_half: fwd+bwd 1.250x (55.0 / 44.0 ms), prefill 1.500x",
        "  65536 rat / floor: fwd+bwd 1.100x (88.0 / 80.0 ms), prefill 1.200x",
    ]


def test_plot_names_the_gpu_and_leaves_out_rows_that_ran_out_of_memory(tmp_path):
    import json

    import matplotlib.pyplot as plt

    from rat_lightning.bench.plot import plot_layer

    rows = [_row(4096, "rat", 55.0, 18.0), _row(65536, "rat", 88.0, 24.0), _row(131072, "rat", float("nan"), 30.0)]
    path = tmp_path / "layer.json"
    path.write_text(json.dumps(rows))
    fig = plot_layer(str(path), str(tmp_path / "layer.png"), gpu="H200")
    try:
        assert fig.axes[0].get_title().endswith("bf16, H200")
        rat = next(line for line in fig.axes[0].get_lines() if line.get_label().startswith("rat "))
        assert list(rat.get_xdata()) == [4096, 65536]
        assert (tmp_path / "layer.png").stat().st_size > 0
    finally:
        plt.close(fig)
