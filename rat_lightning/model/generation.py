"""Autoregressive sampling over per-layer caches: greedy, temperature, top-k, top-p."""

from __future__ import annotations

import torch

from rat_lightning.model.lm import RATLanguageModel


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row.

    Args:
        logits: ``(B, V)``.
        temperature: 0 means greedy (argmax); otherwise logits are divided by it.
        top_k: keep the k most likely tokens (None: all).
        top_p: keep the smallest set whose probability reaches top_p (None: all).
        generator: torch.Generator for reproducible sampling.

    Returns:
        ``(B,)`` int64 token ids.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p (the first always stays).
        drop = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: RATLanguageModel,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Continue ``prompt`` token by token through the model's step path.

    The prompt goes through :meth:`RATLanguageModel.prefill` (each mixer's parallel path where
    it has one), the new tokens through ``step``; caches reserve room for the whole sequence.

    Args:
        model: the language model.
        prompt: ``(B, T0)`` int64, T0 >= 1.
        max_new_tokens: number of tokens to add.
        temperature, top_k, top_p, generator: see :func:`sample_next`.
        eos_id: when set, a row that produced EOS keeps producing EOS.

    Returns:
        ``(B, T0 + max_new_tokens)`` int64.
    """
    if prompt.dim() != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be (batch, length >= 1), got {tuple(prompt.shape)}")
    caches = model.init_cache(prompt.shape[0], prompt.device, capacity=prompt.shape[1] + max_new_tokens)
    logits, caches = model.prefill(prompt, caches)
    tokens = [prompt]
    finished = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    for _ in range(max_new_tokens):
        token = sample_next(logits, temperature, top_k, top_p, generator)
        if eos_id is not None:
            token = token.masked_fill(finished, eos_id)
            finished |= token == eos_id
        tokens.append(token.unsqueeze(1))
        logits, caches = model.step(token, caches)
    return torch.cat(tokens, dim=1)
