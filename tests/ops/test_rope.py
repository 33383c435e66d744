import torch

from rat_lightning.ops import apply_rope


def test_rotate_half_convention_and_relative_positions():
    x = torch.randn(1, 1, 1, 8, dtype=torch.float64)
    # Pair i rotates with i + P/2 by angle pos * base^(-2i/P).
    out = apply_rope(x, torch.tensor([3]))
    angle = 3 * 10000.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    x1, x2 = x[..., :4], x[..., 4:]
    expected = torch.cat([x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()], -1)
    assert torch.allclose(out, expected, atol=1e-12)
    q, k = torch.randn(2, 1, 1, 8, dtype=torch.float64)
    dot = lambda i, j: (apply_rope(q[None], torch.tensor([i])) * apply_rope(k[None], torch.tensor([j]))).sum()
    assert torch.allclose(dot(7, 4), dot(103, 100), atol=1e-10)
