"""Dilated (+ window, + sink) causal attention: chain of trust mask -> reference -> Triton forward.

(a) the mask against a Python loop over the formula; (b) the masked-SDPA reference against an
fp64 softmax written out over the allowed set; (c) the Triton kernel (under the interpreter on
CPU, see tests/conftest.py) against the reference; (d) the dispatcher's choices and errors.
The kernel gets tiles of 16 queries and 8 keys here (``small_tiles``; 16 keys on a GPU, where
tl.dot needs 16), so T = 37 spans three query blocks (the last partial) and several key tiles,
with both unmasked and masked tiles in the dilated and window loops.
"""

from __future__ import annotations

import pytest
import torch

from rat_lightning.ops.dilated_attention import dilated_attention, dilated_attention_reference, dilated_mask
from rat_lightning.ops.dilated_attention.reference import dilated_mask_rows
from tests.conftest import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32: IEEE fp32 dots, only the summation order differs (~1e-7 seen). bf16: q, k, the
# probabilities and v are bf16 dot operands and the output is stored in bf16 (~2e-3 seen).
RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
# (D, W, I): dense causal, dilation only, dilation + window, all three, D > T (only the
# diagonal), W > T (dense causal through the window).
CASES = [(1, 0, 0), (4, 0, 0), (4, 3, 0), (5, 2, 3), (64, 0, 0), (3, 100, 0)]


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    from rat_lightning.ops.dilated_attention import triton as dilated_triton

    small = dilated_triton.KernelConfig(16, 16 if torch.cuda.is_available() else 8, 4, 1)
    monkeypatch.setattr(dilated_triton, "CONFIGS", {name: small for name in dilated_triton.CONFIGS})


def _loop_mask(length: int, dilation: int, window: int, sinks: int) -> torch.Tensor:
    """The formula, one (t, j) at a time."""
    mask = torch.zeros(length, length, dtype=torch.bool)
    for t in range(length):
        for j in range(length):
            mask[t, j] = j <= t and ((j + 1) % dilation == 0 or t - j <= window or j < sinks)
    return mask


MASK_CASES = [(1, 1, 0, 0), (23, 4, 0, 0), (23, 5, 2, 3), (23, 30, 0, 2), (23, 3, 40, 0), (23, 1, 0, 5)]


@pytest.mark.parametrize("length, dilation, window, sinks", MASK_CASES)
def test_mask_matches_formula(length, dilation, window, sinks):
    mask = dilated_mask(length, dilation, window, sinks)
    assert mask.dtype == torch.bool and mask.shape == (length, length)
    assert torch.equal(mask, _loop_mask(length, dilation, window, sinks))
    start = min(7, length)
    assert torch.equal(dilated_mask_rows(start, length, dilation, window, sinks), mask[start:])


def _explicit_fp64(q, k, v, mask, scale):
    """Softmax written out in fp64 over the allowed keys of each query."""
    q, k, v = q.double(), k.double(), v.double()
    scores = torch.einsum("bthp,bjhp->bhtj", q, k) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhtj,bjhp->bthp", torch.softmax(scores, dim=-1), v)


@pytest.mark.parametrize("dilation, window, sinks", CASES)
def test_reference_matches_explicit_softmax(dilation, window, sinks):
    q, k, v = (torch.randn(2, 19, 3, 8, dtype=torch.float64) for _ in range(3))
    expected = _explicit_fp64(q, k, v, _loop_mask(19, dilation, window, sinks), 0.3)
    assert_close(dilated_attention_reference(q, k, v, dilation, window, sinks, 0.3), expected, 1e-12, "fp64")
    out32 = dilated_attention_reference(q.float(), k.float(), v.float(), dilation, window, sinks, 0.3)
    assert out32.dtype == torch.float32
    assert_close(out32, expected, 1e-5, "fp32")


@pytest.mark.usefixtures("nan_empty")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("dilation, window, sinks", CASES)
def test_triton_matches_reference(dilation, window, sinks, dtype):
    from rat_lightning.ops.dilated_attention.triton import dilated_attention_fwd

    q, k, v = (torch.randn(2, 37, 2, 16, device=DEVICE).to(dtype) for _ in range(3))
    out, lse = dilated_attention_fwd(q, k, v, dilation, window, sinks, 0.25)
    # The fp32 reference at the same (rounded) inputs.
    expected = dilated_attention_reference(q.float(), k.float(), v.float(), dilation, window, sinks, 0.25)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, expected, RTOL[dtype], "out")
    if dtype == torch.float32:
        # lse: log2-domain log-sum-exp of the scores times scale * log2(e).
        scores = torch.einsum("bthp,bjhp->bhtj", q.double(), k.double()) * 0.25
        mask = dilated_mask(37, dilation, window, sinks, device=DEVICE)
        expected_lse = torch.logsumexp(scores.masked_fill(~mask, float("-inf")), dim=-1) / torch.log(
            torch.tensor(2.0, dtype=torch.float64)
        )
        assert_close(lse, expected_lse, 1e-6, "lse")


