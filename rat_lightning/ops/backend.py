"""Backend choice shared by every op's dispatcher."""

from __future__ import annotations

import torch

BACKENDS = ("auto", "reference", "triton")
# Input dtypes every Triton kernel here takes (fp32 accumulation inside); fp64 stays on the reference.
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd would record a call on ``tensors`` (None skipped): the forward-only
    kernels (decode steps, dilated attention) leave such calls to the reference."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def resolve_backend(backend: str, x: torch.Tensor, available: tuple[str, ...]) -> str:
    """Return ``"triton"`` or ``"reference"`` for a tensor on ``x.device``.

    Args:
        backend: the user's choice, one of ``BACKENDS``.
        x: an input tensor (its device decides ``"auto"``).
        available: the backends this op implements besides the reference.

    Raises:
        ValueError: unknown backend, or ``"triton"`` asked where this op has no kernel.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton" and "triton" not in available:
        raise ValueError("this op has no Triton kernel yet; use backend='reference' or 'auto'")
    if backend == "auto":
        return "triton" if ("triton" in available and x.is_cuda) else "reference"
    return backend
