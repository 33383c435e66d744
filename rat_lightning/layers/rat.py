"""RAT: intra-chunk gated recurrence + softmax attention over chunk summaries
(Wei et al., "RAT: Bridging RNN Efficiency and Attention Accuracy", arXiv 2507.04416).

    z, x, g, q, k = split(W_in u)          q, k in G groups shared by H/G heads
    a = sigmoid(g + b_gate)                 per channel, shared by x and k
    s_t = a_t s_{t-1} + (1 - a_t) v_t       restarted at every chunk start, v in {x, k}
    attn_t = softmax over {summaries of previous chunks} + {own running state}, chunk RoPE
    o = W_out(sigmoid(z) * attn)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from rat_lightning.layers.base import Mixer
from rat_lightning.layers.cache import SequenceBuffer
from rat_lightning.layers.rnn import init_gate_bias
from rat_lightning.ops.chunk_attention import chunk_attention_step, rotate_summary
from rat_lightning.ops.rat_mixing import rat_mixing, split_projection
from rat_lightning.ops.recurrence import gated_recurrence_step
from rat_lightning.ops.recurrence.reference import compute_dtype


@dataclass
class RATCache:
    """Decoding cache of one RAT layer: ceil(T / L) entries per head instead of T.

    Attributes:
        keys, values: :class:`SequenceBuffer` of the C finished chunks' summaries ``(B, C, H, P)``
            in the layer input's dtype (bf16 for a bf16 model), keys with RoPE at their chunk
            index applied once, when the chunk ended.
        state: running ``(sx, sk)`` of the current chunk, each ``(B, H, P)`` fp32 (fp64 for fp64
            inputs), or None when the last chunk has just finished (the next token restarts the
            recurrence).
        position: index of the next token.
    """

    keys: SequenceBuffer = field(default_factory=SequenceBuffer)
    values: SequenceBuffer = field(default_factory=SequenceBuffer)
    state: tuple[torch.Tensor, torch.Tensor] | None = None
    position: int = 0

    def num_entries(self) -> int:
        """Key/value entries held per head: finished chunks plus the running state."""
        return self.keys.length + (self.state is not None)

    @property
    def nbytes(self) -> int:
        """Bytes held per batch: summaries plus the running state."""
        return self.keys.nbytes + self.values.nbytes + sum(t.numel() * t.element_size() for t in self.state or ())


class RAT(Mixer):
    """The RAT mixer.

    Args:
        d_model: int, model width.
        n_heads: int, attention heads H (d_model % H == 0).
        n_groups: int, G query/key groups shared by H/G heads (H % G == 0), paper: 2.
        chunk_size: int, L, paper: 16. L = 1 is attention with a gated value path; L >= T
            is a gated linear RNN.
        rope_base: float, RoPE base over chunk indices, default 10000.
        backend: str, the ops' backend: "auto" (Triton on CUDA), "reference" or "triton".
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_groups: int = 2,
        chunk_size: int = 16,
        rope_base: float = 10000.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if n_heads % n_groups:
            raise ValueError(f"n_heads ({n_heads}) must be divisible by n_groups ({n_groups})")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size}")
        self.n_heads, self.n_groups, self.chunk_size, self.rope_base = n_heads, n_groups, chunk_size, rope_base
        self.backend = backend
        head_dim = d_model // n_heads
        # One packed projection [z | x | g | q | k] (ops.rat_mixing.split_projection).
        self.w_in = nn.Linear(d_model, 3 * d_model + 2 * n_groups * head_dim, bias=False)
        self.w_out = nn.Linear(d_model, d_model, bias=False)
        self.gate_bias = nn.Parameter(torch.zeros(n_heads, head_dim))
        init_gate_bias(self.gate_bias, chunk_size - 1)

    def reset_parameters(self, std: float) -> None:
        super().reset_parameters(std)
        init_gate_bias(self.gate_bias, self.chunk_size - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, d_model)`` -> ``(B, T, d_model)``; any T (a last partial chunk is fine)."""
        return self._mix(x)[0]

    def _mix(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The parallel path: output ``(B, T, d_model)`` and the states sx, sk ``(B, T, H, P)`` (no gradient)."""
        y, sx, sk = rat_mixing(
            self.w_in(x), self.gate_bias, self.n_heads, self.n_groups, self.chunk_size, self.rope_base, self.backend
        )
        return self.w_out(y), sx, sk

    def cache_bytes(self, length: int, dtype: torch.dtype, read: bool = False) -> int:
        """Finished chunks' summaries in ``dtype`` plus the running state (if a chunk is open) in fp32."""
        width = 2 * self.w_out.in_features
        summaries = length // self.chunk_size * width * torch.finfo(dtype).bits // 8
        state = width * torch.finfo(compute_dtype(dtype)).bits // 8 if length % self.chunk_size else 0
        return summaries + state

    def init_cache(self, batch_size: int, device: torch.device, capacity: int = 0) -> RATCache:
        """An empty cache with room for the summaries of ``capacity`` tokens."""
        chunks = capacity // self.chunk_size
        return RATCache(SequenceBuffer(reserve=chunks), SequenceBuffer(reserve=chunks))

    def step(self, x: torch.Tensor, cache: RATCache) -> tuple[torch.Tensor, RATCache]:
        """``(B, d_model)`` -> ``(B, d_model)``; a finished chunk's states join the summaries."""
        z, value, gate, query, key = split_projection(self.w_in(x), self.n_heads, self.n_groups)
        query = query.repeat_interleave(self.n_heads // self.n_groups, dim=-2)
        previous = None if cache.position % self.chunk_size == 0 else cache.state
        sx, sk = gated_recurrence_step(value, gate, previous, key, gate_bias=self.gate_bias, backend=self.backend)
        keys, values = cache.keys.data, cache.values.data
        if keys is None:
            keys = values = sx.new_zeros(sx.shape[0], 0, *sx.shape[1:])
        attn = chunk_attention_step(query, sk, sx, keys, values, rope_base=self.rope_base, backend=self.backend)
        out = self.w_out((torch.sigmoid(z.to(attn.dtype)) * attn).flatten(1).to(x.dtype))
        if (cache.position + 1) % self.chunk_size:
            return out, RATCache(cache.keys, cache.values, (sx, sk), cache.position + 1)
        # The finished chunk's state becomes its summary; the next token restarts anyway.
        chunk = cache.position // self.chunk_size
        keys = cache.keys.append(rotate_summary(sk, chunk, self.rope_base).to(x.dtype))
        return out, RATCache(keys, cache.values.append(sx.to(x.dtype)), None, cache.position + 1)

    def prefill(self, x: torch.Tensor, cache: RATCache) -> tuple[torch.Tensor, RATCache]:
        """A prompt through the parallel path (kernels on CUDA); the summaries are the states at
        chunk ends, rotated and cast as ``step`` stores them."""
        if cache.position:
            return super().prefill(x, cache)
        out, sx, sk = self._mix(x)
        length, size = x.shape[1], self.chunk_size
        ends = slice(size - 1, length // size * size, size)
        keys = cache.keys.extend(rotate_summary(sk[:, ends], 0, self.rope_base).to(x.dtype))
        values = cache.values.extend(sx[:, ends].to(x.dtype))
        state_dtype = compute_dtype(x.dtype)
        state = (sx[:, -1].to(state_dtype), sk[:, -1].to(state_dtype)) if length % size else None
        return out, RATCache(keys, values, state, length)
