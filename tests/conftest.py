"""Shared test helpers: seeded RNG per test and one closeness check that reports the error."""

from __future__ import annotations

import os

import pytest
import torch

# Tests never reach a hub; keep HF libraries offline even where a network exists.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Without a GPU, Triton kernels (backend="triton" tests) run under the interpreter on CPU tensors.
# Triton reads the variable when `triton.jit` decorates a function, its own `tl.sum` & co. at
# `import triton` included, and torch.compile tests import triton early: so it is set here, first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, name: str = "") -> None:
    """Relative error ``||a - e|| / ||e||`` below ``rtol``; NaN never passes."""
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    error = ((actual - expected).norm() / expected.norm().clamp(min=1e-30)).item()
    assert error <= rtol, f"{name}: relative error {error:.3e} > {rtol:.1e}"


def decode_steps(mixer: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, object]:
    """Run ``mixer.step`` over the tokens of ``x`` ``(B, T, d)`` from an empty cache; returns the
    stacked outputs ``(B, T, d)`` and the final cache. Always token by token (the base class's
    ``prefill``), never a mixer's parallel override."""
    from rat_lightning.layers.base import Mixer

    return Mixer.prefill(mixer, x, mixer.init_cache(x.shape[0], x.device))
