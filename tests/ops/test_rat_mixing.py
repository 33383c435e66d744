"""The fused RAT mixing op: Triton (one op, one gradient buffer) against the composed reference.

Without a GPU the kernels run under the Triton interpreter on CPU tensors (tests/conftest.py):
tiny shapes, and chunk-attention tiles of 16 queries x 8 summaries, so T = 37 spans several
query tiles and, at L = 1 and 4, several summary tiles.
"""

from __future__ import annotations

import pytest
import torch

from rat_lightning.layers import RAT
from rat_lightning.ops.chunk_attention.sdpa_lse import cudnn_attention_usable
from rat_lightning.ops.rat_mixing import rat_mixing, split_projection
from tests.conftest import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HEADS, GROUPS, DIM = 4, 2, 16

# Fresh float buffers are NaN-filled (tests/ops/conftest.py): a slice of dh left unwritten fails.
pytestmark = pytest.mark.usefixtures("nan_empty")


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    from rat_lightning.ops.chunk_attention import triton as chunk_triton

    small = chunk_triton.KernelConfig(16, 16 if torch.cuda.is_available() else 8, 4, 1)
    monkeypatch.setattr(chunk_triton, "CONFIGS", {name: small for name in chunk_triton.CONFIGS})


def _leaves(batch, length, dtype):
    h = torch.randn(batch, length, (3 * HEADS + 2 * GROUPS) * DIM, device=DEVICE).to(dtype).requires_grad_()
    bias = (torch.randn(HEADS, DIM, device=DEVICE) + 1.0).requires_grad_()
    return h, bias


def _run(h, bias, chunk_size, backend, dy):
    y, sx, sk = rat_mixing(h, bias, HEADS, GROUPS, chunk_size, backend=backend)
    dh, dbias = torch.autograd.grad(y, (h, bias), dy)
    return y, sx, sk, dh, dbias


def _skip_unusable(backend: str, dtype: torch.dtype) -> None:
    probe = torch.empty(0, dtype=dtype, device=DEVICE)
    if backend == "cudnn" and DEVICE == "cuda" and not cudnn_attention_usable(probe, DIM):
        pytest.skip("cuDNN's fused attention cannot take this dtype on this GPU")


