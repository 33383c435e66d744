"""Growable per-sequence buffers for decoding caches, and batch-level cache utilities.

Decoding appends one entry per step (a key, a value, a chunk summary). Concatenating copies the
whole past every step, which at a 4K context makes an attention step read and write its cache
three times over. :class:`SequenceBuffer` writes into spare room instead and doubles when full,
so linear decoding copies the past O(log T) times in all, and ``reserve`` (the capacity a caller
knows it needs, e.g. prompt + new tokens) makes it zero.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["SequenceBuffer", "repeat_cache"]


@dataclass(frozen=True)
class SequenceBuffer:
    """Entries ``(B, H, P)`` appended along time, held in a ``(B, capacity, H, P)`` tensor.

    :meth:`append` writes the new entry in place into the spare slot at ``length`` and returns a
    buffer one longer over the same storage. Older buffers keep their length, so they still read
    exactly what they read before: a cache object stays valid after it was stepped. Stepping the
    same buffer twice (branching, e.g. beam search) would make both branches write one slot:
    :meth:`clone` first. Under autograd (an entry that requires grad) it appends by
    concatenation, so that views saved for the backward are never modified in place.

    Attributes:
        storage: ``(B, capacity, H, P)`` or None before the first entry.
        length: entries in use (``storage[:, :length]``).
        reserve: capacity to allocate at the first entry (0: just what is appended).
    """

    storage: torch.Tensor | None = None
    length: int = 0
    reserve: int = 0

    @classmethod
    def of(cls, entries: torch.Tensor, reserve: int = 0) -> SequenceBuffer:
        """A buffer holding ``entries`` ``(B, S, H, P)``, with room for ``reserve`` in all."""
        return cls(reserve=reserve).extend(entries)

    @property
    def data(self) -> torch.Tensor | None:
        """``(B, length, H, P)`` view of the entries, or None before the first."""
        return None if self.storage is None else self.storage[:, : self.length]

    @property
    def nbytes(self) -> int:
        """Bytes of the entries in use (not of the spare room)."""
        data = self.data
        return 0 if data is None else data.numel() * data.element_size()

    def append(self, entry: torch.Tensor) -> SequenceBuffer:
        """The buffer with ``entry`` ``(B, H, P)`` added (cast to the storage's dtype)."""
        return self.extend(entry.unsqueeze(1))

    def extend(self, entries: torch.Tensor) -> SequenceBuffer:
        """The buffer with ``entries`` ``(B, S, H, P)`` added (cast to the storage's dtype)."""
        length = self.length + entries.shape[1]
        if self.storage is not None and torch.is_grad_enabled() and entries.requires_grad:
            return SequenceBuffer(torch.cat([self.data, entries.to(self.storage.dtype)], dim=1), length, self.reserve)
        storage = self.storage
        if storage is None or length > storage.shape[1]:
            capacity = max(length, self.reserve, 2 * (0 if storage is None else storage.shape[1]))
            dtype = entries.dtype if storage is None else storage.dtype
            grown = entries.new_empty((entries.shape[0], capacity, *entries.shape[2:]), dtype=dtype)
            if self.length:
                grown[:, : self.length] = self.data
            storage = grown
        storage[:, self.length : length] = entries
        return SequenceBuffer(storage, length, self.reserve)

    def clone(self) -> SequenceBuffer:
        """An independent copy (its own storage)."""
        return SequenceBuffer(None if self.storage is None else self.storage.clone(), self.length, self.reserve)


def repeat_cache(cache: Any, repeats: int) -> Any:
    """Repeat every sequence of a decoding cache ``repeats`` times along the batch.

    Prefill a prompt once, then sample several continuations from it: row ``i`` of the result is
    row ``i // repeats`` of ``cache``. Works on any cache built of dataclasses, lists, tuples,
    :class:`SequenceBuffer` and batch-first tensors (every cache of this package); a dataclass
    field with ``metadata={"batch": False}`` is shared by the batch and kept as it is.

    Args:
        cache: one layer's cache or a list of them (:meth:`RATLanguageModel.init_cache`).
        repeats: copies per sequence (>= 1).

    Returns:
        The same structure with independent storage, batch ``B * repeats``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if isinstance(cache, torch.Tensor):
        return cache.repeat_interleave(repeats, dim=0)
    if isinstance(cache, SequenceBuffer):
        storage = cache.data
        return SequenceBuffer(
            None if storage is None else _repeat_into(storage, repeats, cache.storage.shape[1]), cache.length,
            cache.reserve,
        )  # fmt: skip
    if dataclasses.is_dataclass(cache):
        return dataclasses.replace(
            cache,
            **{
                f.name: repeat_cache(getattr(cache, f.name), repeats)
                for f in dataclasses.fields(cache)
                if f.metadata.get("batch", True)
            },
        )
    if isinstance(cache, (list, tuple)):
        return type(cache)(repeat_cache(item, repeats) for item in cache)
    return cache  # ints (positions), None


def _repeat_into(entries: torch.Tensor, repeats: int, capacity: int) -> torch.Tensor:
    """``(B, S, ...)`` -> ``(B * repeats, capacity, ...)`` storage whose first S entries repeat ``entries``."""
    out = entries.new_empty((entries.shape[0] * repeats, capacity, *entries.shape[2:]))
    out.unflatten(0, (entries.shape[0], repeats))[:, :, : entries.shape[1]] = entries.unsqueeze(1)
    return out
