"""The language model: embedding -> blocks -> norm -> head.

    h_0 = embed(ids)
    for each block:                       +------------------------------+
        h = h + mixer(RMSNorm(h))         |  mixer: attention | rat | ...  |
        h = h + ffn(RMSNorm(h))           |  ffn:   GELU MLP | SwiGLU      |
    logits = head(RMSNorm(h))             +------------------------------+
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from rat_lightning.layers import FeedForward, RMSNorm
from rat_lightning.model.config import ModelConfig
from rat_lightning.model.flops import flops_per_token
from rat_lightning.model.registry import build_mixer
from rat_lightning.sparse.pattern import InferencePattern, LayerPattern


class Block(nn.Module):
    """Pre-norm block: a mixer then an FFN, each with a residual.

    Args:
        config: model shapes.
        mixer: the mixer name of this layer.
    """

    def __init__(self, config: ModelConfig, mixer: str) -> None:
        super().__init__()
        self.mixer_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mixer = build_mixer(mixer, config)
        self.ffn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.ffn = FeedForward(config.d_model, config.ffn_hidden, config.ffn)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``(B, T, d_model)`` -> ``(B, T, d_model)``."""
        h = h + self.mixer(self.mixer_norm(h))
        return h + self.ffn(self.ffn_norm(h))

    def step(self, h: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        """``(B, d_model)`` -> ``(B, d_model)`` and the mixer's updated cache."""
        mixed, cache = self.mixer.step(self.mixer_norm(h), cache)
        h = h + mixed
        return h + self.ffn(self.ffn_norm(h)), cache

    def prefill(self, h: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        """``(B, T, d_model)`` -> ``(B, T, d_model)`` and the mixer's cache after the T tokens."""
        mixed, cache = self.mixer.prefill(self.mixer_norm(h), cache)
        h = h + mixed
        return h + self.ffn(self.ffn_norm(h)), cache


def _run_under(block: Block, pattern: LayerPattern, h: torch.Tensor) -> torch.Tensor:
    """``block(h)`` with its mixer under ``pattern``, the layer pattern of the forward.

    An eager recompute runs in the backward, when the model may be under another pattern (RAT+
    joint training switches back to dense before the backward); it must attend as the forward did.
    """
    current = block.mixer.pattern
    if current is pattern:
        return block(h)
    block.mixer.set_pattern(pattern)
    try:
        return block(h)
    finally:
        block.mixer.set_pattern(current)


class RATLanguageModel(nn.Module):
    """A causal language model of RAT-family blocks.

    Args:
        config: :class:`ModelConfig`.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, mixer) for mixer in config.layer_mixers)
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight
        self.init_weights()
        self.set_pattern(config.pattern)

    def set_pattern(self, pattern: InferencePattern) -> None:
        """Run every pattern-capable layer under ``pattern`` (forward and new caches).

        Raises:
            ConfigError: the pattern does not fit the model (layer count, heads), or it makes a
                layer sparse whose mixer takes no pattern.
        """
        n_layers = len(self.blocks)
        pattern.check(n_layers, self.config.n_heads)
        resolved = [pattern.layer(i, n_layers) for i in range(n_layers)]
        for i, (block, layer_pattern) in enumerate(zip(self.blocks, resolved)):
            try:
                block.mixer.set_pattern(layer_pattern)
            except ValueError as error:
                raise type(error)(f"pattern {pattern.label()}, layer {i}: {error}") from None
        self.pattern = pattern

    def check_pattern(self, pattern: InferencePattern, seq_len: int | None = None) -> None:
        """Raise :class:`ConfigError` now if ``pattern`` cannot run on this model (or on
        sequences of ``seq_len`` tokens); the current pattern is left as it is."""
        pattern.check(len(self.blocks), self.config.n_heads, seq_len)
        with self.using_pattern(pattern):
            pass

    @contextmanager
    def using_pattern(self, pattern: InferencePattern) -> Iterator[None]:
        """Temporarily run under ``pattern``; the previous pattern is restored on exit."""
        previous = self.pattern
        self.set_pattern(pattern)
        try:
            yield
        finally:
            self.set_pattern(previous)

    def cache_bytes(self, length: int, dtype: torch.dtype | None = None, read: bool = False) -> int:
        """Decoding-cache bytes per sequence after ``length`` tokens, all layers, under the
        current pattern; ``dtype`` of the cached activations (default: the weights'). With
        ``read``: the bytes the last token reads instead of those held."""
        dtype = dtype or self.embed.weight.dtype
        return sum(block.mixer.cache_bytes(length, dtype, read) for block in self.blocks)

    def init_weights(self) -> None:
        """Normal(0, init_std) for every weight matrix and the embedding, ones for norms, the
        mixers' own gate-bias inits."""
        std = self.config.init_std
        nn.init.normal_(self.embed.weight, mean=0.0, std=std)
        if not self.config.tie_embeddings:
            nn.init.normal_(self.head.weight, mean=0.0, std=std)
        for block in self.blocks:
            block.mixer.reset_parameters(std)
            for linear in (block.ffn.w_in, block.ffn.w_out):
                nn.init.normal_(linear.weight, mean=0.0, std=std)
            block.mixer_norm.reset_parameters()
            block.ffn_norm.reset_parameters()
        self.norm.reset_parameters()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` int64 token ids -> ``(B, T, vocab_size)`` logits."""
        h = self.embed(input_ids)
        recompute = self.config.activation_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            # With recompute, autograd keeps only h here; the block runs again in the backward.
            h = checkpoint(_run_under, block, block.mixer.pattern, h, use_reentrant=False) if recompute else block(h)
        return self.head(self.norm(h))

    def init_cache(self, batch_size: int, device: torch.device | None = None, capacity: int = 0) -> list[Any]:
        """One empty cache per layer, with room reserved for ``capacity`` tokens (0: grow as needed)."""
        device = device or self.embed.weight.device
        return [block.mixer.init_cache(batch_size, device, capacity) for block in self.blocks]

    def prefill(self, input_ids: torch.Tensor, caches: list[Any]) -> tuple[torch.Tensor, list[Any]]:
        """A prompt at once: ``(B, T)`` ids -> the last token's ``(B, vocab_size)`` logits and the
        caches ``step`` would have built (each mixer's parallel path where it has one)."""
        h = self.embed(input_ids)
        new_caches = []
        for block, cache in zip(self.blocks, caches):
            h, cache = block.prefill(h, cache)
            new_caches.append(cache)
        return self.head(self.norm(h[:, -1])), new_caches

    def step(self, token: torch.Tensor, caches: list[Any]) -> tuple[torch.Tensor, list[Any]]:
        """One token per sequence: ``(B,)`` ids -> ``(B, vocab_size)`` logits and new caches."""
        h = self.embed(token)
        new_caches = []
        for block, cache in zip(self.blocks, caches):
            h, cache = block.step(h, cache)
            new_caches.append(cache)
        return self.head(self.norm(h)), new_caches

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Parameter count (tied weights counted once)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def num_matmul_parameters(self) -> int:
        """Weights multiplied per token: every Linear (the head included), not the embedding lookup."""
        return sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))

    def flops_per_token(self, seq_len: int, training: bool = True) -> float:
        """FLOPs per token at sequence length ``seq_len`` (see :mod:`rat_lightning.model.flops`)."""
        return flops_per_token(self.config, seq_len, self.num_matmul_parameters(), training)
