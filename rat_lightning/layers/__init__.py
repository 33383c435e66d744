"""Layers of the RAT family. Mixers keep the :class:`Mixer` contract (forward + step)."""

from rat_lightning.layers.attention import Attention, KVCache
from rat_lightning.layers.base import Mixer
from rat_lightning.layers.ffn import FeedForward
from rat_lightning.layers.norm import RMSNorm
from rat_lightning.layers.rat import RAT, RATCache
from rat_lightning.layers.rat_plus import RATPlus
from rat_lightning.layers.retention import Retention, RetentionCache
from rat_lightning.layers.rnn import GatedRNN, RNNCache

__all__ = [
    "RAT",
    "Attention",
    "FeedForward",
    "GatedRNN",
    "KVCache",
    "Mixer",
    "RATCache",
    "RATPlus",
    "RMSNorm",
    "RNNCache",
    "Retention",
    "RetentionCache",
]
