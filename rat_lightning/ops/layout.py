"""Memory layout the Triton kernels read in place."""

from __future__ import annotations

import torch


def rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` ``(B, T, N, P)`` with its last two dims contiguous, batch and time strides free (so a
    slice of a fused projection is used in place); a contiguous copy only where its rows are not."""
    if t.stride(-1) != 1 or (t.shape[-2] > 1 and t.stride(-2) != t.shape[-1]):
        return t.contiguous()
    return t


def check_output(name: str, out: torch.Tensor, like: torch.Tensor) -> None:
    """Raise ValueError unless ``out`` can take a kernel's gradient of ``like`` in place: the same
    shape and dtype, its last two dims contiguous."""
    if out.shape != like.shape or out.dtype != like.dtype or rows_contiguous(out) is not out:
        raise ValueError(
            f"{name} must be {tuple(like.shape)} {like.dtype} with its last two dims contiguous, got "
            f"{tuple(out.shape)} {out.dtype} with strides {out.stride()}"
        )
