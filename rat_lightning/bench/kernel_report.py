"""Compile the chunk-attention kernels and the recurrence's step kernel for Hopper without a GPU,
and report registers and spills.

    python -m rat_lightning.bench.kernel_report

Builds each kernel (bf16, P = 128, 16 heads in 2 query groups, gated) at its :data:`CONFIGS`
tiles, the passes of the cuDNN path
(:mod:`rat_lightning.ops.chunk_attention.regrouped`, L = 16, at their :data:`WARPS`) and the
decoding step of the recurrence (:mod:`rat_lightning.ops.recurrence.step`, every form), for sm_90
through Triton's full pipeline, with the 16-byte alignment the JIT finds at the benchmark shape,
then runs the ptxas that ships with Triton for its register and spill report (when that ptxas
reads Triton's PTX version). It needs no GPU, so CI runs it too: a kernel that the interpreter
runs but the compiler rejects (a loop-carried variable that changes type, say) fails here.
Counts are for this machine's Triton; the GPU image's may differ.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

_FP32_POINTERS = ("lse", "delta", "p_cos", "p_sin", "lse_lib", "own_c", "own_p", "dq_own")
_FLOAT_SCALARS = ("scale", "qk_scale")
_INT_SCALARS = ("T", "C", "L", "ROWS", "NJ", "NJ_SRC", "R")


def _signature(arg_names: list[str], constexprs: dict, fp32_pointers: tuple[str, ...] = ()) -> dict[str, str]:
    """Triton types of a kernel's arguments: bf16 tensors, fp32 statistics (and, in the factored
    rows kernel, the fp32 factors it writes in place of dk, dv), and ``fp32_pointers``."""
    fp32 = _FP32_POINTERS + fp32_pointers + (("dk", "dv") if constexprs.get("FACTORED") and "dy" in arg_names else ())
    types = {}
    for name in arg_names:
        if name in constexprs:
            types[name] = "constexpr"
        elif name in fp32:
            types[name] = "*fp32"
        elif name in _FLOAT_SCALARS:
            types[name] = "fp32"
        elif name in _INT_SCALARS or name.startswith(("stride", "s_")):
            types[name] = "i32"
        else:
            types[name] = "*bf16"
    return types


def _aligned(signature: dict[str, str]) -> dict:
    """The 16-divisibility the JIT finds at the benchmark shape: every pointer, and every integer
    (T, C, L and the strides are multiples of 16 there). Without it the compiler cannot prove the
    rows contiguous and aligned, loads one element per instruction, and reports spills that the
    launched kernels do not have."""
    kinds = signature.values()
    return {(i,): [["tt.divisibility", 16]] for i, kind in enumerate(kinds) if kind not in ("constexpr", "fp32")}


def _ptxas_report(ptx: str) -> str:
    """The register and spill lines of ``ptxas -v`` for sm_90a, or why there are none."""
    import triton

    folder = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for name in ("ptxas-blackwell", "ptxas"):
        ptxas = os.path.join(folder, name)
        if not os.path.exists(ptxas):
            continue
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as handle:
            handle.write(ptx)
        result = subprocess.run([ptxas, "-v", "-arch=sm_90a", handle.name, "-o", os.devnull], capture_output=True,
                                text=True)  # fmt: skip
        os.unlink(handle.name)
        if result.returncode == 0:
            lines = [line.split("info    :")[-1].strip() for line in result.stderr.splitlines()]
            return "; ".join(line for line in lines if "spill" in line or "registers" in line)
    return "no ptxas for this PTX version"


def _compile(kernel, constexprs: dict, num_warps: int, num_stages: int = 3, fp32_pointers: tuple[str, ...] = ()) -> str:
    """ptxas's report for one kernel built for sm_90 with the benchmark's alignment."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = _signature(kernel.arg_names, constexprs, fp32_pointers)
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=_aligned(signature))
    compiled = triton.compile(
        source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )
    return _ptxas_report(compiled.asm["ptx"])


