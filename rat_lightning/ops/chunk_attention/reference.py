"""RAT's inter-chunk attention with the own-state merge, plain PyTorch, fp32 inside.

Query t (in chunk c = t // L) attends, in one softmax, to the summaries of all previous
chunks (the states at positions jL + L - 1, j < c) and to its own running state (K_t, V_t).
RoPE uses the chunk index as position: q and the own state both sit at c, so their
rotations cancel and the own score is the plain dot product q_t . K_t.
"""

from __future__ import annotations

import torch

from rat_lightning.ops.rope import apply_rope


def chunk_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    chunk_size: int,
    rope_base: float = 10000.0,
    scale: float | None = None,
    gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inter-chunk softmax attention over chunk summaries plus the own state, optionally gated.

    Args:
        q: ``(B, T, G, P)`` queries (not rotated) in G groups, each shared by H / G consecutive heads.
        k: ``(B, T, H, P)`` key states from the intra-chunk recurrence (not rotated).
        v: ``(B, T, H, P)`` value states.
        chunk_size: L.
        rope_base: RoPE base; positions are chunk indices.
        scale: softmax scale, default ``P ** -0.5``.
        gate: ``(B, T, H, P)`` output-gate logits: the result is ``sigmoid(gate) * attention``; or None.

    Returns:
        ``(B, T, H, P)`` in q's dtype.
    """
    batch, length, heads, dim = k.shape
    q = q.repeat_interleave(heads // q.shape[2], dim=2)
    scale = dim**-0.5 if scale is None else scale
    chunk_of = torch.arange(length, device=q.device) // chunk_size
    full_chunks = length // chunk_size
    q_rot = apply_rope(q, chunk_of, rope_base)
    k_sum = k[:, chunk_size - 1 :: chunk_size][:, :full_chunks]
    v_sum = v[:, chunk_size - 1 :: chunk_size][:, :full_chunks].to(q_rot.dtype)
    k_sum = apply_rope(k_sum, torch.arange(full_chunks, device=q.device), rope_base)
    inter = torch.einsum("bthp,bchp->bhtc", q_rot, k_sum) * scale
    visible = torch.arange(full_chunks, device=q.device)[None, :] < chunk_of[:, None]
    inter = inter.masked_fill(~visible, float("-inf"))
    own = (q.to(q_rot.dtype) * k.to(q_rot.dtype)).sum(-1).transpose(1, 2).unsqueeze(-1) * scale
    probs = torch.softmax(torch.cat([inter, own], dim=-1), dim=-1)
    out = torch.einsum("bhtc,bchp->bthp", probs[..., :-1], v_sum)
    out = out + probs[..., -1].transpose(1, 2).unsqueeze(-1) * v.to(q_rot.dtype)
    if gate is not None:
        out = torch.sigmoid(gate.to(out.dtype)) * out
    return out.to(q.dtype)


def chunk_attention_step(
    q: torch.Tensor,
    k_own: torch.Tensor,
    v_own: torch.Tensor,
    k_chunks: torch.Tensor,
    v_chunks: torch.Tensor,
    rope_base: float = 10000.0,
    scale: float | None = None,
) -> torch.Tensor:
    """One decoding step of inter-chunk attention.

    Args:
        q: ``(B, H, P)`` query of the current token, in chunk c.
        k_own, v_own: ``(B, H, P)`` running states of the current chunk.
        k_chunks, v_chunks: ``(B, C, H, P)`` summaries of the c finished chunks, keys with RoPE at
            their chunk index applied (a decoding cache rotates each summary once, when its chunk
            ends: :func:`rotate_summary`).
        rope_base: RoPE base.
        scale: default ``P ** -0.5``.

    Returns:
        ``(B, H, P)`` in fp32 (fp64 for fp64 inputs).
    """
    batch, chunks, heads, dim = k_chunks.shape
    scale = dim**-0.5 if scale is None else scale
    q_rot = apply_rope(q.unsqueeze(1), torch.full((1,), chunks, device=q.device), rope_base)[:, 0]
    inter = torch.einsum("bhp,bchp->bhc", q_rot, k_chunks.to(q_rot.dtype)) * scale
    own = (q.to(q_rot.dtype) * k_own.to(q_rot.dtype)).sum(-1, keepdim=True) * scale
    probs = torch.softmax(torch.cat([inter, own], dim=-1), dim=-1)
    out = torch.einsum("bhc,bchp->bhp", probs[..., :-1], v_chunks.to(q_rot.dtype))
    return out + probs[..., -1:] * v_own.to(q_rot.dtype)


def rotate_summary(k: torch.Tensor, chunk: int, rope_base: float = 10000.0) -> torch.Tensor:
    """RoPE at chunk index ``chunk`` on a finished chunk's key summary, as the caches store it.

    Args:
        k: ``(B, H, P)`` or ``(B, C, H, P)`` (then chunks ``chunk .. chunk + C - 1``).
        chunk: index of the (first) chunk.
        rope_base: RoPE base.

    Returns:
        The rotated keys, fp32 (fp64 for fp64 input), same shape.
    """
    keys = k if k.dim() == 4 else k.unsqueeze(1)
    positions = torch.arange(chunk, chunk + keys.shape[1], device=k.device)
    rotated = apply_rope(keys, positions, rope_base)
    return rotated if k.dim() == 4 else rotated[:, 0]
