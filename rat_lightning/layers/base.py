"""The contract every sequence mixer keeps: a parallel path and a step path over its own cache."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import nn

from rat_lightning.errors import ConfigError
from rat_lightning.sparse.pattern import DENSE, LayerPattern


class Mixer(nn.Module, ABC):
    """A token mixer: ``forward`` over a whole sequence, ``step`` one token at a time.

    ``step`` over tokens 0..T-1 from ``init_cache`` must equal ``forward`` over the T tokens
    (tests hold every mixer to this), and ``prefill`` of a prompt must leave the cache ``step``
    would. Caches are explicit objects, never hidden module state.

    Mixers with ``supports_pattern`` attend under an inference pattern (:meth:`set_pattern`);
    the others are always dense (or have their own fixed structure).
    """

    supports_pattern: ClassVar[bool] = False
    pattern: LayerPattern = DENSE

    @abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, d_model)`` -> ``(B, T, d_model)``."""

    @abstractmethod
    def init_cache(self, batch_size: int, device: torch.device, capacity: int = 0) -> Any:
        """An empty decoding cache for ``batch_size`` sequences, with room reserved for
        ``capacity`` tokens where the cache grows (0: grow as needed)."""

    @abstractmethod
    def step(self, x: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        """One token: ``(B, d_model)`` and the cache -> ``(B, d_model)`` and the updated cache."""

    def prefill(self, x: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        """A prompt at once: ``(B, T, d_model)`` and a cache -> ``(B, T, d_model)`` and the cache
        after it. This default steps token by token; mixers override it with their parallel path
        (from an empty cache) where that is what makes generation fast."""
        outputs = []
        for t in range(x.shape[1]):
            y, cache = self.step(x[:, t], cache)
            outputs.append(y)
        return torch.stack(outputs, dim=1), cache

    def set_pattern(self, pattern: LayerPattern) -> None:
        """Attend under ``pattern`` from now on (forward and new caches)."""
        if not pattern.is_dense and not self.supports_pattern:
            raise ConfigError(
                f"a {type(self).__name__} layer takes no sparse inference pattern ({pattern.label()}); keep it "
                "dense with pattern.dense_layers, or use rat_plus / gated_attention / attention layers"
            )
        self.pattern = pattern

    def cache_bytes(self, length: int, dtype: torch.dtype, read: bool = False) -> int:
        """Bytes of this layer's decoding cache per sequence after ``length`` tokens whose
        activations are ``dtype`` (equal to what :meth:`step` allocates; tests check it). With
        ``read``, the bytes the last token reads (less than held only for top-k block)."""
        raise NotImplementedError(f"{type(self).__name__} does not report its cache size")

    def reset_parameters(self, std: float) -> None:
        """Initialise weights: every Linear normal(0, std), no biases; mixers add their own parts."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=std)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(..., heads * P)`` -> ``(..., heads, P)``."""
    return x.unflatten(-1, (heads, x.shape[-1] // heads))
