"""RAT+: attention over full-sequence recurrent keys and values, trained dense, run sparse
(Wei and Gulcehre, "RAT+: Train Dense, Infer Sparse", arXiv 2602.18196).

    o, q, k, x, g = split(W_in u)               W_in: d -> 5d (4d without the recurrence)
    a = sigmoid(g)                               per channel, no gate bias (the released code)
    K_t = a_t K_{t-1} + (1 - a_t) k_t            never reset, fp32 state
    V_t = a_t V_{t-1} + (1 - a_t) x_t
    attn_t = softmax over the pattern's keys j of q_t . RoPE(K_j) / sqrt(P), token positions
    y = W_out(sigmoid(o) * attn)

With ``recurrent=False`` it is the paper's attention baseline (K = k, V = x, output gate kept).
Every kept key K_j summarises all tokens up to j, so a sparse pattern still sees skipped tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from rat_lightning.layers.base import Mixer, split_heads
from rat_lightning.ops.recurrence import gated_recurrence, gated_recurrence_step
from rat_lightning.ops.recurrence.reference import compute_dtype
from rat_lightning.ops.rope import apply_rope
from rat_lightning.sparse.attend import (
    PatternCache,
    init_pattern_cache,
    pattern_attention,
    pattern_attention_step,
    pattern_cache_bytes,
    prefill_pattern_cache,
)


class RATPlus(Mixer):
    """The RAT+ mixer (and, with ``recurrent=False``, its gated-attention baseline).

    Args:
        d_model: int, model width.
        n_heads: int, heads H (full width q, k, x; no GQA).
        recurrent: bool, run the full-sequence recurrence on k and x (RAT+), or not (baseline).
        rope_base: float, RoPE base over token positions.
        backend: str, backend of the recurrence and dilated-attention ops.
    """

    supports_pattern = True

    def __init__(
        self, d_model: int, n_heads: int, recurrent: bool = True, rope_base: float = 10000.0, backend: str = "auto"
    ) -> None:
        super().__init__()
        self.n_heads, self.recurrent, self.rope_base, self.backend = n_heads, recurrent, rope_base, backend
        self.w_in = nn.Linear(d_model, (5 if recurrent else 4) * d_model, bias=False)
        self.w_out = nn.Linear(d_model, d_model, bias=False)

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        gate_out, *rest = self.w_in(x).chunk(5 if self.recurrent else 4, dim=-1)
        return (gate_out, *(split_heads(t, self.n_heads) for t in rest))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, d_model)`` -> ``(B, T, d_model)`` under the layer's pattern."""
        return self._mix(x)[0]

    def _mix(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The parallel path: output ``(B, T, d_model)``, RoPE'd keys and values ``(B, T, H, P)``
        in x's dtype, and the last recurrent states ``(V, K)`` (None without the recurrence)."""
        gate_out, query, key, value, *gate = self._project(x)
        state = None
        if self.recurrent:
            value, key = gated_recurrence(value, gate[0], key, backend=self.backend)
            state = tuple(t[:, -1].to(compute_dtype(x.dtype)) for t in (value, key))
        positions = torch.arange(x.shape[1], device=x.device)
        query = apply_rope(query, positions, self.rope_base).to(x.dtype)
        key = apply_rope(key, positions, self.rope_base).to(x.dtype)
        value = value.to(x.dtype)
        attn = pattern_attention(query, key, value, self.pattern, self.backend)
        return self.w_out(torch.sigmoid(gate_out) * attn.flatten(2)), key, value, state

    def cache_bytes(self, length: int, dtype: torch.dtype, read: bool = False) -> int:
        """KV entries of the pattern plus, for RAT+, the two fp32 recurrent states."""
        head_dim = self.w_out.in_features // self.n_heads
        kv = pattern_cache_bytes(self.pattern, self.n_heads, head_dim, length, dtype, read)
        state = 2 * self.w_out.in_features * torch.finfo(compute_dtype(dtype)).bits // 8
        return kv + (state if self.recurrent and length > 0 else 0)

    def init_cache(self, batch_size: int, device: torch.device, capacity: int = 0) -> PatternCache:
        """An empty cache for the current pattern (KV entries plus the recurrent state); groups
        that keep every key reserve room for ``capacity`` tokens."""
        return init_pattern_cache(self.pattern, self.n_heads, capacity)

    def step(self, x: torch.Tensor, cache: PatternCache) -> tuple[torch.Tensor, PatternCache]:
        """``(B, d_model)`` -> ``(B, d_model)``; keeps only the keys the pattern still needs."""
        gate_out, query, key, value, *gate = self._project(x)
        state = None
        if self.recurrent:
            state = gated_recurrence_step(value, gate[0], cache.state, key, backend=self.backend)
            value, key = state
        positions = torch.full((1,), cache.position, device=x.device)
        query = apply_rope(query.unsqueeze(1), positions, self.rope_base)[:, 0].to(x.dtype)
        key = apply_rope(key.unsqueeze(1), positions, self.rope_base)[:, 0].to(x.dtype)
        attn, kv = pattern_attention_step(query, key, value.to(x.dtype), cache.kv, self.pattern, cache.position)
        out = self.w_out(torch.sigmoid(gate_out) * attn.flatten(1))
        return out, PatternCache(kv, state, cache.position + 1)

    def prefill(self, x: torch.Tensor, cache: PatternCache) -> tuple[torch.Tensor, PatternCache]:
        """A prompt through the parallel path; the cache keeps what ``step`` would have kept."""
        if cache.position:
            return super().prefill(x, cache)
        out, key, value, state = self._mix(x)
        return out, PatternCache(prefill_pattern_cache(key, value, self.pattern, cache.kv), state, x.shape[1])
