"""The language-modelling loss and its compiled use in the LightningModule."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from rat_lightning.model import ModelConfig
from rat_lightning.model.loss import IGNORE_INDEX, cross_entropy_sum
from rat_lightning.training import LanguageModelModule


def test_cross_entropy_sum_is_fp32_and_skips_ignored_targets():
    logits = torch.randn(2, 3, 7).bfloat16()
    targets = torch.tensor([[1, IGNORE_INDEX, 6], [0, 2, IGNORE_INDEX]])
    kept = [(b, t) for b in range(2) for t in range(3) if targets[b, t] != IGNORE_INDEX]
    expected = sum(
        -torch.log_softmax(logits[b, t].double(), -1)[targets[b, t]].item() for b, t in kept
    )  # fmt: skip
    total = cross_entropy_sum(logits, targets)
    assert total.dtype == torch.float32 and total.shape == ()
    assert math.isclose(total.item(), expected, rel_tol=1e-6)


def test_compile_compiles_the_loss_with_eager_numbers(monkeypatch: pytest.MonkeyPatch):
    """compile=True compiles the loss too (the CPU test uses aot_eager: the wiring, not inductor)."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    config = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, chunk_size=4, max_seq_len=16)
    module = LanguageModelModule(config, compile=True)
    eager = LanguageModelModule(config)
    eager.load_state_dict(module.state_dict())
    module.configure_model()
    assert module._cross_entropy_sum is not cross_entropy_sum
    ids = torch.randint(0, 64, (2, 16))
    targets = torch.where(torch.rand(2, 16) < 0.25, IGNORE_INDEX, ids)
    (loss, count), (expected, expected_count) = module.loss(module(ids), targets), eager.loss(eager(ids), targets)
    assert count == expected_count == (targets != IGNORE_INDEX).sum()
    torch.testing.assert_close(loss, expected)
