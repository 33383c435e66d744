"""Triton decoding step of the gated recurrence against the reference ``gated_recurrence_step``.

Without a GPU the kernel runs under the Triton interpreter on CPU tensors (see tests/conftest.py):
a few rows per test, so the grid holds one to three programs of 16 rows.
"""

from __future__ import annotations

import pytest
import torch

from rat_lightning.ops.recurrence import gated_recurrence, gated_recurrence_step, gated_recurrence_step_reference
from tests.conftest import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32 states and arithmetic on both sides; the gates differ in the last bit (exp(-|g|) against
# torch.sigmoid), and 16-bit inputs are read as they are, so fp32 tolerance holds for every dtype.
RTOL = 1e-6

# Fresh float buffers are NaN-filled (tests/ops/conftest.py): an unwritten output fails.
pytestmark = pytest.mark.usefixtures("nan_empty")


def _inputs(batch, heads, groups, dim, dtype):
    x, g = (torch.randn(batch, heads, dim, device=DEVICE).to(dtype) for _ in range(2))
    k = torch.randn(batch, groups, dim, device=DEVICE).to(dtype)
    bias = torch.randn(heads, dim, device=DEVICE)
    state = tuple(torch.randn(batch, heads, dim, device=DEVICE) for _ in range(2))
    return 3 * x, 3 * g, k, bias, state


def _check(actual, expected, name=""):
    for a, e, part in zip(actual, expected, ("sx", "sk")):
        if e is None:
            assert a is None, f"{name} {part}: expected None"
            continue
        assert a.dtype == torch.float32 and a.shape == e.shape and a.is_contiguous()
        assert_close(a, e, RTOL, f"{name} {part}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("batch, heads, groups, dim", [(1, 2, 1, 16), (3, 4, 2, 16), (5, 4, 4, 12)])
@pytest.mark.parametrize("restart", [False, True], ids=["carry", "restart"])
def test_kernel_matches_reference(batch, heads, groups, dim, dtype, restart):
    """Rows not a multiple of the 16-row block (3 x 4 = 12, 5 x 4 = 20), P not a power of two (12),
    G = 1, G < H and G = H, with and without a previous state."""
    x, g, k, bias, state = _inputs(batch, heads, groups, dim, dtype)
    state = None if restart else state
    actual = gated_recurrence_step(x, g, state, k, bias, backend="triton")
    _check(actual, gated_recurrence_step_reference(x, g, state, k, bias), f"{dtype} restart={restart}")


@pytest.mark.parametrize("with_bias", [False, True])
def test_without_keys_as_the_rnn_calls_it(with_bias):
    x, g, _, bias, (sx, _) = _inputs(3, 4, 1, 16, torch.bfloat16)
    bias = bias if with_bias else None
    actual = gated_recurrence_step(x, g, (sx, None), None, bias, backend="triton")
    _check(actual, gated_recurrence_step_reference(x, g, (sx, None), None, bias))


def test_strided_views_of_a_fused_projection():
    """x, g, k sliced from one packed (B, .) projection and states sliced from longer buffers:
    read in place."""
    batch, heads, groups, dim = 3, 4, 2, 16
    packed = torch.randn(batch, (2 * heads + groups) * dim + 5, device=DEVICE).bfloat16()
    x = packed[:, : heads * dim].unflatten(-1, (heads, dim))
    g = packed[:, heads * dim : 2 * heads * dim].unflatten(-1, (heads, dim))
    k = packed[:, 2 * heads * dim : (2 * heads + groups) * dim].unflatten(-1, (groups, dim))
    states = torch.randn(batch, 5, heads, dim, device=DEVICE)
    state = (states[:, 1], states[:, 3])
    assert not any(t.is_contiguous() for t in (x, g, k, *state))
    actual = gated_recurrence_step(x, g, state, k, backend="triton")
    _check(actual, gated_recurrence_step_reference(x, g, state, k))


def test_extreme_gates_keep_full_precision():
    """a near 1 and near 0 (PITFALLS 2): 1 - a computed without a subtraction."""
    x, g, k, bias, state = _inputs(2, 2, 1, 16, torch.float32)
    for logit in (-17.0, 17.0):
        g = torch.full_like(g, logit)
        actual = gated_recurrence_step(x, g, state, k, backend="triton")
        expected = gated_recurrence_step_reference(*(t.double() for t in (x, g)), tuple(s.double() for s in state),
                                                   k.double())  # fmt: skip
        _check(actual, tuple(e.float() for e in expected), f"logit {logit}")


def test_steps_equal_the_parallel_kernel():
    """Token by token from a chunk start, the step kernel follows the parallel recurrence."""
    batch, length, heads, groups, dim = 2, 7, 4, 2, 16
    x, g = (torch.randn(batch, length, heads, dim, device=DEVICE) for _ in range(2))
    k = torch.randn(batch, length, groups, dim, device=DEVICE)
    bias = torch.randn(heads, dim, device=DEVICE)
    sx, sk = gated_recurrence(x, g, k, gate_bias=bias, chunk_size=4, backend="triton")
    state = None
    for t in range(length):
        state = gated_recurrence_step(x[:, t], g[:, t], None if t % 4 == 0 else state, k[:, t], bias, backend="triton")
        _check(state, (sx[:, t], sk[:, t]), f"t={t}")


def test_auto_sends_calls_that_need_gradients_to_the_reference():
    x, g, k, bias, state = _inputs(2, 2, 1, 16, torch.float32)
    x.requires_grad_()
    sx, sk = gated_recurrence_step(x, g, state, k, bias)
    (sx.sum() + sk.sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match="forward-only"):
        gated_recurrence_step(x, g, state, k, bias, backend="triton")


def test_bad_shapes_name_the_argument():
    x, g, k, bias, state = _inputs(2, 4, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="k must be"):
        gated_recurrence_step(x, g, state, torch.randn(2, 3, 16), bias)
    with pytest.raises(ValueError, match="state must be"):
        gated_recurrence_step(x, g, (state[0], None), k, bias)
    with pytest.raises(ValueError, match="gate_bias must be"):
        gated_recurrence_step(x, g, state, k, bias[:, :8])


def test_fake_tensor_shapes_and_compile():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, g, k, bias, state = _inputs(3, 4, 2, 16, torch.bfloat16)
    with FakeTensorMode() as mode:
        fakes = [mode.from_tensor(t) for t in (x, g, k, bias, *state)]
        sx, sk = torch.ops.rat_lightning.gated_recurrence_step(*fakes[:4], *fakes[4:])
        assert sx.shape == sk.shape == (3, 4, 16) and sx.dtype == torch.float32

    def step(x, g, state, k, bias):
        return gated_recurrence_step(x, g, state, k, bias, backend="triton")

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    _check(compiled(x, g, state, k, bias), step(x, g, state, k, bias), "compiled")


def test_a_differentiable_call_of_the_op_fails_at_backward():
    """The custom op itself has no gradient: a backward through it raises instead of returning none."""
    from rat_lightning.ops.recurrence.step import recurrence_step

    x, g, k, bias, state = _inputs(2, 2, 1, 16, torch.float32)
    x.requires_grad_()
    sx, _ = recurrence_step(x, g, k, bias, *state)
    with pytest.raises(RuntimeError, match="forward-only; call gated_recurrence_step"):
        sx.sum().backward()