def compile_regrouped_kernels() -> list[tuple[str, str]]:
    """``(kernel and warps, ptxas report)`` for the passes around cuDNN's attention."""
    from rat_lightning.ops.chunk_attention import regrouped

    base = {"H": 16, "HPG": 8, "P": 128, "BLOCK_L": 16, "BLOCK_P": 128, "BLOCK_PH": 64, "GATED": True,
            "EMULATE": False}  # fmt: skip
    launches = {
        "regroup": regrouped.regroup_queries_kernel,
        "merge": regrouped.merge_own_state_kernel,
        "prepare": regrouped.prepare_backward_kernel,
        "query_grads": regrouped.query_grads_kernel,
    }
    rows = []
    for name, kernel in launches.items():
        constexprs = {key: value for key, value in base.items() if key in kernel.arg_names}
        warps = regrouped.WARPS[name]
        rows.append((f"regrouped {name} (warps {warps})", _compile(kernel, constexprs, warps)))
    return rows


def compile_summary_moves() -> list[tuple[str, str]]:
    """``(form, ptxas report)`` of the summary move: keys alone (the Triton path's rotation) and
    keys with values, rotated back (the cuDNN path's gradients)."""
    from rat_lightning.ops.chunk_attention import triton as kernels

    rows = []
    for has_v, inverse in ((False, False), (True, True)):
        constexprs = {"P": 128, "BLOCK_R": 64, "BLOCK_PH": 64, "INVERSE": inverse, "HAS_V": has_v, "EMULATE": False}
        report = _compile(kernels.move_summaries_kernel, constexprs, 4)
        rows.append((f"move_summaries {'keys, values' if has_v else 'keys'}", report))
    return rows


def compile_recurrence_step() -> list[tuple[str, str]]:
    """``(form, ptxas report)`` of the recurrence's decoding step: with keys (RAT, RAT+) or
    without (the RNN), from a previous state or at a chunk start; fp32 states and bias."""
    from rat_lightning.ops.recurrence import step

    rows = []
    for has_k, has_state in ((True, True), (True, False), (False, True)):
        constexprs = {"H": 16, "HPG": 8, "P": 128, "BLOCK_R": step.BLOCK_ROWS, "BLOCK_P": 128, "HAS_K": has_k,
                      "HAS_BIAS": True, "HAS_STATE": has_state}  # fmt: skip
        fp32 = ("bias", "sx_prev", "sk_prev", "sx", "sk")
        report = _compile(step.recurrence_step_kernel, constexprs, 4, fp32_pointers=fp32)
        rows.append((f"recurrence_step{' k' if has_k else ''}{' state' if has_state else ''}", report))
    return rows


def compile_kernels() -> list[tuple[str, str]]:
    """``(kernel and tiles, ptxas report)`` for the fwd, rows, dq and dkv kernels at every bf16 config."""
    from rat_lightning.ops.chunk_attention import triton as kernels

    base = {"H": 16, "HPG": 8, "P": 128, "BLOCK_P": 128, "BLOCK_PH": 64, "DOT_PRECISION": "ieee", "EMULATE": False}
    launches = {
        "fwd": kernels.chunk_attention_fwd_kernel,
        "rows": kernels.chunk_attention_bwd_kernel_rows,
        "dq": kernels.chunk_attention_bwd_kernel_dq,
        "dkv": kernels.chunk_attention_bwd_kernel_dkv,
    }
    rows = []
    for config_name, config in kernels.CONFIGS.items():
        kernel_name = config_name.split("_")[0]
        if config_name.endswith("fp32"):
            continue
        kernel = launches[kernel_name]
        # The backward kernels' factored form (the RAT mixing op's) and full form (the plain op's).
        factored_forms = (True, False) if "FACTORED" in kernel.arg_names else (None,)
        for factored in factored_forms:
            constexprs = {**base, "BLOCK_M": config.block_m, "BLOCK_N": config.block_n}
            constexprs = {key: value for key, value in constexprs.items() if key in kernel.arg_names}
            if "GATED" in kernel.arg_names:
                constexprs["GATED"] = True
            if factored is not None:
                constexprs["FACTORED"] = factored
            tiles = tuple(config)
            form = {None: "", True: " factored", False: " full"}[factored]
            report = _compile(kernel, constexprs, config.num_warps, config.num_stages)
            rows.append((f"{config_name}{form} {tiles}", report))
    return rows


def main() -> None:
    """Print one line per kernel config; exits non-zero if one does not compile."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled")
    reports = compile_kernels() + compile_summary_moves() + compile_regrouped_kernels() + compile_recurrence_step()
    for name, report in reports:
        print(f"{name:<40} {report}", flush=True)


if __name__ == "__main__":
    main()
