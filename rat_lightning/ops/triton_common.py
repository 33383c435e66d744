"""Triton helpers shared by the kernels: masks, bf16 emulation for the interpreter, the test of
whether the kernels run interpreted, and the raising backward of forward-only custom ops."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction


@triton.jit
def col_mask(o_col, N: tl.constexpr, BLOCK: tl.constexpr):
    """``o_col < N`` over the head dim; a constant where BLOCK == N.

    The compiler cannot tell that arange(0, N) < N always holds, and a mask that varies along
    the contiguous dim stops it from vectorising the loads and stores.
    """
    if BLOCK == N:
        return tl.full([BLOCK], 1, tl.int1)
    return o_col < N


@triton.jit
def round_bf16(b_x):
    """fp32 to the nearest bf16 value (ties to even), kept in fp32: bf16 rounding on the bits."""
    b_bits = b_x.to(tl.uint32, bitcast=True)
    b_bits = (b_bits + 0x7FFF + ((b_bits >> 16) & 1)) & 0xFFFF0000
    return b_bits.to(tl.float32, bitcast=True)


@triton.jit
def to_dot(b_x, DTYPE: tl.constexpr, EMULATE: tl.constexpr):
    """A tile as a dot operand of DTYPE; EMULATE: bf16-rounded values in fp32.

    The Triton interpreter does not support bf16 arithmetic (its tl.dot multiplies the uint16
    bit patterns) and its fp32 -> bf16 cast truncates instead of rounding to nearest, so under
    TRITON_INTERPRET bf16 operands are rounded here and the dot runs in fp32: the same operand
    values as the tensor-core path on a GPU.
    """
    if EMULATE:
        return round_bf16(b_x.to(tl.float32))
    return b_x.to(DTYPE)


@triton.jit
def to_store(b_x, DTYPE: tl.constexpr, EMULATE: tl.constexpr):
    """An fp32 tile cast for a store; EMULATE: round to nearest first where DTYPE is bf16 (the
    interpreter truncates), as a GPU rounds; fp32 stores keep every bit."""
    if EMULATE and DTYPE == tl.bfloat16:
        b_x = round_bf16(b_x)
    return b_x.to(DTYPE)


def is_interpreted() -> bool:
    """Whether the kernels run under the interpreter (TRITON_INTERPRET=1 when Triton decorated them).

    A function decorated for the interpreter is not a JITFunction; triton.knobs, the newer
    switch, is not in every supported Triton.
    """
    return not isinstance(round_bf16, JITFunction)


def check_device(x: torch.Tensor, kernel: str = "backend='triton'") -> None:
    """Raise ValueError unless ``x`` is on CUDA or the kernels run interpreted (tests on CPU).

    Args:
        x: an input of the kernel.
        kernel: how the message names what needs the GPU.
    """
    if not x.is_cuda and not is_interpreted():
        raise ValueError(
            f"{kernel} needs CUDA tensors (or TRITON_INTERPRET=1 set before triton is imported, for tests on "
            "CPU); use backend='reference' or 'auto'"
        )


def register_forward_only(op, kernel: str, dispatcher: str, setup_context=None) -> None:
    """Give the custom op ``op`` of a forward-only Triton ``kernel`` a backward that raises: a
    differentiable call then fails loudly instead of silently returning no gradients (the
    ``dispatcher`` sends such calls to the reference)."""

    def backward(ctx, *grads):
        raise RuntimeError(
            f"the Triton {kernel} is forward-only; call {dispatcher}(..., backend='auto' or 'reference') when "
            "gradients are needed"
        )

    op.register_autograd(backward, setup_context=setup_context)
