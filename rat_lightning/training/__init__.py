"""Training: the LightningModule, optimizers and schedules, callbacks."""

from rat_lightning.training.module import LanguageModelModule
from rat_lightning.training.sparse_eval import SparseInferenceEval

__all__ = ["LanguageModelModule", "SparseInferenceEval"]
