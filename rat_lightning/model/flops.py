"""FLOPs per token, counted per layer (PITFALLS 10: 6N alone ignores attention and recurrences).

Matmul FLOPs are 2 per multiply-add. Training costs 3x the forward (forward + 2x backward).
"""

from __future__ import annotations

from rat_lightning.model.config import ModelConfig


def mixer_context_flops(name: str, config: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token of a mixer beyond its projections, averaged over positions.

    Args:
        name: mixer name.
        config: model shapes.
        seq_len: T.

    Returns:
        FLOPs per token (forward).
    """
    d, length = config.d_model, seq_len
    if name in ("attention", "gated_attention"):
        # q.k and p.v over on average (T + 1) / 2 keys.
        return 2 * 2 * d * (length + 1) / 2
    if name == "local_attention":
        keys = sum(min(t + 1, config.window) for t in range(length)) / length
        return 2 * 2 * d * keys
    if name == "rat":
        # Recurrence on x and k (about 3 FLOPs per channel each) + attention over previous
        # chunks (on average (T/L - 1)/2 of them) plus the own state.
        chunks = (length // config.chunk_size - 1) / 2 + 1
        return 2 * 3 * d + 2 * 2 * d * max(chunks, 1)
    if name == "rnn":
        return 3 * d
    if name == "rat_plus":
        # Full-sequence recurrence on x and k, then dense attention (the training pattern).
        return 2 * 3 * d + 2 * 2 * d * (length + 1) / 2
    if name == "retention":
        return 2 * 2 * d * (length + 1) / 2
    raise ValueError(f"unknown mixer {name!r}")


def flops_per_token(config: ModelConfig, seq_len: int, num_matmul_params: int, training: bool = True) -> float:
    """FLOPs per token of the whole model.

    Args:
        config: model shapes.
        seq_len: T.
        num_matmul_params: parameters that take part in matmuls per token (all Linear weights,
            the output head included; the embedding lookup is free).
        training: 3x the forward when True.
    """
    forward = 2 * num_matmul_params + sum(mixer_context_flops(m, config, seq_len) for m in config.layer_mixers)
    return forward * (3 if training else 1)
