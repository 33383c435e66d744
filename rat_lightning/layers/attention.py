"""Causal softmax attention with token RoPE (Vaswani et al., 2017; Su et al., 2021), full or
sliding-window. Layout inside: ``(B, T, H, P)``; SDPA sees ``(B, H, T, P)``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rat_lightning.layers.base import Mixer, split_heads
from rat_lightning.ops.rope import apply_rope
from rat_lightning.sparse.attend import (
    PatternCache,
    decode_attention,
    init_pattern_cache,
    pattern_attention,
    pattern_attention_step,
    pattern_cache_bytes,
    prefill_pattern_cache,
)


@dataclass
class KVCache:
    """Keys (RoPE applied) and values of past tokens.

    Attributes:
        keys, values: ``(B, S, H, P)`` or None before the first token; with a window W,
            S <= W (the oldest entries are dropped as the window slides).
        position: index of the next token.
    """

    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    position: int = 0


class Attention(Mixer):
    """Multi-head causal attention, optionally restricted to a sliding window.

    Full attention (``window=None``) also runs under a sparse inference pattern
    (:meth:`set_pattern`): the plain-attention side of the RAT+ comparison.

    Args:
        d_model: int, model width.
        n_heads: int, number of heads (d_model % n_heads == 0).
        window: int or None; query t sees keys in (t - window, t]. None: full causal attention.
        rope_base: float, RoPE base over token positions, default 10000.
    """

    def __init__(self, d_model: int, n_heads: int, window: int | None = None, rope_base: float = 10000.0) -> None:
        super().__init__()
        if window is not None and window < 1:
            raise ValueError(f"window must be a positive int or None, got {window}")
        self.n_heads = n_heads
        self.window = window
        self.rope_base = rope_base
        self.w_in = nn.Linear(d_model, 3 * d_model, bias=False)
        self.w_out = nn.Linear(d_model, d_model, bias=False)

    @property
    def supports_pattern(self) -> bool:  # type: ignore[override]
        """Full attention takes patterns; a sliding window is a pattern of its own."""
        return self.window is None

    def _project(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        value, query, key = (split_heads(t, self.n_heads) for t in self.w_in(x).chunk(3, dim=-1))
        query = apply_rope(query, positions, self.rope_base).to(x.dtype)
        key = apply_rope(key, positions, self.rope_base).to(x.dtype)
        return query, key, value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, d_model)`` -> ``(B, T, d_model)``."""
        return self._mix(x)[0]

    def _mix(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The parallel path: output ``(B, T, d_model)``, RoPE'd keys and values ``(B, T, H, P)``."""
        length = x.shape[1]
        query, key, value = self._project(x, torch.arange(length, device=x.device))
        if self.window is None:
            return self.w_out(pattern_attention(query, key, value, self.pattern).flatten(2)), key, value
        mask = None
        if self.window < length:
            t = torch.arange(length, device=x.device)
            offset = t[:, None] - t[None, :]
            mask = (offset >= 0) & (offset < self.window)
        out = F.scaled_dot_product_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=mask, is_causal=mask is None
        )
        return self.w_out(out.transpose(1, 2).flatten(2)), key, value

    def cache_bytes(self, length: int, dtype: torch.dtype, read: bool = False) -> int:
        """Keys and values: min(T, W) entries per head with a window, else the pattern's."""
        head_dim = self.w_out.in_features // self.n_heads
        if self.window is not None:
            return min(length, self.window) * self.n_heads * head_dim * 2 * torch.finfo(dtype).bits // 8
        return pattern_cache_bytes(self.pattern, self.n_heads, head_dim, length, dtype, read)

    def init_cache(self, batch_size: int, device: torch.device, capacity: int = 0) -> KVCache | PatternCache:
        """An empty cache: a sliding window's, or the pattern's (full attention; groups that keep
        every key reserve room for ``capacity`` tokens)."""
        return KVCache() if self.window is not None else init_pattern_cache(self.pattern, self.n_heads, capacity)

    def step(
        self, x: torch.Tensor, cache: KVCache | PatternCache
    ) -> tuple[torch.Tensor, KVCache | PatternCache]:
        """``(B, d_model)`` -> ``(B, d_model)``; appends this token's key and value."""
        positions = torch.full((1,), cache.position, device=x.device)
        query, key, value = self._project(x.unsqueeze(1), positions)
        if isinstance(cache, PatternCache):
            out, kv = pattern_attention_step(
                query[:, 0], key[:, 0], value[:, 0], cache.kv, self.pattern, cache.position
            )
            return self.w_out(out.flatten(1)), PatternCache(kv, None, cache.position + 1)
        # A window's cache is at most W entries: concatenating and dropping the oldest is cheap.
        keys, values = (key, value) if cache.keys is None else (
            torch.cat([cache.keys, key], dim=1), torch.cat([cache.values, value], dim=1))  # fmt: skip
        keys, values = keys[:, -self.window :], values[:, -self.window :]
        out = decode_attention(query[:, 0], keys, values)
        return self.w_out(out.flatten(1)), KVCache(keys, values, cache.position + 1)

    def prefill(
        self, x: torch.Tensor, cache: KVCache | PatternCache
    ) -> tuple[torch.Tensor, KVCache | PatternCache]:
        """A prompt through the parallel path (SDPA / the dilated kernel); the cache keeps what
        ``step`` would have kept."""
        if cache.position:
            return super().prefill(x, cache)
        out, key, value = self._mix(x)
        length = x.shape[1]
        if isinstance(cache, KVCache):
            return out, KVCache(key[:, -self.window :], value[:, -self.window :], length)
        return out, PatternCache(prefill_pattern_cache(key, value, self.pattern, cache.kv), None, length)
