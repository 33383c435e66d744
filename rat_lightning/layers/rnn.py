"""Gated linear RNN: RAT's recurrence over the whole sequence, no attention (RAT paper, sec. 3)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rat_lightning.layers.base import Mixer, split_heads
from rat_lightning.ops.recurrence import gated_recurrence, gated_recurrence_step
from rat_lightning.ops.recurrence.reference import compute_dtype


@dataclass
class RNNCache:
    """Running state ``(B, H, P)`` in fp32, or None before the first token."""

    state: torch.Tensor | None = None


def init_gate_bias(bias: torch.Tensor, max_time_constant: int) -> None:
    """In-place ``log(U(1, max_time_constant))``: forget gates a = u / (1 + u) start with time
    constants spread from 1 to ``max_time_constant`` tokens (chunk size - 1 for RAT, sequence
    length - 1 for the RNN)."""
    with torch.no_grad():
        bias.uniform_(1.0, max(float(max_time_constant), 1.0 + 1e-6)).log_()


class GatedRNN(Mixer):
    """``o = W_out(sigmoid(z) * s^x)``, ``s^x_t = a_t s^x_{t-1} + (1 - a_t) x_t``.

    Args:
        d_model: int, model width.
        n_heads: int, only splits channels into (H, P) for the recurrence op.
        max_seq_len: int, training length; sets the gate-bias init log(U(1, T - 1)).
        backend: str, the recurrence op's backend ("auto", "reference", "triton").
    """

    def __init__(self, d_model: int, n_heads: int, max_seq_len: int, backend: str = "auto") -> None:
        super().__init__()
        self.n_heads = n_heads
        self.max_seq_len = max_seq_len
        self.backend = backend
        self.w_in = nn.Linear(d_model, 3 * d_model, bias=False)
        self.w_out = nn.Linear(d_model, d_model, bias=False)
        self.gate_bias = nn.Parameter(torch.zeros(n_heads, d_model // n_heads))
        init_gate_bias(self.gate_bias, max_seq_len - 1)

    def reset_parameters(self, std: float) -> None:
        super().reset_parameters(std)
        init_gate_bias(self.gate_bias, self.max_seq_len - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, d_model)`` -> ``(B, T, d_model)``."""
        z, value, gate = (split_heads(t, self.n_heads) for t in self.w_in(x).chunk(3, dim=-1))
        state, _ = gated_recurrence(value, gate, gate_bias=self.gate_bias, backend=self.backend)
        return self.w_out((torch.sigmoid(z) * state).flatten(2))

    def cache_bytes(self, length: int, dtype: torch.dtype, read: bool = False) -> int:
        """One running state of d_model channels in the recurrence's compute dtype."""
        return (length > 0) * self.w_out.in_features * torch.finfo(compute_dtype(dtype)).bits // 8

    def init_cache(self, batch_size: int, device: torch.device, capacity: int = 0) -> RNNCache:
        """An empty cache (a fixed-size state: ``capacity`` needs no room)."""
        return RNNCache()

    def step(self, x: torch.Tensor, cache: RNNCache) -> tuple[torch.Tensor, RNNCache]:
        """``(B, d_model)`` -> ``(B, d_model)``."""
        z, value, gate = (split_heads(t, self.n_heads) for t in self.w_in(x).chunk(3, dim=-1))
        previous = None if cache.state is None else (cache.state, None)
        state, _ = gated_recurrence_step(value, gate, previous, gate_bias=self.gate_bias, backend=self.backend)
        out = (torch.sigmoid(z.to(state.dtype)) * state).to(x.dtype)
        return self.w_out(out.flatten(1)), RNNCache(state)

