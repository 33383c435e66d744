"""Model-level generation throughput in the RAT paper's protocol: 1.3B RAT against 1.3B attention.

    python -m rat_lightning.bench.generation --out docs/benchmarks/generation_h100.json

Protocol (the paper's: a 3,072-token prompt, 1,024 generated tokens, the largest batch that fits):

- Each model (24 x 2048, 16 heads of 128, vocab 32,000, RAT with G = 2, L = 16) in bf16 weights,
  random init, eval mode, no autograd; caches in bf16 (RAT's running state fp32).
- Batch: the largest multiple of ``--micro-batch`` whose decoding caches at prompt + new tokens
  (``model.cache_bytes``) fit in the memory left after the weights, less ``--headroom-gb``.
- Check: the logits of one step after the prefill against the parallel forward over the prompt
  and that token (relative error; bf16 weights and caches on both sides).
- Prefill: ``model.prefill`` (each mixer's parallel path: the Triton kernels for RAT, flash SDPA for
  attention) of one micro-batch of distinct random prompts, timed (median of 3 after a warm-up).
  Its caches are repeated over the batch (``repeat_cache``): every sequence is independent and
  costs the same, so decoding times what distinct prompts would.
- Decode: ``--new-tokens`` greedy steps of ``model.step`` for the whole batch (caches with room
  reserved, so no step copies the past), after a warm-up of ``--warmup`` steps on the micro-batch
  caches (Triton compiles there). Tokens/s = batch x new tokens / wall time of the loop.
- Floor of a step: every sequence's cache read once at the measured copy bandwidth, plus the
  matmuls, each at the larger of its weights' read time and its FLOPs at the dense bf16 peak
  (at RAT's batch the matmuls are compute-bound: 2 x 1.3B x 2752 FLOPs are 7.3 ms on an H200).
  The kernels run one after another, so the two add. ``step_floor_bytes_ms`` is the bytes alone
  (weights and caches), the floor reported before 2026-12-03.
- End to end: prefill of the whole batch (micro-batches x the measured time) plus decoding.
- ``--profile``: CUDA time of one decoding step by kernel group and the slowest kernels
  (``torch.profiler`` over 16 steps of the full batch before the timed loop, from the prompt's
  end, after 2 warm-up steps), as ``profile_ms`` and ``top_kernels``.

``--smoke`` runs the same code on a tiny model (CPU is fine; used by the tests).
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Sequence

import torch

from rat_lightning.bench.decode import copy_bandwidth
from rat_lightning.bench.layer_profile import group_totals, profile_kernels
from rat_lightning.bench.report import peak_bf16_flops, write_report
from rat_lightning.layers.cache import repeat_cache
from rat_lightning.model import ModelConfig, RATLanguageModel

MODEL_1P3B = {"vocab_size": 32000, "d_model": 2048, "n_layers": 24, "n_heads": 16, "n_groups": 2, "chunk_size": 16}
MODEL_SMOKE = {"vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_groups": 2, "chunk_size": 4}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _largest_batch(model: RATLanguageModel, length: int, micro: int, headroom: float, device: torch.device) -> int:
    """Largest multiple of ``micro`` whose caches at ``length`` tokens fit in free memory less headroom."""
    per_sequence = model.cache_bytes(length, torch.bfloat16)
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 2**30
    return max(micro, int((free - headroom) // per_sequence) // micro * micro)


def _profile_steps(model: RATLanguageModel, caches: list, token: torch.Tensor) -> dict:
    """CUDA kernel time of a decoding step (``profile_ms`` by group, ``top_kernels``): 18 greedy
    steps from the prompt's end, the last 16 profiled, a chunk's end among them. The steps write
    into the caches' reserved room past their lengths, which the timed loop overwrites, so the
    caches passed in still hold the prompt alone."""
    state = {"caches": caches, "token": token}

    def step() -> None:
        logits, state["caches"] = model.step(state["token"], state["caches"])
        state["token"] = logits.argmax(-1)

    kernels = profile_kernels(step, iterations=16, warmup=2)
    return {"profile_ms": group_totals(kernels), "top_kernels": kernels[:25]}


@torch.no_grad()
def measure(
    mixer: str,
    model_shape: dict,
    prompt_len: int,
    new_tokens: int,
    micro_batch: int,
    headroom_gb: float,
    warmup: int,
    bandwidth: float,
    device: torch.device,
    batch: int | None = None,
    profile: bool = False,
) -> dict:
    """One model's prefill and decoding throughput at the largest batch (or ``batch``); with
    ``profile``, the kernels of one decoding step."""
    if device.type == "cuda":
        # The previous model's caches may still sit in the allocator's pool: free memory is
        # measured below, and a pool squeezed against the caches would stall every step.
        gc.collect()
        torch.cuda.empty_cache()
    torch.manual_seed(0)
    config = ModelConfig(**model_shape, mixer=mixer, max_seq_len=prompt_len + new_tokens)
    model = RATLanguageModel(config).to(device=device, dtype=torch.bfloat16).eval()
    total = prompt_len + new_tokens
    micro = micro_batch if batch is None else min(micro_batch, batch)
    batch = batch or _largest_batch(model, total, micro, headroom_gb * 1e9, device)
    if batch % micro:
        raise ValueError(f"batch {batch} must be a multiple of the micro-batch {micro}")
    prompt = torch.randint(0, config.vocab_size, (micro, prompt_len), device=device)

    def prefill() -> tuple[torch.Tensor, list]:
        return model.prefill(prompt, model.init_cache(micro, device, capacity=total))

    prefill()
    times = []
    for _ in range(3):
        _sync(device)
        start = time.perf_counter()
        logits, caches = prefill()
        _sync(device)
        times.append(time.perf_counter() - start)
    prefill_s = sorted(times)[1]
    # Check: one decoding step after the prefill against the parallel forward over prompt + token.
    first = logits.argmax(-1)
    step_logits = model.step(first, caches)[0].float()
    forward_logits = model(torch.cat([prompt, first[:, None]], dim=1))[:, -1].float()
    check = ((step_logits - forward_logits).norm() / forward_logits.norm()).item()
    del step_logits, forward_logits
    # Warm-up steps on the micro-batch caches: they write past the caches' lengths only, so the
    # prefilled caches stay as they were.
    warm, token = caches, first
    for _ in range(warmup):
        warm_logits, warm = model.step(token, warm)
        token = warm_logits.argmax(-1)
    del warm, warm_logits
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the prefill's activations: give their blocks back to the caches
    caches = repeat_cache(caches, batch // micro)
    token = first.repeat_interleave(batch // micro)
    extra = _profile_steps(model, caches, token) if profile else {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    for _ in range(new_tokens):
        logits, caches = model.step(token, caches)
        token = logits.argmax(-1)
    _sync(device)
    decode_s = time.perf_counter() - start
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # Mean cache bytes one step reads per sequence, over the decoded positions.
    read = sum(model.cache_bytes(t, torch.bfloat16, read=True) for t in range(prompt_len + 1, total + 1)) / new_tokens
    matmul_s = 2 * model.num_matmul_parameters() * batch / peak_bf16_flops(device)
    floor_s = batch * read / bandwidth + max(weight_bytes / bandwidth, matmul_s)
    step_s = decode_s / new_tokens
    prefill_total_s = prefill_s * batch / micro
    return {
        "mixer": mixer, "params": model.num_parameters(), "batch": batch, "micro_batch": micro,
        "prompt_len": prompt_len, "new_tokens": new_tokens,
        "cache_bytes_per_sequence": model.cache_bytes(total, torch.bfloat16), "step_vs_forward_rel_err": check,
        "prefill_ms_per_micro_batch": prefill_s * 1e3, "prefill_tokens_per_s": micro * prompt_len / prefill_s,
        "decode_s": decode_s, "decode_tokens_per_s": batch * new_tokens / decode_s,
        "step_ms": step_s * 1e3, "step_floor_ms": floor_s * 1e3, "frac_of_floor": floor_s / step_s,
        "step_floor_bytes_ms": (weight_bytes + batch * read) / bandwidth * 1e3, "matmul_ms_at_peak": matmul_s * 1e3,
        "end_to_end_s": prefill_total_s + decode_s,
        "end_to_end_new_tokens_per_s": batch * new_tokens / (prefill_total_s + decode_s),
        "max_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None, **extra,
    }  # fmt: skip


def format_table(rows: list[dict]) -> str:
    """The rows as a fixed-width text table, with RAT's ratio to attention when both ran."""
    lines = [
        f"{'mixer':<10} {'batch':>6} {'cache MB/seq':>12} {'prefill tok/s':>13} {'decode tok/s':>12} "
        f"{'step ms':>8} {'floor ms':>8} {'e2e tok/s':>10}"
    ]
    for r in rows:
        lines.append(
            f"{r['mixer']:<10} {r['batch']:>6} {r['cache_bytes_per_sequence'] / 1e6:>12.1f} "
            f"{r['prefill_tokens_per_s']:>13.0f} {r['decode_tokens_per_s']:>12.0f} {r['step_ms']:>8.2f} "
            f"{r['step_floor_ms']:>8.2f} {r['end_to_end_new_tokens_per_s']:>10.0f}"
        )
    by_mixer = {r["mixer"]: r for r in rows}
    if {"rat", "attention"} <= by_mixer.keys():
        ratio = by_mixer["rat"]["decode_tokens_per_s"] / by_mixer["attention"]["decode_tokens_per_s"]
        lines.append(f"RAT / attention decode throughput: {ratio:.2f}x")
    for r in rows:
        if "profile_ms" in r:
            groups = sorted(r["profile_ms"].items(), key=lambda kv: -kv[1])
            lines.append(f"{r['mixer']} step kernels: " + "  ".join(f"{name} {ms:.2f} ms" for name, ms in groups))
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="write the rows and the environment as JSON here")
    parser.add_argument("--mixers", nargs="+", default=["rat", "attention"])
    parser.add_argument("--prompt-len", type=int, default=3072)
    parser.add_argument("--new-tokens", type=int, default=1024)
    parser.add_argument("--micro-batch", type=int, default=16, help="sequences per prefill call")
    parser.add_argument("--batch", type=int, default=None, help="fixed batch (default: the largest that fits)")
    parser.add_argument("--headroom-gb", type=float, default=6.0, help="memory kept free beside the caches")
    parser.add_argument("--warmup", type=int, default=20, help="untimed decoding steps (Triton compiles)")
    parser.add_argument("--smoke", action="store_true", help="a tiny model and short sequences (CPU is fine)")
    parser.add_argument("--profile", action="store_true", help="add one decoding step's CUDA time by kernel")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Run the benchmark from the command line; prints the table, writes ``--out``."""
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        raise SystemExit("the benchmark needs a CUDA GPU; use --smoke for a CPU run at toy sizes")
    device = torch.device("cuda" if cuda else "cpu")
    shape = MODEL_SMOKE if args.smoke else MODEL_1P3B
    bandwidth = copy_bandwidth(device, 2**20 if args.smoke else 4 * 2**30)
    rows = [
        measure(mixer, shape, args.prompt_len, args.new_tokens, args.micro_batch, args.headroom_gb, args.warmup,
                bandwidth, device, args.batch, args.profile)
        for mixer in args.mixers
    ]  # fmt: skip
    print(format_table(rows))
    if args.out:
        write_report(args.out, {"model": shape, "copy_bandwidth_bytes_per_s": bandwidth, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
