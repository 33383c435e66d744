import pytest
import torch

from rat_lightning.ops import gated_recurrence
from rat_lightning.ops.recurrence import gated_recurrence_step, gated_recurrence_stepwise
from tests.conftest import assert_close


def _inputs(batch, length, heads, groups, dim, dtype=torch.float64, gate_scale=1.0):
    x = torch.randn(batch, length, heads, dim, dtype=dtype, requires_grad=True)
    g = (gate_scale * torch.randn(batch, length, heads, dim, dtype=dtype)).requires_grad_()
    k = torch.randn(batch, length, groups, dim, dtype=dtype, requires_grad=True)
    bias = torch.randn(heads, dim, dtype=dtype, requires_grad=True)
    return x, g, k, bias


@pytest.mark.parametrize("length", [1, 5, 16, 37, 130])
@pytest.mark.parametrize("chunk_size", [None, 1, 3, 16])
@pytest.mark.parametrize("groups", [1, 2])
def test_chunked_equals_stepwise_outputs_and_grads(length, chunk_size, groups):
    x, g, k, bias = _inputs(2, length, 4, groups, 6)
    fast = gated_recurrence(x, g, k, gate_bias=bias, chunk_size=chunk_size)
    slow = gated_recurrence_stepwise(x, g, k, bias, chunk_size)
    upstream = [torch.randn_like(s) for s in fast]
    grads_fast = torch.autograd.grad(sum((s * u).sum() for s, u in zip(fast, upstream)), (x, g, k, bias))
    grads_slow = torch.autograd.grad(sum((s * u).sum() for s, u in zip(slow, upstream)), (x, g, k, bias))
    for name, a, b in zip(("sx", "sk"), fast, slow):
        assert_close(a, b, 1e-12, name)
    for name, a, b in zip(("dx", "dg", "dk", "dbias"), grads_fast, grads_slow):
        assert_close(a, b, 1e-12, name)


def test_matches_closed_form_within_chunks():
    # s_t = sum_{j in chunk, j <= t} (prod_{i=j+1..t} a_i) (1 - a_j) x_j, written out directly.
    x, g, _, _ = _inputs(1, 11, 2, 1, 3)
    chunk = 4
    sx, _ = gated_recurrence(x, g, chunk_size=chunk)
    a = torch.sigmoid(g.detach())
    for t in range(11):
        start = t - t % chunk
        expected = sum(
            torch.prod(a[:, j + 1 : t + 1], dim=1) * (1 - a[:, j]) * x.detach()[:, j] for j in range(start, t + 1)
        )
        assert_close(sx[:, t].detach(), expected, 1e-12, f"t={t}")


def test_initial_state_continues_a_split_sequence():
    x, g, k, bias = _inputs(2, 50, 4, 2, 6)
    whole = gated_recurrence(x, g, k, gate_bias=bias)
    first = gated_recurrence(x[:, :23], g[:, :23], k[:, :23], gate_bias=bias)
    second = gated_recurrence(
        x[:, 23:], g[:, 23:], k[:, 23:], gate_bias=bias, initial_state=(first[0][:, -1], first[1][:, -1])
    )
    for a, b, c in zip(whole, first, second):
        assert_close(a, torch.cat([b, c], dim=1), 1e-12)


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_step_equals_parallel(chunk_size):
    x, g, k, bias = _inputs(3, 13, 4, 2, 6)
    sx, sk = gated_recurrence(x, g, k, gate_bias=bias, chunk_size=chunk_size)
    state = None
    for t in range(13):
        if chunk_size and t % chunk_size == 0:
            state = None
        state = gated_recurrence_step(x[:, t], g[:, t], state, k[:, t], bias)
        assert_close(state[0], sx[:, t], 1e-12, f"sx t={t}")
        assert_close(state[1], sk[:, t], 1e-12, f"sk t={t}")


@pytest.mark.parametrize("gate_logit", [-9.21, 9.21])
def test_extreme_gates_fp32_against_fp64(gate_logit):
    # Gates near 1e-4 and 0.9999 (PITFALLS 2): no NaN, fp32 close to the fp64 truth.
    x, g, k, _ = _inputs(2, 200, 2, 1, 4)
    g = torch.full_like(g, gate_logit) + 0.01 * torch.randn_like(g)
    truth = gated_recurrence(x.detach(), g.detach(), k.detach())
    low = gated_recurrence(x.detach().float(), g.detach().float(), k.detach().float())
    for a, b in zip(low, truth):
        assert low[0].dtype == torch.float32
        assert_close(a, b, 1e-5)


@pytest.mark.parametrize("chunk_size", [None, 8])
def test_no_future_leak(chunk_size):
    x, g, k, bias = _inputs(1, 40, 2, 1, 4)
    base = gated_recurrence(x, g, k, gate_bias=bias, chunk_size=chunk_size)
    x2, g2, k2 = x.detach().clone(), g.detach().clone(), k.detach().clone()
    x2[:, 25:] += 5.0
    g2[:, 25:] -= 3.0
    k2[:, 25:] *= -2.0
    changed = gated_recurrence(x2, g2, k2, gate_bias=bias, chunk_size=chunk_size)
    for a, b in zip(base, changed):
        assert torch.equal(a[:, :25], b[:, :25])
        assert not torch.equal(a[:, 25:], b[:, 25:])


def test_bf16_inputs_return_bf16_with_fp32_accuracy():
    x, g, k, bias = (t.detach() for t in _inputs(2, 64, 4, 2, 8))
    out = gated_recurrence(x.bfloat16(), g.bfloat16(), k.bfloat16(), gate_bias=bias.float(), chunk_size=16)
    truth = gated_recurrence(x.bfloat16().double(), g.bfloat16().double(), k.bfloat16().double(),
                             gate_bias=bias.double(), chunk_size=16)
    assert out[0].dtype == torch.bfloat16
    for a, b in zip(out, truth):
        assert_close(a, b, 1e-2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"x": torch.zeros(2, 3, 4)}, "x must be"),
        ({"g": torch.zeros(2, 3, 4, 5)}, "g must have"),
        ({"k": torch.zeros(2, 3, 3, 6)}, "heads % groups"),
        ({"gate_bias": torch.zeros(3, 6)}, "gate_bias must be"),
        ({"chunk_size": 0}, "chunk_size must be"),
        ({"backend": "cuda"}, "backend must be one of"),
        ({"chunk_size": 4, "initial_state": (torch.zeros(2, 4, 6), None)}, "initial_state is only"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    args = {"x": torch.zeros(2, 3, 4, 6), "g": torch.zeros(2, 3, 4, 6)}
    args.update(kwargs)
    x, g = args.pop("x"), args.pop("g")
    with pytest.raises(ValueError, match=message):
        gated_recurrence(x, g, **args)
