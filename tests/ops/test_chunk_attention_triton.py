"""Triton chunk attention against the reference (chain of trust: per-query loop -> reference -> Triton).

Without a GPU the kernels run under the Triton interpreter on CPU tensors (see tests/conftest.py), so
shapes are tiny. Every kernel gets tiles of 16 queries and 8 summaries here (``small_tiles``), so
T = 37 spans several query tiles (the last one partial) and, at L = 1, several summary tiles on
both sides of the causal boundary (the unmasked and the masked loop of every kernel).
"""

from __future__ import annotations

import pytest
import torch

from rat_lightning.ops import chunk_attention
from rat_lightning.ops.chunk_attention.reference import chunk_attention_reference
from tests.conftest import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32: the kernels use IEEE fp32 dots (no tf32), so only summation order differs (~1e-7 seen).
# bf16: rotated q and k, the probabilities and dS are rounded to bf16 for the tensor-core dots
# and the results are stored in bf16; up to 2.5e-3 (out) and 4.5e-3 (grads) seen against the
# fp32 reference, as much as a torch emulation of the same roundings gives.
RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}

# Fresh float buffers are NaN-filled (tests/ops/conftest.py): an unwritten output fails.
pytestmark = pytest.mark.usefixtures("nan_empty")


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiles of 16 queries and 8 summaries (16 on a GPU, where tl.dot needs 16) for every kernel."""
    from rat_lightning.ops.chunk_attention import triton as chunk_triton

    small = chunk_triton.KernelConfig(16, 16 if torch.cuda.is_available() else 8, 4, 1)
    monkeypatch.setattr(chunk_triton, "CONFIGS", {name: small for name in chunk_triton.CONFIGS})


def _reference_grads(q, k, v, do, chunk_size, rope_base=10000.0, scale=None):
    """Output and (dq, dk, dv) of the fp32 reference at the (possibly bf16-rounded) inputs."""
    leaves = [x.detach().float().requires_grad_() for x in (q, k, v)]
    out = chunk_attention_reference(*leaves, chunk_size, rope_base, scale)
    out.backward(do.float())
    return out, [x.grad for x in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("chunk_size", [1, 4, 16])
@pytest.mark.parametrize("length", [1, 5, 37])
def test_kernels_match_reference(length, chunk_size, dtype):
    from rat_lightning.ops.chunk_attention.triton import chunk_attention_bwd, chunk_attention_fwd

    batch, dim = (2, 16) if length == 37 and chunk_size == 1 else (1, 32)
    scale = dim**-0.5
    q, k, v, do = (torch.randn(batch, length, 2, dim, device=DEVICE).to(dtype) for _ in range(4))
    out, lse = chunk_attention_fwd(q, k, v, chunk_size, 10000.0, scale)
    grads = chunk_attention_bwd(do, q, k, v, out, lse, chunk_size, 10000.0, scale)
    expected, expected_grads = _reference_grads(q, k, v, do, chunk_size)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert_close(out, expected, RTOL[dtype], "out")
    for name, grad, expected_grad in zip(("dq", "dk", "dv"), grads, expected_grads):
        assert_close(grad, expected_grad, RTOL[dtype], name)


def test_fp16_inputs():
    from rat_lightning.ops.chunk_attention.triton import chunk_attention_bwd, chunk_attention_fwd

    q, k, v, do = (torch.randn(2, 37, 2, 32, device=DEVICE).half() for _ in range(4))
    out, lse = chunk_attention_fwd(q, k, v, 4, 10000.0, 32**-0.5)
    grads = chunk_attention_bwd(do, q, k, v, out, lse, 4, 10000.0, 32**-0.5)
    expected, expected_grads = _reference_grads(q, k, v, do, 4)
    # fp16 keeps 3 more mantissa bits than bf16.
    assert_close(out, expected, 2e-3, "out")
    for name, grad, expected_grad in zip(("dq", "dk", "dv"), grads, expected_grads):
        assert_close(grad, expected_grad, 2e-3, name)


def test_large_scores_and_two_summary_tiles_per_program():
    """Scores of tens (online softmax rescaling), 4 summary tiles before the causal one, P = 24 (padded)."""
    from rat_lightning.ops.chunk_attention.triton import chunk_attention_bwd, chunk_attention_fwd

    q, k, v, do = (torch.randn(1, 48, 1, 24, device=DEVICE) for _ in range(4))
    q = 6 * q
    out, lse = chunk_attention_fwd(q, k, v, 1, 10000.0, 0.3)
    grads = chunk_attention_bwd(do, q, k, v, out, lse, 1, 10000.0, 0.3)
    expected, expected_grads = _reference_grads(q, k, v, do, 1, scale=0.3)
    assert_close(out, expected, 1e-5, "out")
    for name, grad, expected_grad in zip(("dq", "dk", "dv"), grads, expected_grads):
        assert_close(grad, expected_grad, 1e-5, name)


def test_dispatcher_autograd_mixed_dtypes():
    """backend="triton" through the custom op: bf16 q with fp32 states, non-default base and scale."""
    q = torch.randn(2, 21, 2, 32, device=DEVICE).to(torch.bfloat16).requires_grad_()
    k, v = (torch.randn(2, 21, 2, 32, device=DEVICE).requires_grad_() for _ in range(2))
    do = torch.randn(2, 21, 2, 32, device=DEVICE).to(torch.bfloat16)
    out = chunk_attention(q, k, v, 4, rope_base=500.0, scale=0.2, backend="triton")
    out.backward(do)
    expected, expected_grads = _reference_grads(q, k, v, do, 4, rope_base=500.0, scale=0.2)
    # The states arrive in fp32 and the kernel runs in fp32 (promoted), the output is rounded to bf16.
    assert out.dtype == torch.bfloat16 and q.grad.dtype == torch.bfloat16 and k.grad.dtype == torch.float32
    assert_close(out, expected, 1e-2, "out")
    for name, leaf, expected_grad in zip(("dq", "dk", "dv"), (q, k, v), expected_grads):
        assert_close(leaf.grad, expected_grad, 1e-2 if leaf.dtype == torch.bfloat16 else 1e-5, name)


def test_compiled_equals_eager():
    """torch.compile sees one opaque custom op (fullgraph: no graph break) and gives eager's numbers."""

    def loss(q, k, v):
        return chunk_attention(q, k, v, 4, backend="triton").square().sum()

    q, k, v = (torch.randn(1, 9, 2, 32, device=DEVICE, requires_grad=True) for _ in range(3))
    eager = torch.autograd.grad(loss(q, k, v), (q, k, v))
    compiled = torch.autograd.grad(torch.compile(loss, backend="aot_eager", fullgraph=True)(q, k, v), (q, k, v))
    for name, actual, expected in zip(("dq", "dk", "dv"), compiled, eager):
        assert_close(actual, expected, 0.0, name)


