"""The language-modelling loss: a sum of fp32 token cross-entropies over the kept targets."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Targets equal to this take no loss (prompt tokens in SFT, document ends in packed pretraining).
IGNORE_INDEX = -100


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of the token cross-entropies over targets that are not :data:`IGNORE_INDEX`.

    The softmax runs in fp32 whatever the logits' dtype. Eager PyTorch makes an fp32 copy of
    the logits and several passes over it (about 34 GB of traffic for 32K tokens x 32K vocab);
    under ``torch.compile`` the upcast, log-sum-exp and gather fuse into one pass over the bf16
    logits, and the backward into another (see ``LanguageModelModule(compile=True)``).

    Args:
        logits: ``(..., V)`` in any float dtype.
        targets: ``(...)`` int64 class ids or :data:`IGNORE_INDEX`.

    Returns:
        A 0-dim fp32 tensor.
    """
    return F.cross_entropy(
        logits.flatten(0, -2).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
