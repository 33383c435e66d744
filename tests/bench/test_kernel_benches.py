"""The kernel benchmarks' code paths on CPU at toy sizes (kernels under TRITON_INTERPRET=1); the
numbers come from the GPU runs, these check that each row is measured and checked."""

import math

import torch

from rat_lightning.bench.chunk_attention import bench_chunk_attention
from rat_lightning.bench.recurrence import bench_recurrence


def test_recurrence_bench_times_and_checks_both_forms():
    rows = bench_recurrence(tokens=32, d=32, heads=2, groups=1, seq_lens=(16,), dtype=torch.float32, chunk_size=4,
                            fla_seq_lens=(), device="cpu")  # fmt: skip
    assert [row["form"] for row in rows] == ["restart_L4", "full_sequence"]
    for row in rows:
        assert row["ok"] and row["max_rel_error"] < 1e-5
        assert row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0 and row["batch"] == 2


def test_chunk_attention_bench_checks_the_kernel_and_reports_each_floor():
    rows = bench_chunk_attention(tokens=32, heads=2, groups=1, head_dim=16, chunk_size=4, seq_lens=(16,),
                                 dtype=torch.float32, device="cpu")  # fmt: skip
    assert [row["variant"] for row in rows] == ["triton", "flash_floor", "cudnn_floor"]
    triton_row = rows[0]
    assert set(triton_row["check_rel_err"]) == {"out", "dq", "dk", "dv", "dgate"}
    assert max(triton_row["check_rel_err"].values()) < 1e-5
    assert triton_row["fwd_ms"] > 0 and triton_row["fwd_bwd_ms"] > 0
    # A floor that cannot run here is reported as NaN with the reason, never as a time.
    for row in rows[1:]:
        assert row["fwd_ms"] > 0 or (math.isnan(row["fwd_ms"]) and row["floor_keys"].startswith("failed"))
