"""Triton gated recurrence against the reference (chain of trust: stepwise -> chunked -> Triton).

Without a GPU the kernels run under the Triton interpreter on CPU tensors (tests/conftest.py), so
shapes are tiny: a handful of programs per grid. Small time blocks for the full-sequence scan
make T = 33 span several blocks, a partial last block and several steps of the carry pass.
"""

from __future__ import annotations

import pytest
import torch

from rat_lightning.ops import gated_recurrence
from tests.conftest import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Fresh float buffers are NaN-filled (tests/ops/conftest.py): an unwritten output fails.
pytestmark = pytest.mark.usefixtures("nan_empty")


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Full-sequence time blocks of 8 tokens, carry pass over 2 blocks at a time."""
    from rat_lightning.ops.recurrence import triton as recurrence_triton

    monkeypatch.setattr(recurrence_triton, "FULL_SEQUENCE_BLOCK", 8)
    monkeypatch.setattr(recurrence_triton, "CARRY_BLOCKS", 2)


def _inputs(batch, length, heads, groups, dim, *, with_k=True, with_bias=True, with_state=False, gate_scale=2.0,
            gate_shift=0.0, dtype=torch.float32):  # fmt: skip
    """Leaf tensors (fp32 masters, rounded to dtype) and the list of those that get gradients."""

    def leaf(*shape, scale=1.0, shift=0.0):
        t = (scale * torch.randn(*shape) + shift).to(dtype).to(DEVICE)
        return t.requires_grad_()

    x = leaf(batch, length, heads, dim)
    g = leaf(batch, length, heads, dim, scale=gate_scale, shift=gate_shift)
    k = leaf(batch, length, groups, dim) if with_k else None
    bias = leaf(heads, dim) if with_bias else None
    state = None
    if with_state:
        state = (leaf(batch, heads, dim), leaf(batch, heads, dim) if with_k else None)
    return x, g, k, bias, state


def _named_leaves(inputs):
    x, g, k, bias, state = inputs
    sx0, sk0 = state if state is not None else (None, None)
    named = {"x": x, "g": g, "k": k, "gate_bias": bias, "sx0": sx0, "sk0": sk0}
    return {name: t for name, t in named.items() if t is not None}


def _run(inputs, chunk_size, backend, upstream=None, cast=None):
    """Outputs and the gradient of every input under random (or given) upstream gradients."""
    x, g, k, bias, state = inputs
    leaves = _named_leaves(inputs)
    if cast is not None:
        x, g, k, bias = (cast(t) if t is not None else None for t in (x, g, k, bias))
        state = tuple(cast(s) if s is not None else None for s in state) if state else None
    out = gated_recurrence(x, g, k, gate_bias=bias, chunk_size=chunk_size, initial_state=state, backend=backend)
    out = [s for s in out if s is not None]
    if upstream is None:
        upstream = [torch.randn(s.shape, device=s.device).to(s.dtype) for s in out]
    loss = sum((s * u.to(s.dtype)).sum() for s, u in zip(out, upstream))
    return out, dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values())))), upstream


def _compare(inputs, chunk_size, rtol, truth_dtype):
    """Triton against the reference run in truth_dtype on the same inputs: outputs and gradients."""
    out, grads, upstream = _run(inputs, chunk_size, "triton")
    ref_out, ref_grads, _ = _run(inputs, chunk_size, "reference", upstream, cast=lambda t: t.to(truth_dtype))
    x = inputs[0]
    for name, a, b in zip(("sx", "sk"), out, ref_out):
        assert a.dtype == x.dtype and a.shape == x.shape, name
        assert_close(a, b, rtol, name)
    for name, leaf in _named_leaves(inputs).items():
        assert grads[name].dtype == leaf.dtype and grads[name].shape == leaf.shape, name
        assert_close(grads[name], ref_grads[name], rtol, "d" + name)


SHAPES = [
    # (batch, length, heads, groups, dim)
    (2, 1, 2, 1, 16),
    (1, 7, 2, 2, 16),
    (2, 33, 4, 2, 16),
    (1, 33, 6, 1, 12),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}T{}H{}G{}P{}".format(*s))
@pytest.mark.parametrize("chunk_size", [None, 4, 16])
def test_fp32_matches_fp64_reference(shape, chunk_size, small_blocks):
    inputs = _inputs(*shape, with_state=chunk_size is None)
    _compare(inputs, chunk_size, 1e-5, torch.float64)


@pytest.mark.parametrize("length, chunk_size", [(33, 4), (32, 4), (3, 4), (4, 4)])
@pytest.mark.parametrize("regrouped", [False, True], ids=["tokens", "regrouped"])
def test_factored_state_grads_equal_dense(length, chunk_size, regrouped):
    """The backward from factored state gradients (StateGrads: the RAT mixing op's path) equals
    the backward from the same gradients expanded; T <= L runs as one full-sequence block. dO
    in the token layout or regrouped by offset in the chunk (the cuDNN path's)."""
    from rat_lightning.ops.recurrence.triton import StateGrads, recurrence_bwd, recurrence_fwd

    batch, heads, groups, dim = 2, 4, 2, 16
    x, g, k, bias, _ = (t.detach() if t is not None else None for t in _inputs(batch, length, heads, groups, dim))
    sx, sk = recurrence_fwd(x, g, k, bias, chunk_size)
    chunks = length // chunk_size
    projection = torch.randn(batch, length, (groups + 1) * dim, device=DEVICE)
    if regrouped:
        do = torch.randn(batch, heads * chunk_size, -(-length // chunk_size), dim, device=DEVICE)
    else:
        do = torch.randn(batch, length, heads, dim, device=DEVICE)
    state_grads = StateGrads(
        do, projection[..., dim:].unflatten(-1, (groups, dim)), *torch.randn(2, batch, length, heads, device=DEVICE),
        *torch.randn(2, batch, chunks, heads, dim, device=DEVICE), regrouped=regrouped,
    )  # fmt: skip
    if regrouped:
        # The regrouped row of token cL + i, head h is [h L + i, c].
        t, h = 2 * chunk_size + 1 if length > 2 * chunk_size else 0, 3
        row = do[1, h * chunk_size + t % chunk_size, t // chunk_size]
        assert torch.equal(state_grads.do_tokens(chunk_size)[1, t, h], row)
    factored = recurrence_bwd(state_grads, None, x, g, k, bias, sx, sk, chunk_size)
    dense = recurrence_bwd(*state_grads.expand(chunk_size), x, g, k, bias, sx, sk, chunk_size)
    for name, a, b in zip(("dx", "dg", "dk", "dbias"), factored, dense):
        assert_close(a, b, 1e-5, name)
    with pytest.raises(ValueError, match="restart form"):
        recurrence_bwd(state_grads, None, x, g, k, bias, sx, sk, None)


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_fp32_default_full_sequence_block(chunk_size):
    # The production time block (one block here: 33 < 64) and no initial state.
    _compare(_inputs(2, 33, 2, 1, 16), chunk_size, 1e-5, torch.float64)


@pytest.mark.parametrize("with_k, with_bias", [(False, True), (True, False), (False, False)])
@pytest.mark.parametrize("chunk_size", [None, 1, 4])
def test_optional_inputs(with_k, with_bias, chunk_size, small_blocks):
    inputs = _inputs(2, 19, 2, 1, 16, with_k=with_k, with_bias=with_bias, with_state=chunk_size is None)
    _compare(inputs, chunk_size, 1e-5, torch.float64)


@pytest.mark.parametrize("gate_shift", [-9.0, 9.0])
@pytest.mark.parametrize("chunk_size", [None, 16])
def test_extreme_gates(gate_shift, chunk_size, small_blocks):
    # a about 1e-4 and 0.9999 (PITFALLS 2): 1 - a as sigmoid(-g) keeps the input's scale exact.
    inputs = _inputs(2, 33, 2, 2, 16, gate_scale=0.3, gate_shift=gate_shift, with_state=chunk_size is None)
    _compare(inputs, chunk_size, 1e-5, torch.float64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk_size", [None, 4, 16])
def test_half_inputs_against_fp32_reference(dtype, chunk_size, small_blocks):
    # The reference runs in fp32 on the same (rounded) inputs; the kernel rounds only its outputs
    # and the saved states it reads back for the gate gradient.
    inputs = _inputs(2, 33, 4, 2, 16, dtype=dtype, with_state=chunk_size is None)
    _compare(inputs, chunk_size, 1e-2, torch.float32)


def test_strided_inputs_equal_contiguous(small_blocks):
    # x, g, k as slices of one fused projection (the RAT layer's layout): no copies, same result.
    batch, length, heads, groups, dim = 2, 21, 4, 2, 16
    fused = torch.randn(batch, length, (2 * heads + groups) * dim, device=DEVICE)
    x, g, k = fused.split([heads * dim, heads * dim, groups * dim], dim=-1)
    x, g, k = x.unflatten(-1, (heads, dim)), g.unflatten(-1, (heads, dim)), k.unflatten(-1, (groups, dim))
    for chunk_size in (None, 4):
        strided = gated_recurrence(x, g, k, chunk_size=chunk_size, backend="triton")
        dense = gated_recurrence(x.contiguous(), g.contiguous(), k.contiguous(), chunk_size=chunk_size,
                                 backend="triton")  # fmt: skip
        for a, b in zip(strided, dense):
            assert torch.equal(a, b)


@pytest.mark.parametrize("with_k, state", [(True, "no_sk"), (False, "extra_sk"), (True, "bad_shape")])
def test_bad_initial_state_is_named(with_k, state):
    x, g, k, _, _ = _inputs(2, 5, 2, 1, 16, with_k=with_k)
    good = torch.zeros(2, 2, 16, device=DEVICE)
    initial = {"no_sk": (good, None), "extra_sk": (good, good), "bad_shape": (good, good[:1])}[state]
    with pytest.raises(ValueError, match="initial_state must be"):
        gated_recurrence(x, g, k, initial_state=initial, backend="triton")


def test_fake_implementation_shapes_and_dtypes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from rat_lightning.ops.recurrence import triton as recurrence_triton

    with FakeTensorMode():
        x = torch.empty(2, 5, 4, 8, dtype=torch.bfloat16)
        k = torch.empty(2, 5, 2, 8, dtype=torch.bfloat16)
        bias = torch.empty(4, 8)
        s0 = torch.empty(2, 4, 8)
        sx, sk = torch.ops.rat_lightning.gated_recurrence_fwd(x, x, k, bias, s0, s0, None)
        assert (sx.shape, sx.dtype, sk.shape, sk.dtype) == (x.shape, x.dtype, x.shape, x.dtype)
        grads = torch.ops.rat_lightning.gated_recurrence_bwd(sx, sk, x, x, k, bias, s0, s0, sx, sk, None)
        for grad, ref in zip(grads, (x, x, k, bias, s0, s0)):
            assert (grad.shape, grad.dtype) == (ref.shape, ref.dtype)
        sx, sk = torch.ops.rat_lightning.gated_recurrence_fwd(x, x, None, None, None, None, 4)
        assert sx.shape == x.shape and sk.numel() == 0
    assert recurrence_triton.gated_recurrence_op is not None


def test_compiled_equals_eager():
    # torch.compile treats the kernels as one opaque op (PITFALLS 4) and calls them unchanged.
    x, g, k, bias, _ = _inputs(1, 9, 2, 1, 16)

    def fn(x, g, k, bias):
        sx, sk = gated_recurrence(x, g, k, gate_bias=bias, chunk_size=4, backend="triton")
        return (sx * sk).sum()

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    eager_loss = fn(x, g, k, bias)
    eager_grads = torch.autograd.grad(eager_loss, (x, g, k, bias))
    compiled_loss = compiled(x, g, k, bias)
    compiled_grads = torch.autograd.grad(compiled_loss, (x, g, k, bias))
    assert torch.equal(eager_loss, compiled_loss)
    for a, b in zip(eager_grads, compiled_grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_bf16_outputs_are_the_fp32_results_rounded_to_nearest(chunk_size, small_blocks):
    """bf16 in, bf16 out: the kernel computes in fp32 from the same values, so its outputs are the
    fp32 kernel's rounded to nearest, bit for bit, forward and backward. Under the interpreter,
    whose fp32 -> bf16 cast truncates, this holds only through the kernels' own rounding."""
    from rat_lightning.ops.recurrence.triton import recurrence_bwd, recurrence_fwd

    x, g, k, bias, _ = (t.detach() if t is not None else None for t in _inputs(2, 19, 4, 2, 16, dtype=torch.bfloat16))
    half = recurrence_fwd(x, g, k, bias, chunk_size)
    full = recurrence_fwd(x.float(), g.float(), k.float(), bias, chunk_size)
    for name, a, b in zip(("sx", "sk"), half, full):
        assert torch.equal(a, b.to(torch.bfloat16)), name
    dsx, dsk = (torch.randn_like(s) for s in half)
    # s_{t-1} is read back from the saved states: the fp32 run reads the same (bf16) values.
    states = tuple(s.float() for s in half)
    half = recurrence_bwd(dsx, dsk, x, g, k, bias, *half, chunk_size)[:3]
    full = recurrence_bwd(dsx.float(), dsk.float(), x.float(), g.float(), k.float(), bias, *states, chunk_size)[:3]
    for name, a, b in zip(("dx", "dg", "dk"), half, full):
        assert torch.equal(a, b.to(torch.bfloat16)), name
