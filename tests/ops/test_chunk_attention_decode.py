"""Triton decode step of chunk attention against the reference ``chunk_attention_step``.

Without a GPU the kernels run under the Triton interpreter on CPU tensors (see tests/conftest.py),
so shapes are tiny: tiles of 8 summaries (``small_tiles``), so C = 37 spans 5 tiles (the last
partial), and explicit splits over C run the merge kernel.
"""

from __future__ import annotations

import pytest
import torch

from rat_lightning.ops.chunk_attention import chunk_attention_step, chunk_attention_step_reference
from tests.conftest import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32: only the summation order and the fp32 cos / sin of reduced angles differ (~2e-7 seen).
# bf16 / fp16 inputs are read as they are and computed in fp32; the reference runs on the same
# rounded values upcast, so the same tolerance would do, but 16-bit inputs get the suite's 1e-2.
RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}

# Fresh float buffers are NaN-filled (tests/ops/conftest.py): an unwritten output fails.
pytestmark = pytest.mark.usefixtures("nan_empty")


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiles of 8 summaries for the decode kernel."""
    from rat_lightning.ops.chunk_attention import decode

    small = decode.DecodeConfig(8, 4, 1)
    monkeypatch.setattr(decode, "CONFIGS", {name: small for name in decode.CONFIGS})


def _inputs(batch, chunks, dtype, heads=2, dim=16):
    q, k_own, v_own = (torch.randn(batch, heads, dim, device=DEVICE) for _ in range(3))
    k_chunks, v_chunks = (torch.randn(batch, chunks, heads, dim, device=DEVICE).to(dtype) for _ in range(2))
    return 2 * q, k_own, v_own, k_chunks, v_chunks


def _reference(*inputs, **kwargs):
    return chunk_attention_step_reference(*(x.double() for x in inputs), **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("chunks, splits", [(0, None), (1, None), (5, None), (37, 1), (37, 3)])
@pytest.mark.parametrize("batch", [1, 3])
def test_kernel_matches_reference(batch, chunks, splits, dtype):
    from rat_lightning.ops.chunk_attention.decode import chunk_attention_decode

    inputs = _inputs(batch, chunks, dtype)
    out = chunk_attention_decode(*inputs, 10000.0, 16**-0.5, splits=splits)
    assert out.shape == (batch, 2, 16) and out.dtype == torch.float32
    assert_close(out, _reference(*inputs), RTOL[dtype], "out")
    if chunks == 0:
        assert_close(out, inputs[2], 0.0, "C = 0 gives v_own")


def test_non_contiguous_views_and_mixed_dtypes():
    """Caches sliced from longer preallocated buffers, heads interleaved, bf16 q, fp16 v summaries."""
    from rat_lightning.ops.chunk_attention.decode import chunk_attention_decode

    chunks, heads, dim = 13, 2, 16
    k_buffer = torch.randn(2, 40, heads, dim, device=DEVICE)
    # (B, H, C_max, P) storage viewed as (B, C, H, P): stride over C is P, over H is C_max * P.
    v_buffer = torch.randn(2, heads, 40, dim, device=DEVICE).half().transpose(1, 2)
    k_chunks, v_chunks = k_buffer[:, 3 : 3 + chunks], v_buffer[:, :chunks]
    qkv = torch.randn(2, heads, 3 * dim, device=DEVICE)
    q = torch.randn(2, heads, 2 * dim, device=DEVICE).bfloat16()[..., dim:]
    k_own, v_own = qkv[..., dim : 2 * dim], qkv[..., 2 * dim :]
    assert not any(x.is_contiguous() for x in (k_chunks, v_chunks, q, k_own, v_own))
    inputs = (q, k_own, v_own, k_chunks, v_chunks)
    out = chunk_attention_decode(*inputs, 500.0, 0.3, splits=2)
    assert_close(out, _reference(*inputs, rope_base=500.0, scale=0.3), 1e-5, "out")


def test_large_chunk_index_angles():
    """C = 2000 (positions where fp32 angles would be off by ~1e-4 rad), one (b, h), tiles of 256."""
    from rat_lightning.ops.chunk_attention.decode import DecodeConfig, chunk_attention_decode

    inputs = _inputs(1, 2000, torch.float32, heads=1, dim=32)
    out = chunk_attention_decode(*inputs, 10000.0, 32**-0.5, config=DecodeConfig(256, 4, 1), splits=2)
    assert_close(out, _reference(*inputs), 1e-5, "out")


def test_num_splits():
    from rat_lightning.ops.chunk_attention.decode import num_splits

    assert num_splits(16, 0, 32) == 1
    # 4 warps: 8 programs per SM, cdiv(1056, 16) = 66 wanted, 128 tiles at >= 2 per split -> 64.
    assert num_splits(16, 4096, 32) == 64
    # 2 warps: 16 programs per SM, 2112 wanted over 39 * 16 = 624 (b, h) -> 4 splits of 32 tiles.
    assert num_splits(39 * 16, 65536 // 16, 32, num_warps=2) == 4
    assert num_splits(16 * 1024, 4096, 32) == 1  # B * H alone fills the GPU
    assert num_splits(2, 100, 8) == 5  # 13 tiles, at least 2 per split: 6 wanted, 3 tiles each -> 5 splits
    for batch_heads in (1, 7, 100, 10_000):
        for chunks in (1, 9, 37, 1000, 5000):
            splits = num_splits(batch_heads, chunks, 8)
            tiles = -(-chunks // 8)
            per_split = -(-tiles // splits)
            assert 1 <= splits <= tiles and (splits - 1) * per_split < tiles  # no empty split


def test_dispatcher_and_rat_step():
    """backend="triton" through the custom op; a RAT layer decodes with it as with the reference."""
    from rat_lightning.layers.rat import RAT

    inputs = _inputs(2, 6, torch.float32)
    out = chunk_attention_step(*inputs, rope_base=800.0, scale=0.2, backend="triton")
    assert_close(out, _reference(*inputs, rope_base=800.0, scale=0.2), 1e-5, "out")
    layers = [RAT(32, n_heads=2, chunk_size=2, backend=backend).to(DEVICE) for backend in ("triton", "reference")]
    layers[1].load_state_dict(layers[0].state_dict())
    x = torch.randn(1, 5, 32, device=DEVICE)
    with torch.no_grad():
        for layer in layers:
            cache, outs = layer.init_cache(1, x.device), []
            for t in range(x.shape[1]):
                y, cache = layer.step(x[:, t], cache)
                outs.append(y)
            layer.outputs = torch.stack(outs, 1)
    assert_close(layers[0].outputs, layers[1].outputs, 1e-5, "RAT.step")


def test_dispatch_rules():
    q = torch.randn(1, 2, 8, dtype=torch.float64)
    chunks = torch.randn(1, 3, 2, 8, dtype=torch.float64)
    # CPU tensors under "auto" take the reference (float64 would not be a Triton dtype anyway).
    assert_close(chunk_attention_step(q, q, q, chunks, chunks), _reference(q, q, q, chunks, chunks), 0.0)
    with pytest.raises(ValueError, match="fp16, bf16 or fp32"):
        chunk_attention_step(q, q, q, chunks, chunks, backend="triton")
    q32, chunks32 = q.float().requires_grad_(), chunks.float()
    with pytest.raises(ValueError, match="forward-only"):
        chunk_attention_step(q32, q32, q32, chunks32, chunks32, backend="triton")
    with pytest.raises(ValueError, match="k_chunks, v_chunks must be"):
        chunk_attention_step(q, q, q, chunks[:, :, :1], chunks[:, :, :1])
    with pytest.raises(ValueError, match="even head_dim"):
        odd = torch.zeros(1, 1, 7)
        chunk_attention_step(odd, odd, odd, odd[:, None], odd[:, None], backend="triton")


def test_custom_op_fake_and_compile():
    """The fake impl gives (B, H, P) fp32; torch.compile sees one opaque op (fullgraph) with eager's numbers."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from rat_lightning.ops.chunk_attention import decode

    with FakeTensorMode():
        q = torch.empty(3, 4, 32, dtype=torch.bfloat16, device=DEVICE)
        chunks = torch.empty(3, 9, 4, 32, dtype=torch.bfloat16, device=DEVICE)
        out = torch.ops.rat_lightning.chunk_attention_decode(q, q, q, chunks, chunks, 10000.0, 0.2)
    assert out.shape == (3, 4, 32) and out.dtype == torch.float32
    inputs = _inputs(1, 3, torch.float32)
    torch.library.opcheck(decode._decode_op, (*inputs, 10000.0, 0.25), test_utils=("test_schema", "test_faketensor"))

    def step(*args):
        return chunk_attention_step(*args, backend="triton").square()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    assert_close(compiled(*inputs), step(*inputs), 0.0, "compiled")
