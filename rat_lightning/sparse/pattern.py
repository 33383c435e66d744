"""Inference patterns as data: which keys each query of an attention layer may see.

An :class:`InferencePattern` is what a user writes in YAML (``model.config.pattern``, the
``SparseInferenceEval`` grid, the joint-training pattern). :meth:`InferencePattern.layer` resolves
it to one frozen :class:`LayerPattern` per layer, which the attention layers use for their
parallel mask and their decoding cache. Structured patterns (RAT+ paper):

    allowed(t, j) = j <= t and ( (j + 1) % D == 0     # dilated: last position of every D-block
                                 or t - j <= W         # local window (W = 0 keeps j = t)
                                 or j < I )            # sinks

Top-k block (our design; the paper names it, the released code has none): keys in blocks of
``block_size``; query t in block c sees its own block causally plus the ``topk_blocks`` earlier
blocks b < c with the largest ``q_t . mean(K of block b)`` (fp32), MoBA-style.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from rat_lightning.errors import ConfigError


@dataclass(frozen=True)
class LayerPattern:
    """The pattern of one layer's sparse heads; the first ``dense_heads`` heads stay dense.

    Attributes:
        dilation: D >= 1 (1 = dense).
        window: W >= 0.
        sinks: I >= 0.
        topk_blocks: k, or None for a structured pattern.
        block_size: tokens per block of the top-k pattern.
        dense_heads: heads (the first ones) that keep dense attention: a head hybrid.
    """

    dilation: int = 1
    window: int = 0
    sinks: int = 0
    topk_blocks: int | None = None
    block_size: int = 64
    dense_heads: int = 0

    @property
    def is_dense(self) -> bool:
        """True when every head sees every earlier key."""
        return self.topk_blocks is None and self.dilation == 1

    def sparse_only(self) -> LayerPattern:
        """This pattern without its dense heads (what the sparse heads do)."""
        return replace(self, dense_heads=0)

    @property
    def evicts(self) -> bool:
        """True when a decoding cache can drop keys (structured sparse patterns); dense and
        top-k block keep every key."""
        return self.topk_blocks is None and self.dilation > 1

    def still_needed(self, positions: torch.Tensor, length: int) -> torch.Tensor:
        """Bool mask over key ``positions`` (< ``length``): True where some query at or after
        ``length`` can still see the key. The one eviction rule of the decoding caches."""
        if not self.evicts:
            return torch.ones_like(positions, dtype=torch.bool)
        return ((positions + 1) % self.dilation == 0) | (positions >= length - self.window) | (positions < self.sinks)

    def kept_positions(self, length: int) -> torch.Tensor:
        """Positions a decoding cache must still hold after ``length`` tokens (int64, sorted)."""
        j = torch.arange(length)
        return j[self.still_needed(j, length)]

    def entries(self, length: int) -> int:
        """KV entries per sparse head held after ``length`` tokens."""
        return int(self.kept_positions(length).numel())

    def read_entries(self, length: int) -> int:
        """KV entries per sparse head that the query at position ``length - 1`` attends to."""
        if self.topk_blocks is None:
            kept = self.kept_positions(length - 1) if length > 1 else torch.zeros(0)
            return int(kept.numel()) + 1  # plus the token itself
        own = (length - 1) % self.block_size + 1
        earlier = (length - 1) // self.block_size
        return own + min(self.topk_blocks, earlier) * self.block_size

    def label(self) -> str:
        """Short name: ``dense``, ``D16``, ``D16+W256+I4``, ``top4x64``, with ``|h2dense`` for
        a head hybrid."""
        if self.topk_blocks is not None:
            core = f"top{self.topk_blocks}x{self.block_size}"
        elif self.dilation == 1:
            return "dense"
        else:
            core = f"D{self.dilation}" + (f"+W{self.window}" if self.window else "") + (
                f"+I{self.sinks}" if self.sinks else ""
            )
        return core + (f"|h{self.dense_heads}dense" if self.dense_heads else "")


DENSE = LayerPattern()


def topk_block_mask(query: torch.Tensor, key: torch.Tensor, topk: int, block_size: int) -> torch.Tensor:
    """Top-k block mask from the queries and keys themselves.

    Args:
        query, key: ``(B, T, H, P)`` (RoPE applied).
        topk: earlier blocks each query selects.
        block_size: tokens per block.

    Returns:
        bool ``(B, H, T, T)``: query t sees its own block up to t and its top-k earlier blocks.
    """
    batch, length, heads, _ = key.shape
    blocks = -(-length // block_size)
    padded = torch.nn.functional.pad(key.float(), (0, 0, 0, 0, 0, blocks * block_size - length))
    means = padded.unflatten(1, (blocks, block_size)).mean(dim=2)  # (B, nb, H, P); only complete blocks get picked
    scores = torch.einsum("bthp,bnhp->bhtn", query.float(), means)
    t = torch.arange(length, device=key.device)
    own_block = t // block_size
    earlier = torch.arange(blocks, device=key.device)[None, :] < own_block[:, None]  # (T, nb)
    scores = scores.masked_fill(~earlier, float("-inf"))
    picked = torch.zeros_like(scores, dtype=torch.bool)
    k = min(topk, blocks)
    if k > 0:
        values, index = scores.topk(k, dim=-1)
        picked.scatter_(-1, index, values > float("-inf"))
    key_block = t // block_size
    seen = picked.gather(-1, key_block.expand(batch, heads, length, length))
    same = (key_block[None, :] == own_block[:, None]) & (t[None, :] <= t[:, None])
    return seen | same


def _per_layer(value: int | list[int], name: str, n_layers: int) -> list[int]:
    values = [value] * n_layers if isinstance(value, int) else list(value)
    if len(values) != n_layers:
        raise ConfigError(
            f"pattern.{name} lists {len(values)} values but the model has {n_layers} layers; give one int "
            "for every layer or one value per layer"
        )
    return values


@dataclass
class InferencePattern:
    """Which keys each attention query sees; a YAML-configurable description of one pattern.

    Each of dilation, window and sinks is one int for every layer or a list with one per layer.
    Defaults describe dense attention.
    """

    dilation: int | list[int] = 1
    """D: dilated keys are the last position of every D-block (1 = dense)."""
    window: int | list[int] = 0
    """W: query t also sees keys t - W .. t."""
    sinks: int | list[int] = 0
    """I: the first I tokens are always seen."""
    topk_blocks: int | None = None
    """Top-k block attention instead of a structured pattern: this many earlier blocks per query."""
    block_size: int = 64
    """Tokens per block of top-k block attention."""
    dense_layers: list[int] = field(default_factory=list)
    """Layers (0-based, negative from the end) kept dense: a layer hybrid, e.g. [0, -1]."""
    dense_heads: int = 0
    """In every sparse layer, the first dense_heads heads stay dense: a head hybrid."""
    name: str | None = None
    """Label in tables and TensorBoard; generated from the fields when None."""

    def __post_init__(self) -> None:
        for field_name, low in (("dilation", 1), ("window", 0), ("sinks", 0)):
            value = getattr(self, field_name)
            for v in [value] if isinstance(value, int) else value:
                if isinstance(v, bool) or not isinstance(v, int) or v < low:
                    raise ConfigError(f"pattern.{field_name} must be an int >= {low} (or a list of them), got {v!r}")
        if self.topk_blocks is not None:
            if self.topk_blocks < 0:
                raise ConfigError(f"pattern.topk_blocks must be >= 0 or null, got {self.topk_blocks}")
            if self.dilation != 1 or self.window != 0 or self.sinks != 0:
                raise ConfigError("pattern.topk_blocks replaces dilation/window/sinks; leave those at 1/0/0")
        if self.block_size < 1:
            raise ConfigError(f"pattern.block_size must be >= 1, got {self.block_size}")
        if self.dense_heads < 0:
            raise ConfigError(f"pattern.dense_heads must be >= 0, got {self.dense_heads}")

    @property
    def is_dense(self) -> bool:
        """True when no layer is sparsified."""
        dilations = [self.dilation] if isinstance(self.dilation, int) else self.dilation
        return self.topk_blocks is None and all(d == 1 for d in dilations)

    def check(self, n_layers: int, n_heads: int, seq_len: int | None = None) -> None:
        """Raise :class:`ConfigError` if the pattern does not fit a model of this shape (and a
        sequence of ``seq_len`` tokens)."""
        for name in ("dilation", "window", "sinks"):
            _per_layer(getattr(self, name), name, n_layers)
        bad = [i for i in self.dense_layers if not -n_layers <= i < n_layers]
        if bad:
            raise ConfigError(
                f"pattern.dense_layers has {bad}, but the model has layers 0..{n_layers - 1} "
                f"(or -{n_layers}..-1 from the end)"
            )
        if self.dense_heads > n_heads:
            raise ConfigError(f"pattern.dense_heads ({self.dense_heads}) exceeds the model's {n_heads} heads")
        if seq_len is not None:
            dilations = _per_layer(self.dilation, "dilation", n_layers)
            if max(dilations) > seq_len:
                raise ConfigError(
                    f"pattern {self.label()}: dilation {max(dilations)} is larger than the sequence length "
                    f"{seq_len}, so no token would be a dilated key; use dilation <= {seq_len}"
                )
            if self.topk_blocks is not None and self.block_size > seq_len:
                raise ConfigError(
                    f"pattern {self.label()}: block_size {self.block_size} exceeds the sequence length {seq_len}"
                )

    def layer(self, index: int, n_layers: int) -> LayerPattern:
        """The resolved pattern of layer ``index`` (dense for ``dense_layers``)."""
        dense = {i % n_layers for i in self.dense_layers}
        if index in dense or self.is_dense:
            return DENSE
        resolved = LayerPattern(
            dilation=_per_layer(self.dilation, "dilation", n_layers)[index],
            window=_per_layer(self.window, "window", n_layers)[index],
            sinks=_per_layer(self.sinks, "sinks", n_layers)[index],
            topk_blocks=self.topk_blocks,
            block_size=self.block_size,
            dense_heads=self.dense_heads,
        )
        return DENSE if resolved.is_dense else resolved

    def label(self) -> str:
        """``name`` if given, else a label built from the fields (e.g. ``D16+W256|dense[0,-1]``)."""
        if self.name:
            return self.name
        if self.is_dense:
            return "dense"
        parts = []
        for field_name, short in (("dilation", "D"), ("window", "W"), ("sinks", "I")):
            value = getattr(self, field_name)
            if isinstance(value, list):
                parts.append(f"{short}{'/'.join(map(str, value))}")
            elif value and not (field_name == "dilation" and value == 1):
                parts.append(f"{short}{value}")
        core = f"top{self.topk_blocks}x{self.block_size}" if self.topk_blocks is not None else "+".join(parts)
        if self.dense_heads:
            core += f"|h{self.dense_heads}dense"
        if self.dense_layers:
            core += f"|dense{list(self.dense_layers)}".replace(" ", "")
        return core
