"""Training: the LightningModule, optimizers and schedules, callbacks."""

from rat_lightning.training.module import LanguageModelModule

__all__ = ["LanguageModelModule"]
