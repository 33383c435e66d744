"""Every chunk-attention kernel and the recurrence's step kernel compile for sm_90 (no GPU needed):
the interpreter runs Python and misses what only the compiler rejects, such as a loop-carried
variable that changes type."""

from __future__ import annotations

import os
import subprocess
import sys


def test_chunk_attention_kernels_compile_for_hopper():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "rat_lightning.bench.kernel_report"], capture_output=True, text=True, env=env,
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    kernels = ("fwd ", "fwd_long", "rows factored", "rows full", "dq ", "dq_long", "dkv ", "dkv_long")
    regrouped = tuple(f"regrouped {name} " for name in ("regroup", "merge", "prepare", "query_grads"))
    steps = ("recurrence_step k state ", "recurrence_step k ", "recurrence_step state ")
    for kernel in kernels + regrouped + steps + ("move_summaries keys ", "move_summaries keys, values"):
        assert kernel in result.stdout, result.stdout
