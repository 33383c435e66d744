"""Model-level training throughput and MFU on one GPU: the 1.3B RAT and attention models.

    python -m rat_lightning.bench.train_throughput out.json [--mixers rat attention] [--modes eager compile]
        [--accumulate 1 8] [--profile] [--seq-len 4096] [--backends auto triton] [--recompute]

Each model trains on random tokens at seq 4096 (``--seq-len``) in bf16 autocast with fp32 master weights and
fused AdamW (the optimizer step included in the time), eager and under torch.compile (the model
and the loss compiled apart, as ``LanguageModelModule(compile=True)`` does), at the largest batch
of (8, 4, 2, 1) that fits. ``--profile`` adds each configuration's CUDA time per step by kernel
group (GEMMs, our kernels, torch.compile's fused kernels, optimizer, loss, glue). ``--recompute``
turns on activation checkpointing (``ModelConfig.activation_checkpointing``), for sequences whose
activations do not fit otherwise.
MFU = FLOPs per token (``model.flops_per_token``, which counts attention and the recurrence, not
6N alone) x tokens/s / dense bf16 peak.
"""

from __future__ import annotations

import argparse
import json

import torch

from rat_lightning.bench.layer_profile import group_totals, profile_kernels
from rat_lightning.bench.report import peak_bf16_flops
from rat_lightning.model import ModelConfig, RATLanguageModel
from rat_lightning.model.loss import cross_entropy_sum


def measure(
    mixer: str,
    seq_len: int = 4096,
    compile: bool = False,
    steps: int = 8,
    profile: bool = False,
    accumulate: int = 1,
    backend: str = "auto",
    n_layers: int = 24,
    batches: tuple[int, ...] = (8, 4, 2, 1),
    recompute: bool = False,
) -> dict:
    """Tokens/s and MFU of one training configuration, at the largest batch that fits.

    Args:
        backend: the ops' backend (``ModelConfig.backend``): "auto", or "triton" for the Triton
            kernels without cuDNN's attention at long sequences.
        n_layers: depth (24 for the 1.3B model; fewer fit long sequences on one GPU without
            activation checkpointing).
        batches: the batch sizes to try, largest first.
        recompute: activation checkpointing; MFU still counts the model's FLOPs only, not the
            recomputed forward.
        accumulate: micro-batches per optimizer step (``trainer.accumulate_grad_batches``; the
            1.3B recipe of docs/configs.md uses 8): one GPU reaches a pretraining batch only this
            way, and the optimizer's pass over the fp32 weights and moments then happens once per
            ``accumulate`` micro-batches.
        profile: also ``"profile_ms"``, CUDA milliseconds per optimizer step by kernel group, and
            ``"top_kernels"``, the 12 slowest kernels.
    """
    config = ModelConfig(
        vocab_size=32000, d_model=2048, n_layers=n_layers, n_heads=16, n_groups=2, chunk_size=16, mixer=mixer,
        max_seq_len=seq_len, backend=backend, activation_checkpointing=recompute,
    )  # fmt: skip
    for batch in batches:
        try:
            model = RATLanguageModel(config).cuda()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
            step_model = torch.compile(model) if compile else model
            loss_sum = torch.compile(cross_entropy_sum) if compile else cross_entropy_sum
            ids = torch.randint(0, 32000, (batch, seq_len + 1), device="cuda")

            def step() -> None:
                for _ in range(accumulate):
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        logits = step_model(ids[:, :-1])
                    (loss_sum(logits, ids[:, 1:]) / ids[:, 1:].numel()).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            for _ in range(3):
                step()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            times = []
            for _ in range(steps):
                start.record()
                step()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            seconds = sorted(times)[len(times) // 2]
            tokens_per_s = batch * seq_len * accumulate / seconds
            flops = model.flops_per_token(seq_len)
            extra = {}
            if profile:
                kernels = profile_kernels(step, iterations=2, warmup=1)
                # The slowest kernels, and the slowest of each group (where the glue hides).
                by_group = [row for group in group_totals(kernels) for row in
                            [r for r in kernels if r["group"] == group][:6]]  # fmt: skip
                extra = {"profile_ms": group_totals(kernels), "top_kernels": kernels[:12], "top_by_group": by_group}
            return {
                "mixer": mixer, "backend": backend, "compile": compile, "batch": batch, "accumulate": accumulate,
                "seq_len": seq_len, "n_layers": n_layers, "recompute": recompute,
                "params": model.num_parameters(), "step_s": seconds, "tokens_per_s": tokens_per_s,
                "flops_per_token": flops, "mfu": flops * tokens_per_s / peak_bf16_flops(),
                "max_memory_gb": torch.cuda.max_memory_allocated() / 1e9, **extra,
            }  # fmt: skip
        except torch.OutOfMemoryError:
            continue
        finally:
            # Drop every reference (the compiled wrapper and the closure too) before a smaller try.
            model = optimizer = step_model = loss_sum = ids = step = None
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    return {"mixer": mixer, "backend": backend, "compile": compile, "accumulate": accumulate,
            "error": f"out of memory at batch {batches[-1]}"}  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", nargs="?", help="JSON file to write")
    parser.add_argument("--mixers", nargs="+", default=["rat", "attention"], choices=["rat", "attention"])
    parser.add_argument("--modes", nargs="+", default=["eager", "compile"], choices=["eager", "compile"])
    parser.add_argument("--accumulate", nargs="+", type=int, default=[1], help="micro-batches per optimizer step")
    parser.add_argument("--profile", action="store_true", help="add CUDA time per step by kernel group")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--backends", nargs="+", default=["auto"], choices=["auto", "triton"])
    parser.add_argument("--layers", type=int, default=24, help="depth (24: the 1.3B model)")
    parser.add_argument("--batches", nargs="+", type=int, default=[8, 4, 2, 1], help="batch sizes to try")
    parser.add_argument("--recompute", action="store_true", help="activation checkpointing")
    args = parser.parse_args()
    rows = [
        measure(mixer, args.seq_len, mode == "compile", profile=args.profile, accumulate=accumulate, backend=backend,
                n_layers=args.layers, batches=tuple(args.batches), recompute=args.recompute)
        for mode in args.modes for accumulate in args.accumulate for mixer in args.mixers for backend in args.backends
    ]  # fmt: skip
    for r in rows:
        if "error" in r:
            print(r)
        else:
            print(f"{r['mixer']:10} {r['backend']:6} compile={r['compile']!s:5} recompute={r['recompute']!s:5} "
                  f"seq {r['seq_len']} batch {r['batch']} x{r['accumulate']} "
                  f"{r['tokens_per_s']:9.0f} tok/s "
                  f"MFU {100 * r['mfu']:5.1f}%  step {r['step_s'] * 1e3:7.1f} ms  mem {r['max_memory_gb']:.1f} GB")
            if "profile_ms" in r:
                groups = sorted(r["profile_ms"].items(), key=lambda kv: -kv[1])
                print("    " + "  ".join(f"{name} {ms:.1f} ms" for name, ms in groups))
                for row in r["top_by_group"]:
                    print(f"      {row['ms']:7.2f} ms x{row['calls']:<5.0f} {row['group']:<9} {row['kernel'][:90]}")
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(rows, handle, indent=1)
