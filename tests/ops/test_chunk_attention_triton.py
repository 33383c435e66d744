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


def _reference_grads(q, k, v, dy, chunk_size, rope_base=10000.0, scale=None, gate=None):
    """Output and gradients (dq, dk, dv[, dgate]) of the fp32 reference at the (possibly rounded) inputs."""
    leaves = [x.detach().float().requires_grad_() for x in (q, k, v, gate) if x is not None]
    gate = leaves[3] if gate is not None else None
    out = chunk_attention_reference(*leaves[:3], chunk_size, rope_base, scale, gate=gate)
    out.backward(dy.float())
    return out, [x.grad for x in leaves]


def _projection_slices(batch, length, groups, heads, dim, dtype):
    """q (B, T, G, P) and gate (B, T, H, P) as strided slices of one (B, T, (G + H) * P + 8) tensor,
    the layout of a fused projection, with its gradient buffer sliced the same way."""
    width = (groups + heads) * dim + 8
    projection = torch.randn(batch, length, width, device=DEVICE).to(dtype)
    grad_buffer = torch.full_like(projection, float("nan"))

    def split(t):
        return t[..., : groups * dim].unflatten(-1, (groups, dim)), t[..., groups * dim : width - 8].unflatten(
            -1, (heads, dim)
        )

    return (*split(projection), *split(grad_buffer), grad_buffer)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("chunk_size", [1, 4, 16])
