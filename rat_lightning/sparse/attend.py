"""Softmax attention under a :class:`LayerPattern`: the parallel path and the decoding step.

Both take keys and values already RoPE'd, layout ``(B, T, H, P)``. A head hybrid is computed as
two head groups (dense heads, sparse heads), each with its own cache, so each cache holds
exactly the keys its heads can still see.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from rat_lightning.layers.cache import SequenceBuffer
from rat_lightning.ops.dilated_attention import dilated_attention
from rat_lightning.sparse.pattern import DENSE, LayerPattern, topk_block_mask


@dataclass
class PatternKVCache:
    """Keys and values one head group keeps for decoding under its pattern.

    Attributes:
        keys, values: :class:`SequenceBuffer` of ``(B, S, h, P)`` entries, keys RoPE'd.
        positions: ``(S,)`` int64 token positions of the entries (shared by the batch) where the
            pattern evicts keys; None where it keeps every key (entry i is position i).
    """

    keys: SequenceBuffer = field(default_factory=SequenceBuffer)
    values: SequenceBuffer = field(default_factory=SequenceBuffer)
    positions: torch.Tensor | None = field(default=None, metadata={"batch": False})

    def num_entries(self) -> int:
        """Entries held per head."""
        return self.keys.length

    @property
    def nbytes(self) -> int:
        """Bytes of the keys and values held."""
        return self.keys.nbytes + self.values.nbytes


@dataclass
class PatternCache:
    """Decoding cache of an attention layer that runs under a pattern.

    Attributes:
        kv: one :class:`PatternKVCache` per head group of the layer's pattern.
        state: the layer's recurrent state (RAT+: ``(V, K)`` each ``(B, H, P)`` fp32, before
            RoPE), or None.
        position: index of the next token.
    """

    kv: list[PatternKVCache] = field(default_factory=list)
    state: tuple[torch.Tensor, ...] | None = None
    position: int = 0


def head_groups(pattern: LayerPattern, n_heads: int) -> list[tuple[slice, LayerPattern]]:
    """Split heads into (slice, pattern) groups: dense heads first, then the sparse ones."""
    if pattern.is_dense or pattern.dense_heads == 0:
        return [(slice(0, n_heads), pattern)]
    if pattern.dense_heads >= n_heads:
        return [(slice(0, n_heads), DENSE)]
    return [(slice(0, pattern.dense_heads), DENSE), (slice(pattern.dense_heads, n_heads), pattern.sparse_only())]


def pattern_cache_bytes(
    pattern: LayerPattern, n_heads: int, head_dim: int, length: int, dtype: torch.dtype, read: bool = False
) -> int:
    """Bytes of keys and values per sequence under ``pattern`` after ``length`` tokens.

    Args:
        pattern: the layer's pattern; n_heads, head_dim: the layer's H and P.
        length: tokens decoded so far (T).
        dtype: dtype of the cached keys and values.
        read: count the entries the last query attends to instead of those held (they differ
            for top-k block, which holds every key but reads k blocks).
    """
    total = 0
    for heads, group in head_groups(pattern, n_heads):
        entries = group.read_entries(length) if read else group.entries(length)
        total += entries * (heads.stop - heads.start)
    return total * head_dim * 2 * torch.finfo(dtype).bits // 8


def pattern_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, pattern: LayerPattern, backend: str = "auto"
) -> torch.Tensor:
    """Causal attention restricted to ``pattern``.

    Args:
        query, key, value: ``(B, T, H, P)``, one float dtype, RoPE applied.
        pattern: the layer's pattern.
        backend: backend of the dilated-attention op ("auto": Triton on CUDA for inference).

    Returns:
        ``(B, T, H, P)`` in the input dtype.
    """
    groups = head_groups(pattern, query.shape[2])
    outputs = [_attend_group(query[:, :, s], key[:, :, s], value[:, :, s], p, backend) for s, p in groups]
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)


def _attend_group(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, pattern: LayerPattern, backend: str
) -> torch.Tensor:
    if pattern.is_dense:
        out = F.scaled_dot_product_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), is_causal=True
        )
        return out.transpose(1, 2)
    if pattern.topk_blocks is None:
        return dilated_attention(
            query, key, value, dilation=pattern.dilation, window=pattern.window, sinks=pattern.sinks, backend=backend
        )
    mask = topk_block_mask(query, key, pattern.topk_blocks, pattern.block_size)
    out = F.scaled_dot_product_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=mask
    )
    return out.transpose(1, 2)


def init_pattern_cache(pattern: LayerPattern, n_heads: int, capacity: int = 0) -> PatternCache:
    """An empty cache with one :class:`PatternKVCache` per head group of ``pattern``; groups that
    keep every key reserve room for ``capacity`` tokens."""
    return PatternCache([_empty_group_cache(group, capacity) for _, group in head_groups(pattern, n_heads)])


def _empty_group_cache(pattern: LayerPattern, capacity: int) -> PatternKVCache:
    if pattern.evicts:
        empty = torch.zeros(0, dtype=torch.int64)
        return PatternKVCache(positions=empty)
    return PatternKVCache(SequenceBuffer(reserve=capacity), SequenceBuffer(reserve=capacity))


def prefill_pattern_cache(
    key: torch.Tensor, value: torch.Tensor, pattern: LayerPattern, caches: list[PatternKVCache]
) -> list[PatternKVCache]:
    """The group caches after a prompt, from its keys and values (as ``step`` would leave them).

    Args:
        key, value: ``(B, T, H, P)`` of the prompt, keys RoPE'd, in the cache's dtype.
        pattern: the layer's pattern.
        caches: the empty group caches (:func:`init_pattern_cache`), whose reserved room is used.

    Returns:
        One :class:`PatternKVCache` per head group, holding what a later query may still see.
    """
    filled = []
    for (heads, group), cache in zip(head_groups(pattern, key.shape[2]), caches):
        group_key, group_value, positions = key[:, :, heads], value[:, :, heads], None
        if group.evicts:
            positions = group.kept_positions(key.shape[1]).to(key.device)
            group_key, group_value = group_key[:, positions], group_value[:, positions]
        filled.append(PatternKVCache(cache.keys.extend(group_key), cache.values.extend(group_value), positions))
    return filled


def pattern_attention_step(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    caches: list[PatternKVCache],
    pattern: LayerPattern,
    position: int,
) -> tuple[torch.Tensor, list[PatternKVCache]]:
    """One decoding step: the token at ``position`` attends to its group caches plus itself.

    Args:
        query, key, value: ``(B, H, P)`` of the new token (RoPE applied).
        caches: one :class:`PatternKVCache` per head group (from :func:`init_pattern_cache`).
        pattern: the layer's pattern.
        position: the new token's index.

    Returns:
        ``(B, H, P)`` output and the caches after eviction of keys no later query can see.
    """
    outputs, updated = [], []
    for (heads, group_pattern), cache in zip(head_groups(pattern, query.shape[1]), caches):
        out, cache = _step_group(query[:, heads], key[:, heads], value[:, heads], cache, group_pattern, position)
        outputs.append(out)
        updated.append(cache)
    return (outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)), updated


def _step_group(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cache: PatternKVCache,
    pattern: LayerPattern,
    position: int,
) -> tuple[torch.Tensor, PatternKVCache]:
    keys, values, positions = cache.keys.append(key), cache.values.append(value), cache.positions
    if pattern.evicts:
        positions = torch.cat([positions.to(key.device), torch.full((1,), position, device=key.device)])
    mask = None
    if pattern.topk_blocks is not None:
        mask = _topk_step_mask(query, keys.data, pattern, position)
    out = decode_attention(query, keys.data, values.data, mask)
    # Keep only what a later query can still see; everything kept now is seen by this query.
    if pattern.evicts:
        keep = pattern.still_needed(positions, position + 1)
        keys, values = SequenceBuffer.of(keys.data[:, keep]), SequenceBuffer.of(values.data[:, keep])
        positions = positions[keep]
    return out, PatternKVCache(keys, values, positions)


# PyTorch's first choice on Hopper, cuDNN attention, builds an execution plan per key length; a
# decoding step's key length changes every token, so it would build one per layer per step. On an
# H100, 1.3B attention at batch 80 decoded at 79 ms a step this way and at 37 ms without cuDNN (one
# layer's step at a fixed length: 0.9 ms). Flash and memory-efficient attention need no plan.
_DECODE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def decode_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """One query per sequence over a cache, through SDPA without cuDNN (see ``_DECODE_BACKENDS``).

    Args:
        query: ``(B, H, P)``; keys, values: ``(B, S, H, P)`` (any strides with a unit last stride).
        mask: ``(B, H, 1, S)`` bool (True: attend) or None.

    Returns:
        ``(B, H, P)`` in the query's dtype.
    """
    with sdpa_kernel(_DECODE_BACKENDS):
        out = F.scaled_dot_product_attention(
            query.unsqueeze(2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask
        )
    return out[:, :, 0]


def _topk_step_mask(query: torch.Tensor, keys: torch.Tensor, pattern: LayerPattern, position: int) -> torch.Tensor:
    """``(B, H, 1, S)`` mask of one query under top-k block (the cache holds every position)."""
    size = pattern.block_size
    positions = torch.arange(keys.shape[1], device=keys.device)
    own = position // size
    seen = positions // size == own
    batch, _, heads, _ = keys.shape
    seen = seen.expand(batch, heads, -1).clone()
    if own > 0 and pattern.topk_blocks > 0:
        means = keys[:, : own * size].float().unflatten(1, (own, size)).mean(dim=2)  # (B, own, H, P)
        scores = torch.einsum("bhp,bnhp->bhn", query.float(), means)
        index = scores.topk(min(pattern.topk_blocks, own), dim=-1).indices
        picked = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, index, True)
        seen |= picked.gather(-1, (positions // size).clamp(max=own - 1).expand(batch, heads, -1)) & (
            positions // size < own
        )
    return seen.unsqueeze(2)