@pytest.mark.usefixtures("nan_empty")
def test_strided_inputs_large_scores_p32():
    """q, k, v as slices of one packed (B, T, 3, H, P) tensor (read in place), P = 32, scores of
    tens (online-softmax rescaling), W and I that cross tile boundaries, T = 1 and an empty batch."""
    packed = torch.randn(1, 45, 3, 2, 32, device=DEVICE)
    packed[:, :, 0] *= 4
    q, k, v = packed[:, :, 0], packed[:, :, 1], packed[:, :, 2]
    k = k.transpose(1, 2).contiguous().transpose(1, 2)  # another stride pattern: (B, H, T, P) storage
    assert not q.is_contiguous() and not k.is_contiguous() and not v.is_contiguous()
    out = dilated_attention(q, k, v, dilation=7, window=9, sinks=10, backend="triton")
    assert_close(out, dilated_attention_reference(q, k, v, 7, 9, 10), 1e-5, "strided")
    one = torch.randn(1, 1, 1, 16, device=DEVICE)
    assert_close(dilated_attention(one, one, one, dilation=3, backend="triton"), one, 1e-6, "T=1")
    empty = torch.randn(0, 5, 1, 16, device=DEVICE)
    assert dilated_attention(empty, empty, empty, dilation=2, backend="triton").shape == empty.shape


def test_fake_and_compile():
    """The fake gives the real shapes; torch.compile sees one opaque custom op (no graph break)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from rat_lightning.ops.dilated_attention import triton as dilated_triton

    with FakeTensorMode():
        q = torch.empty(2, 7, 3, 32, dtype=torch.bfloat16, device=DEVICE)
        out, lse = torch.ops.rat_lightning.dilated_attention_fwd(q, q, q, 4, 2, 1, 0.2)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    assert lse.shape == (2, 3, 7) and lse.dtype == torch.float32
    q, k, v = (torch.randn(1, 9, 1, 16, device=DEVICE) for _ in range(3))
    torch.library.opcheck(
        dilated_triton._fwd_op, (q, k, v, 4, 2, 1, 0.2), test_utils=("test_schema", "test_faketensor")
    )

    def attend(q, k, v):
        return dilated_attention(q, k, v, dilation=4, window=2, sinks=1, backend="triton")

    with torch.no_grad():
        compiled = torch.compile(attend, backend="aot_eager", fullgraph=True)(q, k, v)
    assert_close(compiled, attend(q, k, v), 0.0, "compiled")


def test_auto_takes_reference_when_grads_are_needed(monkeypatch: pytest.MonkeyPatch):
    """ "auto" picks Triton where it would (faked: on this device) unless autograd needs gradients."""
    import rat_lightning.ops.dilated_attention as dispatcher
    from rat_lightning.ops.dilated_attention import triton as dilated_triton

    calls = []
    real = dilated_triton.dilated_attention_triton
    monkeypatch.setattr(dispatcher, "resolve_backend", lambda b, x, available: "triton" if available else "reference")
    monkeypatch.setattr(dilated_triton, "dilated_attention_triton", lambda *a: calls.append(1) or real(*a))
    q, k, v = (torch.randn(1, 11, 2, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    expected = dilated_attention_reference(q, k, v, 3, 1, 1)

    with torch.no_grad():
        out = dilated_attention(q, k, v, dilation=3, window=1, sinks=1)
    assert calls == [1]
    assert_close(out, expected, 1e-5, "no_grad -> triton")

    out = dilated_attention(q, k, v, dilation=3, window=1, sinks=1)
    assert calls == [1] and out.requires_grad
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    expected_grads = torch.autograd.grad(expected.square().sum(), (q, k, v))
    for name, grad, expected_grad in zip(("dq", "dk", "dv"), grads, expected_grads):
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
        assert_close(grad, expected_grad, 1e-6, name)


def test_errors():
    q = torch.randn(1, 6, 2, 16, device=DEVICE, requires_grad=True)
    with pytest.raises(ValueError, match="no backward|forward-only"):
        dilated_attention(q, q, q, dilation=2, backend="triton")
    with torch.no_grad():
        dilated_attention(q, q, q, dilation=2, backend="triton")  # fine without autograd
    x = q.detach()
    with pytest.raises(ValueError, match="dilation"):
        dilated_attention(x, x, x, dilation=0)
    with pytest.raises(ValueError, match="dilation"):
        dilated_attention(x, x, x, dilation=2.0)
    with pytest.raises(ValueError, match="window"):
        dilated_attention(x, x, x, dilation=2, window=-1)
    with pytest.raises(ValueError, match="sinks"):
        dilated_attention(x, x, x, dilation=2, sinks=-1)
    with pytest.raises(ValueError, match="q, k, v"):
        dilated_attention(x, x[:, :5], x, dilation=2)
    with pytest.raises(ValueError, match="dtype"):
        dilated_attention(x, x.double(), x, dilation=2)
    odd = torch.randn(1, 6, 2, 24, device=DEVICE)
    with pytest.raises(ValueError, match="head_dim"):
        dilated_attention(odd, odd, odd, dilation=2, backend="triton")
    # "auto" falls back to the reference where the kernel does not apply (P = 24, fp64).
    assert_close(dilated_attention(odd, odd, odd, dilation=2), dilated_attention_reference(odd, odd, odd, 2, 0, 0), 0.0)
    with pytest.raises(ValueError, match="fp16, bf16 or fp32"):
        dilated_attention(x.double(), x.double(), x.double(), dilation=2, backend="triton")
