"""The generation benchmark's code path at toy sizes (the numbers come from the GPU run)."""

from rat_lightning.bench.generation import format_table, main


def test_smoke_run_reports_both_models(tmp_path):
    out = tmp_path / "generation.json"
    rows = main(["--smoke", "--prompt-len", "24", "--new-tokens", "6", "--micro-batch", "2", "--batch", "4",
                 "--warmup", "2", "--out", str(out)])  # fmt: skip
    assert [r["mixer"] for r in rows] == ["rat", "attention"] and out.exists()
    rat, attention = rows
    assert rat["batch"] == attention["batch"] == 4
    # Bf16 on both paths: the step after the prefill agrees with the parallel forward.
    assert rat["step_vs_forward_rel_err"] < 2e-2 and attention["step_vs_forward_rel_err"] < 2e-2
    # Per layer: 7 summaries (k, v) of 32 channels in bf16 plus the fp32 open-chunk state, against
    # 30 keys and values.
    assert rat["cache_bytes_per_sequence"] == 2 * (30 // 4) * 2 * 32 * 2 + 2 * 2 * 32 * 4
    assert attention["cache_bytes_per_sequence"] == 2 * 30 * 2 * 32 * 2
    assert all(r["decode_tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0 for r in rows)
    # The floor adds the matmuls at the larger of their weights' read time and their FLOPs at peak.
    for r in rows:
        assert r["matmul_ms_at_peak"] > 0
        assert r["step_floor_ms"] >= max(r["step_floor_bytes_ms"], r["matmul_ms_at_peak"]) * (1 - 1e-12)
    assert "RAT / attention decode throughput" in format_table(rows)


def test_profile_adds_the_step_kernels():
    rows = main(["--smoke", "--mixers", "rat", "--prompt-len", "8", "--new-tokens", "2", "--micro-batch", "2",
                 "--batch", "2", "--warmup", "1", "--profile"])  # fmt: skip
    # CPU has no CUDA kernels to list: the keys are there, empty.
    assert rows[0]["profile_ms"] == {} and rows[0]["top_kernels"] == []
    assert "rat step kernels:" in format_table(rows)
