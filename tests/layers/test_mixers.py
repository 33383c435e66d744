import math

import pytest
import torch

from rat_lightning.layers import RAT, Attention, GatedRNN, Retention
from tests.conftest import assert_close, decode_steps

D_MODEL, HEADS = 32, 4
MIXERS = {
    "attention": lambda: Attention(D_MODEL, HEADS),
    "local_attention": lambda: Attention(D_MODEL, HEADS, window=4),
    "rnn": lambda: GatedRNN(D_MODEL, HEADS, max_seq_len=64),
    "rat_g1": lambda: RAT(D_MODEL, HEADS, n_groups=1, chunk_size=5),
    "rat_g2": lambda: RAT(D_MODEL, HEADS, n_groups=2, chunk_size=5),
    "rat_l1": lambda: RAT(D_MODEL, HEADS, n_groups=4, chunk_size=1),
    "retention": lambda: Retention(D_MODEL, HEADS),
}


@pytest.mark.parametrize("name", MIXERS)
# Multiples and non-multiples of the chunk size (5) and the window (4).
@pytest.mark.parametrize("length", [1, 4, 5, 16, 37])
def test_forward_equals_step_by_step(name, length):
    mixer = MIXERS[name]().double()
    x = torch.randn(2, length, D_MODEL, dtype=torch.float64)
    stepped, _ = decode_steps(mixer, x)
    assert_close(stepped, mixer(x), 1e-10, name)


@pytest.mark.parametrize("name", ["attention", "rat_g2", "rnn", "retention"])
def test_forward_equals_step_in_fp32(name):
    mixer = MIXERS[name]()
    x = torch.randn(2, 21, D_MODEL)
    stepped, _ = decode_steps(mixer, x)
    assert_close(stepped, mixer(x), 1e-5, name)


@pytest.mark.parametrize("name", MIXERS)
def test_causal(name):
    mixer = MIXERS[name]().double()
    x = torch.randn(1, 20, D_MODEL, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 13:] = torch.randn_like(x2[:, 13:])
    y, y2 = mixer(x), mixer(x2)
    assert torch.allclose(y[:, :13], y2[:, :13], atol=1e-12, rtol=0)
    assert not torch.allclose(y[:, 13:], y2[:, 13:])


def test_rat_with_chunk_at_least_length_is_the_gated_rnn():
    length = 12
    rat = RAT(D_MODEL, HEADS, n_groups=2, chunk_size=length).double()
    rnn = GatedRNN(D_MODEL, HEADS, max_seq_len=length).double()
    with torch.no_grad():
        # RAT's projection is [z, x, g, q, k]; the RNN's is [z, x, g].
        rnn.w_in.weight.copy_(rat.w_in.weight[: 3 * D_MODEL])
        rnn.w_out.weight.copy_(rat.w_out.weight)
        rnn.gate_bias.copy_(rat.gate_bias)
    x = torch.randn(2, length, D_MODEL, dtype=torch.float64)
    assert_close(rat(x), rnn(x), 1e-12)


@pytest.mark.parametrize("length", [1, 5, 6, 23])
def test_cache_sizes(length):
    chunk, window = 5, 4
    x = torch.randn(2, length, D_MODEL, dtype=torch.float64)
    _, rat_cache = decode_steps(RAT(D_MODEL, HEADS, chunk_size=chunk).double(), x)
    _, attn_cache = decode_steps(Attention(D_MODEL, HEADS).double(), x)
    _, local_cache = decode_steps(Attention(D_MODEL, HEADS, window=window).double(), x)
    assert rat_cache.num_entries() == math.ceil(length / chunk)
    assert attn_cache.kv[0].num_entries() == length
    assert local_cache.keys.shape[1] == min(length, window)


def test_gate_bias_init_spans_time_constants():
    rat = RAT(256, 4, chunk_size=16)
    a = torch.sigmoid(rat.gate_bias)
    # log(U(1, L-1)): a = u / (1 + u) with u in [1, 15].
    assert a.min() >= 0.5 - 1e-6 and a.max() <= 15 / 16 + 1e-6
    assert a.max() - a.min() > 0.3


def test_local_attention_equals_full_attention_inside_window():
    full = Attention(D_MODEL, HEADS).double()
    local = Attention(D_MODEL, HEADS, window=8).double()
    local.load_state_dict(full.state_dict())
    x = torch.randn(2, 8, D_MODEL, dtype=torch.float64)
    assert_close(local(x), full(x), 1e-12)
    x = torch.randn(2, 12, D_MODEL, dtype=torch.float64)
    assert not torch.allclose(local(x)[:, 8:], full(x)[:, 8:])


@pytest.mark.parametrize("name", ["rat_g2", "rnn"])
def test_forward_equals_step_on_the_triton_kernels(name):
    """The Triton path end to end (on CPU under the interpreter): the parallel kernels against the
    decode kernel and the recurrence's step kernel, token by token, across chunk boundaries."""
    mixer = MIXERS[name]()
    for module in mixer.modules():
        if hasattr(module, "backend"):
            module.backend = "triton"
    x = torch.randn(2, 12, D_MODEL)
    with torch.no_grad():
        stepped, _ = decode_steps(mixer, x)
        assert_close(stepped, mixer(x), 1e-5, name)
