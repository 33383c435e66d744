"""The mixing core of a RAT layer in plain PyTorch: the reference ops composed.

    z, x, g, q, k = split(h)                 h = W_in u, packed (see :func:`split_projection`)
    sx, sk = gated recurrence of x and k, gate sigmoid(g + bias), restarted every L tokens
    y = sigmoid(z) * chunk_attention(q, sk, sx)
"""

from __future__ import annotations

import torch

from rat_lightning.ops.chunk_attention.reference import chunk_attention_reference
from rat_lightning.ops.recurrence.reference import gated_recurrence_chunked


def split_projection(h: torch.Tensor, heads: int, groups: int) -> tuple[torch.Tensor, ...]:
    """Views of the packed projection ``h`` ``(..., (3 H + 2 G) P)``, laid out ``[z | x | g | q | k]``.

    Returns:
        ``z, x, g`` each ``(..., H, P)``: output-gate logits, values, recurrence-gate logits;
        ``q, k`` each ``(..., G, P)``: queries and keys in G groups.
    """
    dim = h.shape[-1] // (3 * heads + 2 * groups)
    sizes = [heads * dim] * 3 + [groups * dim] * 2
    counts = [heads] * 3 + [groups] * 2
    return tuple(part.unflatten(-1, (n, dim)) for part, n in zip(h.split(sizes, dim=-1), counts))


def rat_mixing_reference(
    h: torch.Tensor, gate_bias: torch.Tensor, heads: int, groups: int, chunk_size: int, rope_base: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``y`` ``(B, T, H * P)`` in h's dtype and the states ``sx, sk`` ``(B, T, H, P)`` (detached)."""
    z, x, g, q, k = split_projection(h, heads, groups)
    sx, sk = gated_recurrence_chunked(x, g, k, gate_bias, chunk_size)
    y = chunk_attention_reference(q, sk, sx, chunk_size, rope_base, gate=z)
    return y.flatten(2).to(h.dtype), sx.detach(), sk.detach()
