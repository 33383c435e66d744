"""Feed-forward blocks: the RAT paper's 4x GELU MLP, SwiGLU (Shazeer, 2020) as an option."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

FFNKind = Literal["gelu", "swiglu"]


class FeedForward(nn.Module):
    """Position-wise MLP without biases.

    Args:
        d_model: int, model width.
        hidden: int, inner width (4 * d_model in the paper; about 8/3 * d_model for SwiGLU).
        kind: ``"gelu"`` (W2 GELU(W1 x)) or ``"swiglu"`` (W2 (SiLU(W1 x) * W3 x)).
    """

    def __init__(self, d_model: int, hidden: int, kind: FFNKind = "gelu") -> None:
        super().__init__()
        if kind not in ("gelu", "swiglu"):
            raise ValueError(f"ffn must be 'gelu' or 'swiglu', got {kind!r}")
        self.kind = kind
        self.w_in = nn.Linear(d_model, hidden * (2 if kind == "swiglu" else 1), bias=False)
        self.w_out = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., d_model)`` -> ``(..., d_model)``."""
        h = self.w_in(x)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)
        return self.w_out(h)