def test_custom_op_fake_and_registration():
    """Fake implementations give the real shapes and dtypes; opcheck tests schema, fake, autograd."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from rat_lightning.ops.chunk_attention import triton as chunk_triton

    with FakeTensorMode():
        q = torch.empty(2, 7, 3, 32, dtype=torch.bfloat16, device=DEVICE)
        out, lse = torch.ops.rat_lightning.chunk_attention_fwd(q, q, q, 4, 10000.0, 0.2)
        dq, dk, dv = torch.ops.rat_lightning.chunk_attention_bwd(out, q, q, q, out, lse, 4, 10000.0, 0.2)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    assert lse.shape == (2, 3, 7) and lse.dtype == torch.float32
    assert all(g.shape == q.shape and g.dtype == q.dtype for g in (dq, dk, dv))
    q, k, v = (torch.randn(1, 6, 1, 32, device=DEVICE, requires_grad=True) for _ in range(3))
    torch.library.opcheck(chunk_triton._fwd_op, (q, k, v, 4, 10000.0, 0.2))


def test_dispatch_rules():
    q = torch.randn(1, 6, 2, 8, dtype=torch.float64)
    # CPU tensors under "auto" take the reference (float64 would not be a Triton dtype anyway).
    assert_close(chunk_attention(q, q, q, 2), chunk_attention_reference(q, q, q, 2), 0.0)
    with pytest.raises(ValueError, match="fp16, bf16 or fp32"):
        chunk_attention(q, q, q, 2, backend="triton")
    with pytest.raises(ValueError, match="even head_dim"):
        chunk_attention(*(torch.zeros(1, 4, 1, 7) for _ in range(3)), 2, backend="triton")
