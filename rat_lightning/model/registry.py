"""The one table of mixers: a name in the config -> the layer it builds."""

from __future__ import annotations

from typing import Callable

from rat_lightning.layers import RAT, Attention, GatedRNN, Mixer, RATPlus, Retention
from rat_lightning.model.config import MIXER_NAMES, ModelConfig

MIXERS: dict[str, Callable[[ModelConfig], Mixer]] = {
    "attention": lambda c: Attention(c.d_model, c.n_heads, None, c.rope_base),
    "local_attention": lambda c: Attention(c.d_model, c.n_heads, c.window, c.rope_base),
    "rnn": lambda c: GatedRNN(c.d_model, c.n_heads, c.max_seq_len, c.backend),
    "rat": lambda c: RAT(c.d_model, c.n_heads, c.n_groups, c.chunk_size, c.rope_base, c.backend),
    "retention": lambda c: Retention(c.d_model, c.n_heads, c.rope_base),
    "rat_plus": lambda c: RATPlus(c.d_model, c.n_heads, True, c.rope_base, c.backend),
    "gated_attention": lambda c: RATPlus(c.d_model, c.n_heads, False, c.rope_base, c.backend),
}
assert tuple(MIXERS) == MIXER_NAMES, "MIXERS and MIXER_NAMES must list the same mixers"


def build_mixer(name: str, config: ModelConfig) -> Mixer:
    """Build the mixer called ``name`` with the shapes of ``config``."""
    return MIXERS[name](config)
