"""Model configs, the block stack, the language model and generation."""

from rat_lightning.model.config import MIXER_NAMES, ModelConfig
from rat_lightning.model.generation import generate, sample_next
from rat_lightning.model.lm import Block, RATLanguageModel

__all__ = ["MIXER_NAMES", "Block", "ModelConfig", "RATLanguageModel", "generate", "sample_next"]
