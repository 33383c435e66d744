"""The contract every sequence mixer keeps: a parallel path and a step path over its own cache."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn


class Mixer(nn.Module, ABC):
    """A token mixer: ``forward`` over a whole sequence, ``step`` one token at a time.

    ``step`` over tokens 0..T-1 from ``init_cache`` must equal ``forward`` over the T tokens
    (tests hold every mixer to this). Caches are explicit objects, never hidden module state.
    """

    @abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, d_model)`` -> ``(B, T, d_model)``."""

    @abstractmethod
    def init_cache(self, batch_size: int, device: torch.device) -> Any:
        """An empty decoding cache for ``batch_size`` sequences."""

    @abstractmethod
    def step(self, x: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        """One token: ``(B, d_model)`` and the cache -> ``(B, d_model)`` and the updated cache."""

    def reset_parameters(self, std: float) -> None:
        """Initialise weights: every Linear normal(0, std), no biases; mixers add their own parts."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=std)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(..., heads * P)`` -> ``(..., heads, P)``."""
    return x.unflatten(-1, (heads, x.shape[-1] // heads))


def append_along_seq(cache: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    """Append ``(B, H, P)`` to a ``(B, S, H, P)`` cache (or start one)."""
    new = new.unsqueeze(1)
    return new if cache is None else torch.cat([cache, new], dim=1)