@pytest.mark.parametrize("backend", ["triton", "cudnn"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("length, chunk_size", [(37, 4), (37, 16), (20, 1), (16, 16), (9, 16), (32, 4)])
def test_triton_matches_reference(length, chunk_size, dtype, backend):
    """Both paths of the chunk attention (Triton kernels; around cuDNN, whose place a PyTorch
    stand-in takes on CPU) against the reference: T not a multiple of L, T = L, T < L, L = 1."""
    _skip_unusable(backend, dtype)
    h, bias = _leaves(2, length, dtype)
    dy = torch.randn(2, length, HEADS * DIM, device=DEVICE).to(dtype)
    actual = _run(h, bias, chunk_size, backend, dy)
    # The reference in fp32 at the same (rounded) inputs.
    expected = _run(h.detach().float().requires_grad_(), bias, chunk_size, "reference", dy.float())
    rtol = 1e-5 if dtype == torch.float32 else 1e-2
    assert actual[0].dtype == dtype and actual[3].dtype == dtype and actual[4].dtype == torch.float32
    for name, a, e in zip(("y", "sx", "sk", "dh", "dgate_bias"), actual, expected):
        assert_close(a, e, rtol, name)
    # Every slice of the packed gradient was written and matches: z, x, g, q, k.
    slices = zip("zxgqk", split_projection(actual[3], HEADS, GROUPS), split_projection(expected[3], HEADS, GROUPS))
    for name, a, e in slices:
        if length <= chunk_size and name in "qk":
            # One chunk: each softmax holds only the own state, so dq and dk vanish but for rounding.
            assert (a.double() - e.double()).norm() <= rtol * expected[3].double().norm(), f"d{name}"
        else:
            assert_close(a, e, rtol, f"d{name}")


def test_auto_takes_cudnn_from_its_threshold_on(monkeypatch: pytest.MonkeyPatch):
    """"auto" runs the chunk attention around cuDNN from CUDNN_MIN_CHUNKS chunks on, where cuDNN can
    take h, and never under deterministic algorithms (cuDNN's dq sums vary in order)."""
    import rat_lightning.ops.rat_mixing as mixing

    monkeypatch.setattr(mixing, "cudnn_attention_usable", lambda h, head_dim: True)
    chunk_size = 16
    at, below = (torch.empty(1, n * chunk_size - 3, 0) for n in (mixing.CUDNN_MIN_CHUNKS, mixing.CUDNN_MIN_CHUNKS - 1))
    assert mixing.attention_path(at, DIM, chunk_size, "auto") == "cudnn"
    assert mixing.attention_path(below, DIM, chunk_size, "auto") == "triton"
    assert mixing.attention_path(at, DIM, chunk_size, "triton") == "triton"
    assert mixing.attention_path(below, DIM, chunk_size, "cudnn") == "cudnn"
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert mixing.attention_path(at, DIM, chunk_size, "auto") == "triton"
    monkeypatch.setattr(mixing, "cudnn_attention_usable", lambda h, head_dim: False)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: False)
    assert mixing.attention_path(at, DIM, chunk_size, "auto") == "triton"


def test_cudnn_refuses_what_it_cannot_take():
    from rat_lightning.ops.chunk_attention.sdpa_lse import cudnn_attention_usable

    assert not cudnn_attention_usable(torch.empty(0, dtype=torch.bfloat16), 128)  # on CPU
    if DEVICE == "cuda" and torch.cuda.get_device_capability()[0] >= 9 and torch.backends.cuda.cudnn_sdp_enabled():
        # The probe (a tiny call checked against the PyTorch stand-in) passes where the path is meant to run.
        assert cudnn_attention_usable(torch.empty(0, dtype=torch.bfloat16, device=DEVICE), 128)
    if DEVICE == "cuda":
        assert not cudnn_attention_usable(torch.empty(0, device=DEVICE), 128)  # fp32
        h, bias = _leaves(1, 8, torch.float32)
        with pytest.raises(ValueError, match="backend='cudnn' needs fp16 / bf16"):
            rat_mixing(h, bias, HEADS, GROUPS, 4, backend="cudnn")


def test_states_carry_no_gradient():
    h, bias = _leaves(1, 9, torch.float32)
    for backend in ("reference", "triton"):
        _, sx, sk = rat_mixing(h, bias, HEADS, GROUPS, 4, backend=backend)
        assert not sx.requires_grad and not sk.requires_grad, backend


def test_layer_triton_equals_reference():
    """The RAT layer through the fused op: outputs and every parameter's gradient."""
    torch.manual_seed(0)
    layers = [RAT(HEADS * DIM, HEADS, GROUPS, chunk_size=4, backend=b).to(DEVICE) for b in ("triton", "reference")]
    layers[1].load_state_dict(layers[0].state_dict())
    x = torch.randn(2, 21, HEADS * DIM, device=DEVICE)
    outs = [layer(x) for layer in layers]
    assert_close(outs[0], outs[1], 1e-5, "out")
    for out in outs:
        out.square().sum().backward()
    for (name, a), b in zip(layers[0].named_parameters(), layers[1].parameters()):
        assert_close(a.grad, b.grad, 1e-5, name)


@pytest.mark.parametrize("backend", ["triton", "cudnn"])
def test_compiled_equals_eager(backend):
    """torch.compile sees one opaque op (fullgraph: no graph break) with eager's numbers."""
    dtype = torch.float32 if DEVICE == "cpu" else torch.bfloat16
    _skip_unusable(backend, dtype)

    def loss(h, bias):
        return rat_mixing(h, bias, HEADS, GROUPS, 4, backend=backend)[0].float().square().sum()

    h, bias = _leaves(1, 9, dtype)
    eager = torch.autograd.grad(loss(h, bias), (h, bias))
    compiled = torch.autograd.grad(torch.compile(loss, backend="aot_eager", fullgraph=True)(h, bias), (h, bias))
    # cuDNN's backward sums dq in an order that varies from run to run: equal up to bf16 rounding.
    rtol = 1e-2 if backend == "cudnn" and DEVICE == "cuda" else 0.0
    for name, a, e in zip(("dh", "dgate_bias"), compiled, eager):
        assert_close(a, e, rtol, name)


@pytest.mark.parametrize("attention", ["triton", "cudnn"])
def test_custom_op_registration(attention):
    from rat_lightning.ops.rat_mixing import triton as mixing_triton

    dtype = torch.float32 if DEVICE == "cpu" else torch.bfloat16
    _skip_unusable(attention, dtype)
    h, bias = _leaves(1, 6, dtype)
    torch.library.opcheck(mixing_triton.rat_mixing_fwd, (h, bias, HEADS, GROUPS, 4, 10000.0, attention))


def test_bad_inputs_are_named():
    h, bias = _leaves(1, 4, torch.float32)
    with pytest.raises(ValueError, match=r"h must be \(batch, seq, \(3 \* heads \+ 2 \* groups\) \* head_dim\)"):
        rat_mixing(h[..., :-1], bias, HEADS, GROUPS, 4)
    with pytest.raises(ValueError, match="gate_bias must be"):
        rat_mixing(h, bias[:, :8], HEADS, GROUPS, 4)
    with pytest.raises(ValueError, match="divisible by groups"):
        rat_mixing(h, bias, HEADS, 3, 4)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        rat_mixing(h, bias, HEADS, GROUPS, 0)
    with pytest.raises(ValueError, match="fp16, bf16 or fp32"):
        rat_mixing(h.double(), bias, HEADS, GROUPS, 4, backend="triton")
