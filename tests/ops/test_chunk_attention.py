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


def test_bad_shapes_are_named():
    q = torch.zeros(1, 4, 2, 8)
    with pytest.raises(ValueError, match="q, k, v must all be"):
        chunk_attention(q, q[:, :3], q, 2)
    with pytest.raises(ValueError, match="chunk_size must be"):
        chunk_attention(q, q, q, 0)
