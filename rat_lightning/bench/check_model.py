"""GPU check: a whole RAT model on the Triton kernels against the reference path.

    python -m rat_lightning.bench.check_model out.json

Loss and every parameter gradient of the bf16-autocast Triton model against an fp32 reference
model with the same weights; then torch.compile of the Triton model (graph breaks counted,
compiled loss against eager).
"""

from __future__ import annotations

import dataclasses
import json
import sys

import torch
import torch.nn.functional as F

from rat_lightning.model import ModelConfig, RATLanguageModel


def _loss_and_grads(model: RATLanguageModel, ids: torch.Tensor, autocast: bool) -> tuple[float, dict]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        logits = model(ids[:, :-1])
    loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    return loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters()}


def check_model(
    d_model: int = 1024, n_layers: int = 4, n_heads: int = 8, seq_len: int = 4096, batch: int = 2
) -> dict:
    """Relative gradient errors per parameter, loss difference, compile parity."""
    config = ModelConfig(
        vocab_size=32000, d_model=d_model, n_layers=n_layers, n_heads=n_heads, mixer="rat", chunk_size=16,
        n_groups=2, max_seq_len=seq_len, backend="triton",
    )  # fmt: skip
    torch.manual_seed(0)
    fast = RATLanguageModel(config).cuda()
    reference = RATLanguageModel(dataclasses.replace(config, backend="reference")).cuda()
    reference.load_state_dict(fast.state_dict())
    ids = torch.randint(0, 32000, (batch, seq_len + 1), device="cuda")
    loss_fast, grads_fast = _loss_and_grads(fast, ids, autocast=True)
    loss_ref, grads_ref = _loss_and_grads(reference, ids, autocast=False)
    errors = {n: ((grads_fast[n] - g).norm() / g.norm().clamp(min=1e-30)).item() for n, g in grads_ref.items()}
    explanation = torch._dynamo.explain(fast)(ids[:, :-1])
    compiled = torch.compile(fast)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        eager_logits = fast(ids[:, :-1]).float()
        compiled_logits = compiled(ids[:, :-1]).float()
    return {
        "loss_triton_bf16": loss_fast,
        "loss_reference_fp32": loss_ref,
        "max_grad_rel_error": max(errors.values()),
        "worst_param": max(errors, key=errors.get),
        "grad_rel_errors": errors,
        "graph_breaks": explanation.graph_break_count,
        "break_reasons": [str(b.reason) for b in explanation.break_reasons][:10],
        "compiled_vs_eager_logits_rel": ((compiled_logits - eager_logits).norm() / eager_logits.norm()).item(),
    }


if __name__ == "__main__":
    result = check_model()
    summary = {k: v for k, v in result.items() if k != "grad_rel_errors"}
    print(json.dumps(summary, indent=1))
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as handle:
            json.dump(result, handle, indent=1)
