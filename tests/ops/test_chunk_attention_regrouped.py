"""The chunk attention around a library kernel (cuDNN on Hopper; on CPU, under the interpreter, its
PyTorch stand-in) against the reference, with and without the output gate: outputs, dq, dgate,
and the states' factored gradients once expanded."""

from __future__ import annotations

import pytest
import torch

from rat_lightning.ops.chunk_attention.reference import chunk_attention_reference
from rat_lightning.ops.chunk_attention.sdpa_lse import cudnn_attention_usable
from tests.conftest import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HEADS, GROUPS, DIM = 4, 2, 16

pytestmark = pytest.mark.usefixtures("nan_empty")


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
@pytest.mark.parametrize("length, chunk_size", [(37, 4), (12, 4), (3, 4), (21, 1)])
def test_regrouped_matches_reference(length, chunk_size, gated):
    from rat_lightning.ops.chunk_attention.regrouped import regrouped_attention_bwd, regrouped_attention_fwd

    dtype = torch.float32 if DEVICE == "cpu" else torch.bfloat16
    if DEVICE == "cuda" and not cudnn_attention_usable(torch.empty(0, dtype=dtype, device=DEVICE), DIM):
        pytest.skip("cuDNN's fused attention cannot take bf16 on this GPU")
    torch.manual_seed(length + chunk_size)
    q = torch.randn(2, length, GROUPS, DIM, device=DEVICE).to(dtype)
    k, v, z, dy = (torch.randn(2, length, HEADS, DIM, device=DEVICE).to(dtype) for _ in range(4))
    gate = z if gated else None
    scale = DIM**-0.5
    y, lse = regrouped_attention_fwd(q, k, v, chunk_size, 10000.0, scale, gate)
    dq, dgate, state_grads = regrouped_attention_bwd(dy, q, k, v, y, lse, chunk_size, 10000.0, scale, gate)
    dv, dk = state_grads.expand(chunk_size)

    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, z)]
    expected = chunk_attention_reference(*leaves[:3], chunk_size, 10000.0, scale, gate=leaves[3] if gated else None)
    expected.backward(dy.double())
    rtol = 1e-5 if dtype == torch.float32 else 1e-2
    assert_close(y, expected, rtol, "y")
    for name, actual, leaf in (("dq", dq, leaves[0]), ("dk", dk, leaves[1]), ("dv", dv, leaves[2])):
        if length <= chunk_size and name in ("dq", "dk"):
            # One chunk: each softmax holds only the own state, so dq and dk vanish but for rounding.
            assert actual.double().norm() <= rtol * dv.double().norm(), name
        else:
            assert_close(actual, leaf.grad, rtol, name)
    if gated:
        assert_close(dgate, leaves[3].grad, rtol, "dgate")
    else:
        assert dgate is None


def test_probe_turns_a_broken_library_away():
    """The once-per-GPU probe: the stand-in agrees with itself; a library call that raises, or whose
    log-sum-exp or gradients are off, is refused with a warning that names it."""
    from rat_lightning.ops.chunk_attention import sdpa_lse

    cpu = torch.device("cpu")
    forward, backward = sdpa_lse.attention_with_lse, sdpa_lse.attention_with_lse_backward
    assert sdpa_lse.agrees_with_stand_in(cpu, forward, backward)

    def raises(*args):
        raise RuntimeError("cuDNN Frontend error: s_q = s_kv = 1 is not supported")

    def shifted_lse(q, k, v, scale):
        o, lse = forward(q, k, v, scale)
        return o, lse + 0.5

    def halved_dv(*args):
        dq, dk, dv = backward(*args)
        return dq, dk, dv / 2

    with pytest.warns(UserWarning, match="failed a probe"):
        assert not sdpa_lse.agrees_with_stand_in(cpu, raises, backward)
    with pytest.warns(UserWarning, match="disagrees with the PyTorch stand-in in lse"):
        assert not sdpa_lse.agrees_with_stand_in(cpu, shifted_lse, backward)
    with pytest.warns(UserWarning, match="in dv"):
        assert not sdpa_lse.agrees_with_stand_in(cpu, forward, halved_dv)
