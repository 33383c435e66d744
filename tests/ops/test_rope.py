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

    def dot(i, j):
        return (apply_rope(q[None], torch.tensor([i])) * apply_rope(k[None], torch.tensor([j]))).sum()

    assert torch.allclose(dot(7, 4), dot(103, 100), atol=1e-10)


def test_compiled_rope_builds_the_table_in_one_opaque_op():
    """Under torch.compile the angle table is one custom op (no graph break, eager's numbers):
    traced, inductor evaluated fp64 cos/sin once per element of q and k."""
    import torch

    from rat_lightning.ops.rope import apply_rope

    x, positions = torch.randn(2, 7, 3, 8), torch.arange(7)
    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module

    compiled = torch.compile(apply_rope, backend=backend, fullgraph=True)(x, positions)
    assert torch.equal(compiled, apply_rope(x, positions))
    ops = [str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert any("rope_angles" in op for op in ops) and not any("cos" in op and "rope" not in op for op in ops), ops
