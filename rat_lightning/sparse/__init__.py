"""Sparse inference: patterns as data, attention under a pattern, and its decoding caches."""

from rat_lightning.sparse.pattern import DENSE, InferencePattern, LayerPattern, topk_block_mask

__all__ = ["DENSE", "InferencePattern", "LayerPattern", "topk_block_mask"]