@pytest.mark.parametrize("length", [1, 5, 37])
def test_kernels_match_reference(length, chunk_size, dtype):
    """Gated, one query group for two heads, q and gate read from (and dq, dgate written into)
    strided slices of a fused projection and its gradient buffer."""
    from rat_lightning.ops.chunk_attention.triton import chunk_attention_bwd, chunk_attention_fwd

    batch, dim = (2, 16) if length == 37 and chunk_size == 1 else (1, 32)
    scale = dim**-0.5
    q, gate, dq, dgate, grad_buffer = _projection_slices(batch, length, 1, 2, dim, dtype)
    k, v, dy = (torch.randn(batch, length, 2, dim, device=DEVICE).to(dtype) for _ in range(3))
    out, lse = chunk_attention_fwd(q, k, v, chunk_size, 10000.0, scale, gate)
    grads = chunk_attention_bwd(dy, q, k, v, out, lse, chunk_size, 10000.0, scale, gate, dq=dq, dgate=dgate)
    expected, expected_grads = _reference_grads(q, k, v, dy, chunk_size, gate=gate)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert grads[0] is dq and grads[3] is dgate and not grad_buffer[..., -8:].isfinite().any()
    assert_close(out, expected, RTOL[dtype], "out")
    # A row that sees only its own state has no dq or dk term from its softmax (exactly 0 in the
    # reference); the kernels get rounding noise there, since delta = rowsum(dy * y) uses the
    # stored bf16 y (as flash attention uses its bf16 O). Where most rows are such rows (T <= 2L)
    # that noise is a visible share of small gradients: 2.2e-2 seen at T = 5, L = 4; <= 7.4e-3
    # from T = 37 on. A wrong term gives errors of order 1.
    grad_rtol = 3e-2 if dtype == torch.bfloat16 and length <= 2 * chunk_size else RTOL[dtype]
    for name, grad, expected_grad in zip(("dq", "dk", "dv", "dgate"), grads, expected_grads):
        if expected_grad.abs().max() == 0:
            assert grad.float().abs().max() <= RTOL[dtype] * dy.float().abs().max(), name
        else:
            assert_close(grad, expected_grad, grad_rtol, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("length, chunk_size", [(3, 4), (8, 4), (37, 4), (37, 1)])
def test_factored_state_grads_expand_to_the_full_ones(length, chunk_size, dtype):
    """The factored backward (own-state terms as two numbers per row, summaries apart) gives the
    full backward's dk, dv once expanded, and the same dq and dgate; T < L has no summary."""
    from rat_lightning.ops.chunk_attention import triton as chunk_triton

    q, gate, *_ = _projection_slices(2, length, 1, 2, 32, dtype)
    k, v, dy = (torch.randn(2, length, 2, 32, device=DEVICE).to(dtype) for _ in range(3))
    out, lse = chunk_triton.chunk_attention_fwd(q, k, v, chunk_size, 10000.0, 32**-0.5, gate)
    dq, dk, dv, dgate = chunk_triton.chunk_attention_bwd(dy, q, k, v, out, lse, chunk_size, 10000.0, 32**-0.5, gate)
    dq_f, dgate_f, state_grads = chunk_triton.chunk_attention_bwd_factored(
        dy, q, k, v, out, lse, chunk_size, 10000.0, 32**-0.5, gate
    )
    assert state_grads.dk_summary.shape == (2, length // chunk_size, 2, 32)
    assert torch.equal(dq_f, dq) and torch.equal(dgate_f, dgate)
    dv_f, dk_f = state_grads.expand(chunk_size)
    # Each side rounds to the dtype once, from fp32 sums in a different order.
    assert_close(dk_f, dk, RTOL[dtype], "dk")
    assert_close(dv_f, dv, RTOL[dtype], "dv")


@pytest.mark.parametrize("length, chunk_size", [(5, 4), (37, 4)])
def test_ungated_one_query_per_head(length, chunk_size):
    """The plain op: G = H, no gate (dO = dy is read by the summary kernel directly)."""
    from rat_lightning.ops.chunk_attention.triton import chunk_attention_bwd, chunk_attention_fwd

    q, k, v, dy = (torch.randn(2, length, 2, 32, device=DEVICE) for _ in range(4))
    out, lse = chunk_attention_fwd(q, k, v, chunk_size, 10000.0, 32**-0.5)
    dq, dk, dv, dgate = chunk_attention_bwd(dy, q, k, v, out, lse, chunk_size, 10000.0, 32**-0.5)
    expected, expected_grads = _reference_grads(q, k, v, dy, chunk_size)
    assert dgate is None
    assert_close(out, expected, 1e-5, "out")
    for name, grad, expected_grad in zip(("dq", "dk", "dv"), (dq, dk, dv), expected_grads):
        assert_close(grad, expected_grad, 1e-5, name)


def test_fp16_inputs():
    from rat_lightning.ops.chunk_attention.triton import chunk_attention_bwd, chunk_attention_fwd

    q, k, v, do, gate = (torch.randn(2, 37, 2, 32, device=DEVICE).half() for _ in range(5))
    out, lse = chunk_attention_fwd(q, k, v, 4, 10000.0, 32**-0.5, gate)
    grads = chunk_attention_bwd(do, q, k, v, out, lse, 4, 10000.0, 32**-0.5, gate)
    expected, expected_grads = _reference_grads(q, k, v, do, 4, gate=gate)
    # fp16 keeps 3 more mantissa bits than bf16.
    assert_close(out, expected, 2e-3, "out")
    for name, grad, expected_grad in zip(("dq", "dk", "dv", "dgate"), grads, expected_grads):
        assert_close(grad, expected_grad, 2e-3, name)


def test_large_scores_and_two_summary_tiles_per_program():
    """Scores of tens (online softmax rescaling), 4 summary tiles before the causal one, P = 24 (padded)."""
    from rat_lightning.ops.chunk_attention.triton import chunk_attention_bwd, chunk_attention_fwd

    q, k, v, do = (torch.randn(1, 48, 1, 24, device=DEVICE) for _ in range(4))
    q = 6 * q
    out, lse = chunk_attention_fwd(q, k, v, 1, 10000.0, 0.3)
    grads = chunk_attention_bwd(do, q, k, v, out, lse, 1, 10000.0, 0.3)[:3]
    expected, expected_grads = _reference_grads(q, k, v, do, 1, scale=0.3)
    assert_close(out, expected, 1e-5, "out")
    for name, grad, expected_grad in zip(("dq", "dk", "dv"), grads, expected_grads):
        assert_close(grad, expected_grad, 1e-5, name)


def test_dispatcher_autograd_mixed_dtypes():
    """backend="triton" through the custom op: bf16 q (one group for two heads) with fp32 states and
    gate, non-default base and scale."""
    q = torch.randn(2, 21, 1, 32, device=DEVICE).to(torch.bfloat16).requires_grad_()
    k, v, gate = (torch.randn(2, 21, 2, 32, device=DEVICE).requires_grad_() for _ in range(3))
    do = torch.randn(2, 21, 2, 32, device=DEVICE).to(torch.bfloat16)
    out = chunk_attention(q, k, v, 4, rope_base=500.0, scale=0.2, gate=gate, backend="triton")
    out.backward(do)
    expected, expected_grads = _reference_grads(q, k, v, do, 4, rope_base=500.0, scale=0.2, gate=gate)
    # The states arrive in fp32 and the kernel runs in fp32 (promoted), the output is rounded to bf16.
    assert out.dtype == torch.bfloat16 and q.grad.dtype == torch.bfloat16 and k.grad.dtype == torch.float32
    assert_close(out, expected, 1e-2, "out")
    for name, leaf, expected_grad in zip(("dq", "dk", "dv", "dgate"), (q, k, v, gate), expected_grads):
        assert_close(leaf.grad, expected_grad, 1e-2 if leaf.dtype == torch.bfloat16 else 1e-5, name)


def test_compiled_equals_eager():
    """torch.compile sees one opaque custom op (fullgraph: no graph break) and gives eager's numbers."""

    def loss(q, k, v, gate):
        return chunk_attention(q, k, v, 4, gate=gate, backend="triton").square().sum()

    q = torch.randn(1, 9, 1, 32, device=DEVICE, requires_grad=True)
    k, v, gate = (torch.randn(1, 9, 2, 32, device=DEVICE, requires_grad=True) for _ in range(3))
    leaves = (q, k, v, gate)
    eager = torch.autograd.grad(loss(*leaves), leaves)
    compiled = torch.autograd.grad(torch.compile(loss, backend="aot_eager", fullgraph=True)(*leaves), leaves)
    for name, actual, expected in zip(("dq", "dk", "dv", "dgate"), compiled, eager):
        assert_close(actual, expected, 0.0, name)


def test_custom_op_fake_and_registration():
    """Fake implementations give the real shapes and dtypes; opcheck tests schema, fake, autograd."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from rat_lightning.ops.chunk_attention import triton as chunk_triton

    with FakeTensorMode():
        q = torch.empty(2, 7, 1, 32, dtype=torch.bfloat16, device=DEVICE)
        k = torch.empty(2, 7, 3, 32, dtype=torch.bfloat16, device=DEVICE)
        out, lse = torch.ops.rat_lightning.chunk_attention_fwd(q, k, k, k, 4, 10000.0, 0.2)
        dq, dk, dv, dgate = torch.ops.rat_lightning.chunk_attention_bwd(out, q, k, k, out, lse, k, 4, 10000.0, 0.2)
    assert out.shape == k.shape and out.dtype == torch.bfloat16
    assert lse.shape == (2, 3, 7) and lse.dtype == torch.float32
    assert dq.shape == q.shape and all(g.shape == k.shape and g.dtype == k.dtype for g in (dk, dv, dgate))
    q, k, v, gate = (torch.randn(1, 6, 1, 32, device=DEVICE, requires_grad=True) for _ in range(4))
    torch.library.opcheck(chunk_triton._fwd_op, (q, k, v, gate, 4, 10000.0, 0.2))
    torch.library.opcheck(chunk_triton._fwd_op, (q, k, v, None, 4, 10000.0, 0.2))


def test_dispatch_rules():
    q = torch.randn(1, 6, 2, 8, dtype=torch.float64)
    # CPU tensors under "auto" take the reference (float64 would not be a Triton dtype anyway).
    assert_close(chunk_attention(q, q, q, 2), chunk_attention_reference(q, q, q, 2), 0.0)
    with pytest.raises(ValueError, match="fp16, bf16 or fp32"):
        chunk_attention(q, q, q, 2, backend="triton")
    with pytest.raises(ValueError, match="even head_dim"):
        chunk_attention(*(torch.zeros(1, 4, 1, 7) for _ in range(3)), 2, backend="triton")
