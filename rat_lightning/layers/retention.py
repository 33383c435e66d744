"""Multi-scale retention (Sun et al., "Retentive Network", arXiv 2307.08621), parallel and
recurrent forms. Our choices: RoPE (rotate-half) instead of xPos, per-head layer norm without
affine, a swish output gate; decays gamma_h = 1 - 2^(-5 - h) as in RetNet."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rat_lightning.layers.base import Mixer, split_heads
from rat_lightning.ops.rope import apply_rope


@dataclass
class RetentionCache:
    """Recurrent state ``(B, H, P, P)`` fp32 (None before the first token) and the next position."""

    state: torch.Tensor | None = None
    position: int = 0


class Retention(Mixer):
    """Retention mixer.

    Args:
        d_model: int, model width.
        n_heads: int, heads H, each with its own fixed decay.
        rope_base: float, RoPE base over token positions.
    """

    def __init__(self, d_model: int, n_heads: int, rope_base: float = 10000.0) -> None:
        super().__init__()
        self.n_heads, self.rope_base = n_heads, rope_base
        self.w_in = nn.Linear(d_model, 4 * d_model, bias=False)
        self.w_out = nn.Linear(d_model, d_model, bias=False)
        log_decay = torch.log1p(-(2.0 ** (-5.0 - torch.arange(n_heads, dtype=torch.float64))))
        self.register_buffer("log_decay", log_decay.float(), persistent=False)

    def _project(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        query, key, value, gate = (split_heads(t, self.n_heads) for t in self.w_in(x).chunk(4, dim=-1))
        head_dim = query.shape[-1]
        query = apply_rope(query, positions, self.rope_base)
        key = apply_rope(key, positions, self.rope_base) * head_dim**-0.5
        return query, key, value.to(query.dtype), gate

    def _output(self, retained: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        normed = F.layer_norm(retained, retained.shape[-1:]).to(gate.dtype)
        return self.w_out((F.silu(gate) * normed).flatten(-2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, d_model)`` -> ``(B, T, d_model)``; the parallel form, T x T per head."""
        length = x.shape[1]
        t = torch.arange(length, device=x.device)
        query, key, value, gate = self._project(x, t)
        offset = (t[:, None] - t[None, :]).to(query.dtype)
        # Only exponents of non-positive numbers: offset >= 0 where kept, log_decay < 0.
        decay = torch.exp(offset.clamp(min=0) * self.log_decay.to(query.dtype)[:, None, None])
        decay = decay.masked_fill(offset < 0, 0.0)
        scores = torch.einsum("bthp,bshp->bhts", query, key) * decay
        retained = torch.einsum("bhts,bshp->bthp", scores, value)
        return self._output(retained, gate)

    def cache_bytes(self, length: int, dtype: torch.dtype, read: bool = False) -> int:
        """One ``(H, P, P)`` state in the activations' dtype."""
        head_dim = self.w_out.in_features // self.n_heads
        return (length > 0) * self.n_heads * head_dim * head_dim * torch.finfo(dtype).bits // 8

    def init_cache(self, batch_size: int, device: torch.device, capacity: int = 0) -> RetentionCache:
        """An empty cache (a fixed-size state: ``capacity`` needs no room)."""
        return RetentionCache()

    def step(self, x: torch.Tensor, cache: RetentionCache) -> tuple[torch.Tensor, RetentionCache]:
        """``(B, d_model)`` -> ``(B, d_model)``; ``S = gamma S + k^T v``, ``o = q S``."""
        positions = torch.full((1,), cache.position, device=x.device)
        query, key, value, gate = (t[:, 0] for t in self._project(x.unsqueeze(1), positions))
        update = key.unsqueeze(-1) * value.unsqueeze(-2)
        state = update
        if cache.state is not None:
            state = torch.exp(self.log_decay.to(update.dtype))[:, None, None] * cache.state + update
        retained = torch.einsum("bhp,bhpq->bhq", query, state)
        return self._output(retained, gate), RetentionCache(state, cache.position + 1)
