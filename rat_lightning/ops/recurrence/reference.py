"""Gated linear recurrence, plain PyTorch, fp32 inside.

    a_t = sigmoid(g_t + bias)
    s_t = a_t * s_{t-1} + (1 - a_t) * v_t        for v in {x, k}; the gate is shared

With ``chunk_size = L`` the state restarts at every chunk start (t % L == 0): RAT's
intra-chunk recurrence. With ``chunk_size = None`` it runs over the whole sequence
(gated RNN, RAT+), optionally from an initial state.

Two forms: a stepwise loop over T (the ground truth) and a chunked form (loop over the
positions of a block, vectorised over blocks, then a carry across blocks) that is fast
enough to train tiny models on the CPU. Tests hold the chunked form to the stepwise one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Block length of the chunked form when the recurrence does not restart (full sequence).
_FULL_SEQUENCE_BLOCK = 64


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types and fp32; fp64 stays fp64 so tests can hold kernels to an fp64 truth."""
    return torch.promote_types(dtype, torch.float32)


def _prepare(
    x: torch.Tensor, g: torch.Tensor, k: torch.Tensor | None, gate_bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gate, input scale and stacked values in the compute dtype: ``a, b (B,T,1,H,P)`` with
    ``b = 1 - a``, and ``v (B,T,N,H,P)`` with N = 1 or 2."""
    compute = compute_dtype(x.dtype)
    gf = g.to(compute)
    if gate_bias is not None:
        gf = gf + gate_bias.to(compute)
    a = torch.sigmoid(gf).unsqueeze(2)
    # 1 - a as sigmoid(-g): near a = 1 the subtraction would keep only a few bits in fp32.
    b = torch.sigmoid(-gf).unsqueeze(2)
    values = [x.to(compute)]
    if k is not None:
        heads, groups = x.shape[2], k.shape[2]
        # k is shared by H/G heads; the gate is per channel, so each head gets its own gated key.
        values.append(k.to(compute).repeat_interleave(heads // groups, dim=2))
    return a, b, torch.stack(values, dim=2)


def _stack_state(state: tuple[torch.Tensor, torch.Tensor | None], dtype: torch.dtype) -> torch.Tensor:
    """``(sx, sk)`` each ``(B, H, P)`` (sk may be None) -> ``(B, N, H, P)`` in ``dtype``."""
    return torch.stack([s.to(dtype) for s in state if s is not None], dim=1)


def _split(states: torch.Tensor, dtype: torch.dtype, with_k: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    sx = states[:, :, 0].to(dtype)
    sk = states[:, :, 1].to(dtype) if with_k else None
    return sx, sk


def gated_recurrence_stepwise(
    x: torch.Tensor,
    g: torch.Tensor,
    k: torch.Tensor | None = None,
    gate_bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    initial_state: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stepwise loop over time; see module docstring. Shapes as in :func:`gated_recurrence_chunked`."""
    a, b, v = _prepare(x, g, k, gate_bias)
    batch, length, n, heads, dim = v.shape
    state = torch.zeros(batch, n, heads, dim, dtype=v.dtype, device=x.device)
    if initial_state is not None:
        state = _stack_state(initial_state, v.dtype)
    out = []
    for t in range(length):
        restart = chunk_size is not None and t % chunk_size == 0
        carried = 0.0 if restart else a[:, t] * state
        state = carried + b[:, t] * v[:, t]
        out.append(state)
    return _split(torch.stack(out, dim=1), x.dtype, k is not None)


def gated_recurrence_chunked(
    x: torch.Tensor,
    g: torch.Tensor,
    k: torch.Tensor | None = None,
    gate_bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    initial_state: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated recurrence over x (and k) with a shared gate.

    Args:
        x: ``(B, T, H, P)`` values.
        g: ``(B, T, H, P)`` gate logits (before the bias and the sigmoid).
        k: ``(B, T, G, P)`` keys in G groups (H % G == 0) or None.
        gate_bias: ``(H, P)`` added to g before the sigmoid, or None.
        chunk_size: L to restart the state every L tokens, or None for the full sequence.
        initial_state: ``(sx, sk)`` of shape ``(B, H, P)`` (sk None when k is None); only
            with ``chunk_size=None``.

    Returns:
        ``(sx, sk)``: ``(B, T, H, P)`` states in x's dtype (computed in fp32); sk is None
        when k is None.
    """
    a, b, v = _prepare(x, g, k, gate_bias)
    batch, length, n, heads, dim = v.shape
    block = chunk_size or _FULL_SEQUENCE_BLOCK
    pad = (-length) % block
    if pad:
        # Padded steps carry the state unchanged (a = 1, input 0) and are cut off below.
        a = F.pad(a, (0, 0, 0, 0, 0, 0, 0, pad), value=1.0)
        b = F.pad(b, (0, 0, 0, 0, 0, 0, 0, pad))
        v = F.pad(v, (0, 0, 0, 0, 0, 0, 0, pad))
    blocks = (length + pad) // block
    a = a.view(batch, blocks, block, 1, heads, dim)
    b = b.view(batch, blocks, block, 1, heads, dim)
    v = v.view(batch, blocks, block, n, heads, dim)
    # Local states: the recurrence restarted at every block start, vectorised over blocks.
    local, decay = [], []
    state = torch.zeros(batch, blocks, n, heads, dim, dtype=v.dtype, device=x.device)
    running = torch.ones(batch, blocks, 1, heads, dim, dtype=v.dtype, device=x.device)
    for i in range(block):
        state = a[:, :, i] * state + b[:, :, i] * v[:, :, i]
        running = running * a[:, :, i]
        local.append(state)
        decay.append(running)
    states = torch.stack(local, dim=2)
    if chunk_size is None:
        # Carry across blocks: s = local + (product of gates since the block start) * carry.
        decays = torch.stack(decay, dim=2)
        carry = torch.zeros(batch, n, heads, dim, dtype=v.dtype, device=x.device)
        if initial_state is not None:
            carry = _stack_state(initial_state, v.dtype)
        carried = []
        for c in range(blocks):
            block_states = states[:, c] + decays[:, c] * carry.unsqueeze(1)
            carried.append(block_states)
            carry = block_states[:, -1]
        states = torch.stack(carried, dim=1)
    states = states.reshape(batch, blocks * block, n, heads, dim)[:, :length]
    return _split(states, x.dtype, k is not None)


def gated_recurrence_step(
    x: torch.Tensor,
    g: torch.Tensor,
    state: tuple[torch.Tensor, torch.Tensor | None] | None,
    k: torch.Tensor | None = None,
    gate_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One decoding step.

    Args:
        x: ``(B, H, P)``; g: ``(B, H, P)``; k: ``(B, G, P)`` or None.
        state: previous ``(sx, sk)`` fp32 ``(B, H, P)``, or None to restart (chunk start).
        gate_bias: ``(H, P)`` or None.

    Returns:
        new ``(sx, sk)`` in the compute dtype (fp32, or fp64 for fp64 inputs).
    """
    compute = compute_dtype(x.dtype)
    gf = g.to(compute)
    if gate_bias is not None:
        gf = gf + gate_bias.to(compute)
    # 1 - a as sigmoid(-g), as in the parallel form. x and k are updated apart, not stacked: a
    # decoding step is a handful of elementwise passes, and stacking copied every input and state.
    a, b = torch.sigmoid(gf), torch.sigmoid(-gf)
    values = (x, None if k is None else k.repeat_interleave(x.shape[1] // k.shape[1], dim=1))
    previous = (None, None) if state is None else state

    def update(value: torch.Tensor | None, last: torch.Tensor | None) -> torch.Tensor | None:
        if value is None:
            return None
        new = b * value.to(compute)
        return new if last is None else new + a * last.to(compute)

    sx, sk = (update(value, last) for value, last in zip(values, previous))
    return sx, sk
