import pytest
import torch

from rat_lightning.ops import apply_rope, chunk_attention
from rat_lightning.ops.chunk_attention import chunk_attention_step, rotate_summary
from tests.conftest import assert_close


def _naive(q, k, v, chunk_size):
    """One query at a time: keys = previous chunk ends (chunk RoPE) + own state."""
    batch, length, heads, dim = q.shape
    out = torch.zeros_like(q)
    for t in range(length):
        c = t // chunk_size
        ends = [j * chunk_size + chunk_size - 1 for j in range(c)]
        q_rot = apply_rope(q[:, t : t + 1], torch.tensor([c]))[:, 0]
        keys = [apply_rope(k[:, e : e + 1], torch.tensor([j]))[:, 0] for j, e in enumerate(ends)]
        keys.append(apply_rope(k[:, t : t + 1], torch.tensor([c]))[:, 0])
        values = [v[:, e] for e in ends] + [v[:, t]]
        scores = torch.stack([(q_rot * key).sum(-1) for key in keys], dim=-1) * dim**-0.5
        probs = scores.softmax(-1)
        out[:, t] = sum(probs[..., i : i + 1] * values[i] for i in range(len(values)))
    return out


@pytest.mark.parametrize("length, chunk_size", [(1, 4), (7, 3), (16, 4), (37, 5), (20, 32)])
def test_reference_equals_naive_per_query_loop(length, chunk_size):
    q, k, v = (torch.randn(2, length, 3, 8, dtype=torch.float64) for _ in range(3))
    assert_close(chunk_attention(q, k, v, chunk_size), _naive(q, k, v, chunk_size), 1e-12)


def test_gradients_against_finite_differences():
    q, k, v = (torch.randn(1, 9, 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda a, b, c: chunk_attention(a, b, c, 3), (q, k, v))


def test_step_equals_parallel():
    length, chunk_size = 23, 4
    q, k, v = (torch.randn(2, length, 3, 8, dtype=torch.float64) for _ in range(3))
    full = chunk_attention(q, k, v, chunk_size)
    for t in range(length):
        c = t // chunk_size
        ends = torch.arange(c) * chunk_size + chunk_size - 1
        # The step takes summaries as the caches store them: keys RoPE'd at their chunk index.
        out = chunk_attention_step(q[:, t], k[:, t], v[:, t], rotate_summary(k[:, ends], 0), v[:, ends])
        assert_close(out, full[:, t], 1e-12, f"t={t}")


def test_query_groups_and_gate():
    """G query groups equal their heads' repeated queries; the gate multiplies by its sigmoid."""
    q = torch.randn(2, 11, 2, 8, dtype=torch.float64)
    k, v, gate = (torch.randn(2, 11, 6, 8, dtype=torch.float64) for _ in range(3))
    plain = chunk_attention(q.repeat_interleave(3, dim=2), k, v, 4)
    assert_close(chunk_attention(q, k, v, 4), plain, 1e-15)
    assert_close(chunk_attention(q, k, v, 4, gate=gate), torch.sigmoid(gate) * plain, 1e-15)
    leaves = [t[:1, :9, :, :4].clone().requires_grad_() for t in (q, k, v, gate)]
    assert torch.autograd.gradcheck(lambda a, b, c, d: chunk_attention(a, b, c, 3, gate=d), leaves)


def test_bad_shapes_are_named():
    q = torch.zeros(1, 4, 2, 8)
    with pytest.raises(ValueError, match="q must be .* heads % groups"):
        chunk_attention(q, q[:, :3], q, 2)
    with pytest.raises(ValueError, match="heads % groups == 0"):
        chunk_attention(torch.zeros(1, 4, 3, 8), q, q, 2)
    with pytest.raises(ValueError, match="gate must have the shape of k"):
        chunk_attention(q, q, q, 2, gate=q[..., :4])
    with pytest.raises(ValueError, match="chunk_size must be"):
        chunk_attention(q, q, q, 0)
