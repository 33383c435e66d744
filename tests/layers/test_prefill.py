"""``prefill`` (a mixer's parallel path over a prompt) leaves the cache ``step`` would."""

import pytest
import torch

from rat_lightning.layers import RAT, Attention, GatedRNN, Retention
from rat_lightning.layers.cache import repeat_cache
from rat_lightning.layers.rat_plus import RATPlus
from rat_lightning.model import ModelConfig, RATLanguageModel, generate
from rat_lightning.sparse.pattern import LayerPattern
from tests.conftest import assert_close, decode_steps

D_MODEL, HEADS = 32, 4
MIXERS = {
    "attention": lambda: Attention(D_MODEL, HEADS),
    "attention_D3+W2": lambda: _patterned(Attention(D_MODEL, HEADS), dilation=3, window=2),
    "local_attention": lambda: Attention(D_MODEL, HEADS, window=4),
    "rnn": lambda: GatedRNN(D_MODEL, HEADS, max_seq_len=64),
    "rat": lambda: RAT(D_MODEL, HEADS, n_groups=2, chunk_size=5),
    "retention": lambda: Retention(D_MODEL, HEADS),
    "rat_plus": lambda: RATPlus(D_MODEL, HEADS),
    "rat_plus_D4+I1_hybrid": lambda: _patterned(RATPlus(D_MODEL, HEADS), dilation=4, sinks=1, dense_heads=1),
    "rat_plus_top1x4": lambda: _patterned(RATPlus(D_MODEL, HEADS), topk_blocks=1, block_size=4),
}


def _patterned(mixer, **pattern):
    mixer.set_pattern(LayerPattern(**pattern))
    return mixer


@pytest.mark.parametrize("name", MIXERS)
# Prompts shorter than, equal to and past the chunk (5), the window (4) and the top-k block (4).
@pytest.mark.parametrize("prompt", [1, 5, 13])
def test_prefill_then_step_equals_step_by_step(name, prompt):
    mixer = MIXERS[name]().double()
    x = torch.randn(2, prompt + 6, D_MODEL, dtype=torch.float64)
    stepped, stepped_cache = decode_steps(mixer, x)
    out, cache = mixer.prefill(x[:, :prompt], mixer.init_cache(2, x.device, capacity=prompt + 6))
    assert_close(out, stepped[:, :prompt], 1e-10, "prefill output")
    continued = []
    for t in range(prompt, x.shape[1]):
        y, cache = mixer.step(x[:, t], cache)
        continued.append(y)
    assert_close(torch.stack(continued, 1), stepped[:, prompt:], 1e-10, "steps after prefill")
    if hasattr(cache, "nbytes"):
        assert cache.nbytes == stepped_cache.nbytes
    if hasattr(cache, "kv"):
        assert [kv.nbytes for kv in cache.kv] == [kv.nbytes for kv in stepped_cache.kv]


def test_rat_cache_holds_rotated_summaries_in_the_input_dtype():
    rat = RAT(D_MODEL, HEADS, chunk_size=4).bfloat16()
    x = torch.randn(1, 10, D_MODEL, dtype=torch.bfloat16)
    _, cache = decode_steps(rat, x)
    assert cache.keys.data.dtype == torch.bfloat16 and cache.keys.length == 2
    assert all(t.dtype == torch.float32 for t in cache.state)  # the running state stays fp32
    assert cache.nbytes == rat.cache_bytes(10, torch.bfloat16) == 2 * 2 * D_MODEL * 2 + 2 * D_MODEL * 4
    _, prefilled = rat.prefill(x, rat.init_cache(1, x.device))
    assert_close(prefilled.keys.data, cache.keys.data, 1e-2, "bf16 keys")
    assert prefilled.keys.data.dtype == torch.bfloat16


@torch.no_grad()
def test_capacity_is_reserved_so_decoding_never_reallocates():
    rat = RAT(D_MODEL, HEADS, chunk_size=4)
    x = torch.randn(1, 40, D_MODEL)
    _, cache = rat.prefill(x[:, :8], rat.init_cache(1, x.device, capacity=40))
    storage = cache.keys.storage
    for t in range(8, 40):
        _, cache = rat.step(x[:, t], cache)
    assert cache.keys.storage is storage and cache.keys.length == 10


def _model(mixer: str) -> RATLanguageModel:
    config = ModelConfig(vocab_size=61, d_model=D_MODEL, n_layers=2, n_heads=HEADS, mixer=mixer, chunk_size=4)
    return RATLanguageModel(config).double()


@pytest.mark.parametrize("mixer", ["rat", "attention", "rat_plus"])
def test_generate_with_prefill_equals_a_step_loop(mixer):
    model = _model(mixer)
    prompt = torch.randint(0, 61, (3, 9))
    tokens = generate(model, prompt, max_new_tokens=7, temperature=0)
    caches, expected = model.init_cache(3), [prompt]
    for t in range(prompt.shape[1]):
        logits, caches = model.step(prompt[:, t], caches)
    for _ in range(7):
        expected.append(logits.argmax(-1, keepdim=True))
        logits, caches = model.step(expected[-1][:, 0], caches)
    assert torch.equal(tokens, torch.cat(expected, 1))


def test_repeated_prefill_equals_prefill_of_repeated_prompts():
    """Prefill one prompt per row, repeat the caches: decoding as if every copy was prefilled."""
    model = _model("rat")
    prompt = torch.randint(0, 61, (2, 10))
    _, caches = model.prefill(prompt, model.init_cache(2, capacity=16))
    repeated = repeat_cache(caches, 3)
    _, direct = model.prefill(prompt.repeat_interleave(3, 0), model.init_cache(6, capacity=16))
    token = torch.randint(0, 61, (6,))
    assert_close(model.step(token, repeated)[0], model.step(token, direct)[0], 1e-12, "after repeat")
