"""Inference patterns: masks, the parallel path against step-by-step decoding with the pattern's
cache, KV-bytes accounting against the tensors the caches hold, and clear errors."""

import pytest
import torch

from rat_lightning.errors import ConfigError
from rat_lightning.layers import RAT, Attention, RATPlus
from rat_lightning.model import ModelConfig, RATLanguageModel
from rat_lightning.sparse import InferencePattern, LayerPattern, topk_block_mask
from tests.conftest import assert_close, decode_steps

D_MODEL, HEADS = 32, 4
LAYER_PATTERNS = {
    "dense": LayerPattern(),
    "D4": LayerPattern(dilation=4),
    "D4+W3+I2": LayerPattern(dilation=4, window=3, sinks=2),
    "D5|h1dense": LayerPattern(dilation=5, dense_heads=1),
    "D64": LayerPattern(dilation=64),
    "top2x4": LayerPattern(topk_blocks=2, block_size=4),
    "top1x5|h2dense": LayerPattern(topk_blocks=1, block_size=5, dense_heads=2),
}
MIXERS = {
    "rat_plus": lambda: RATPlus(D_MODEL, HEADS, recurrent=True),
    "gated_attention": lambda: RATPlus(D_MODEL, HEADS, recurrent=False),
    "attention": lambda: Attention(D_MODEL, HEADS),
}


def test_topk_block_mask_picks_the_highest_scoring_earlier_blocks():
    torch.manual_seed(0)
    q, k = torch.randn(2, 19, 3, 8, dtype=torch.float64), torch.randn(2, 19, 3, 8, dtype=torch.float64)
    topk, size = 2, 4
    mask = topk_block_mask(q, k, topk, size)
    for b in range(2):
        for h in range(3):
            for t in range(19):
                own = t // size
                means = [k[b, i * size : (i + 1) * size, h].mean(0) for i in range(own)]
                scores = torch.tensor([float(q[b, t, h] @ m) for m in means])
                picked = set(scores.topk(min(topk, own)).indices.tolist()) if own else set()
                expected = [(j // size in picked) or (j // size == own and j <= t) for j in range(19)]
                assert mask[b, h, t].tolist() == expected


@pytest.mark.parametrize("mixer_name", MIXERS)
@pytest.mark.parametrize("pattern_name", LAYER_PATTERNS)
@pytest.mark.parametrize("length", [1, 13, 37])
def test_forward_equals_step_with_the_patterns_cache(mixer_name, pattern_name, length):
    mixer = MIXERS[mixer_name]().double()
    mixer.set_pattern(LAYER_PATTERNS[pattern_name])
    x = torch.randn(2, length, D_MODEL, dtype=torch.float64)
    stepped, _ = decode_steps(mixer, x)
    assert_close(stepped, mixer(x), 1e-10, f"{mixer_name} {pattern_name}")


@pytest.mark.parametrize("mixer_name", MIXERS)
def test_sparse_patterns_change_the_output(mixer_name):
    # Guards the tests above against a pattern silently ignored by both paths.
    mixer = MIXERS[mixer_name]().double()
    x = torch.randn(1, 30, D_MODEL, dtype=torch.float64)
    dense = mixer(x)
    for name in ("D4", "top2x4"):
        mixer.set_pattern(LAYER_PATTERNS[name])
        assert not torch.allclose(mixer(x)[:, 8:], dense[:, 8:]), name
        assert torch.allclose(mixer(x)[:, :1], dense[:, :1])  # the first token sees only itself


def _held_bytes(cache) -> int:
    state = sum(t.numel() * t.element_size() for t in cache.state or ())
    return sum(kv.nbytes for kv in cache.kv) + state


@pytest.mark.parametrize("mixer_name", MIXERS)
@pytest.mark.parametrize("pattern_name", LAYER_PATTERNS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_bytes_match_the_tensors_held(mixer_name, pattern_name, dtype):
    mixer = MIXERS[mixer_name]().to(dtype)
    mixer.set_pattern(LAYER_PATTERNS[pattern_name])
    for length in (1, 9, 29):
        _, cache = decode_steps(mixer, torch.randn(1, length, D_MODEL, dtype=dtype))
        assert _held_bytes(cache) == mixer.cache_bytes(length, dtype), (length, pattern_name)


def test_cache_shrinks_with_dilation():
    mixer = RATPlus(D_MODEL, HEADS).double()
    length = 64
    entries = {}
    for name in ("dense", "D4", "D4+W3+I2", "D64"):
        mixer.set_pattern(LAYER_PATTERNS[name])
        _, cache = decode_steps(mixer, torch.randn(1, length, D_MODEL, dtype=torch.float64))
        entries[name] = cache.kv[0].num_entries()
    # D4: positions 3, 7, ..., 63; +W3 adds 61, 62 (63 is dilated); +I2 adds 0, 1.
    assert entries == {"dense": 64, "D4": 16, "D4+W3+I2": 20, "D64": 1}


def test_rat_cache_bytes_match_its_cache():
    rat = RAT(D_MODEL, HEADS, chunk_size=5)
    for length in (1, 5, 12):
        _, cache = decode_steps(rat, torch.randn(1, length, D_MODEL))
        assert cache.nbytes == rat.cache_bytes(length, torch.float32)


def _model(mixer="rat_plus", **pattern) -> RATLanguageModel:
    config = ModelConfig(vocab_size=64, d_model=D_MODEL, n_layers=4, n_heads=HEADS, mixer=mixer)
    model = RATLanguageModel(config).double()
    if pattern:
        model.set_pattern(InferencePattern(**pattern))
    return model


@pytest.mark.parametrize(
    "pattern",
    [
        {"dilation": [1, 4, 8, 2], "window": [0, 2, 0, 1], "sinks": 1},
        {"dilation": 4, "dense_layers": [0, -1]},
        {"topk_blocks": 1, "block_size": 4, "dense_heads": 1},
    ],
)
def test_model_forward_equals_step_and_cache_bytes(pattern):
    model = _model(**pattern)
    ids = torch.randint(0, 64, (2, 27))
    caches = model.init_cache(2)
    logits = []
    for t in range(ids.shape[1]):
        out, caches = model.step(ids[:, t], caches)
        logits.append(out)
    assert_close(torch.stack(logits, 1), model(ids), 1e-10)
    held = sum(_held_bytes(c) for c in caches)
    assert held == 2 * model.cache_bytes(27)  # the caches hold a batch of 2


def test_using_pattern_restores_the_previous_one():
    model = _model()
    ids = torch.randint(0, 64, (1, 20))
    dense = model(ids)
    with model.using_pattern(InferencePattern(dilation=4)):
        assert not torch.allclose(model(ids), dense)
    assert torch.equal(model(ids), dense)


def test_layer_hybrid_keeps_listed_layers_dense():
    model = _model(dilation=8, dense_layers=[0, -1])
    assert [b.mixer.pattern.label() for b in model.blocks] == ["dense", "D8", "D8", "dense"]


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ({"window": -1}, "pattern.window must be an int >= 0"),
        ({"dilation": 0}, "pattern.dilation must be an int >= 1"),
        ({"dilation": [1, 4]}, "pattern.dilation lists 2 values but the model has 4 layers"),
        ({"dilation": 4, "dense_layers": [7]}, "pattern.dense_layers has [7]"),
        ({"dilation": 4, "dense_heads": 9}, "pattern.dense_heads (9) exceeds the model's 4 heads"),
        ({"topk_blocks": 2, "dilation": 4}, "topk_blocks replaces dilation"),
    ],
)
def test_bad_patterns_fail_clearly(pattern, message):
    with pytest.raises(ConfigError) as error:
        _model(**pattern)
    assert message in str(error.value)


def test_dilation_longer_than_the_sequence_fails_clearly():
    with pytest.raises(ConfigError, match="dilation 64 is larger than the sequence length 32"):
        InferencePattern(dilation=64).check(4, 4, seq_len=32)


def test_pattern_on_a_layer_without_patterns_fails_clearly():
    with pytest.raises(ConfigError, match="layer 1: a RAT layer takes no sparse inference pattern"):
        _model(mixer=["rat_plus", "rat"], dilation=4)
    _model(mixer=["rat_plus", "rat"], dilation=4, dense_layers=[1, 3])  # allowed: rat layers kept dense


def test_labels():
    assert InferencePattern().label() == "dense"
    assert InferencePattern(dilation=16, window=256, sinks=4).label() == "D16+W256+I4"
    assert InferencePattern(dilation=64, dense_layers=[0, -1]).label() == "D64|dense[0,-1]"
    assert InferencePattern(topk_blocks=4, block_size=64).label() == "top4x64"
    assert InferencePattern(dilation=4, name="mine").label() == "mine"


def test_every_mixer_reports_the_cache_it_holds():
    from rat_lightning.layers import GatedRNN, Retention

    for mixer in (GatedRNN(D_MODEL, HEADS, max_seq_len=16), Retention(D_MODEL, HEADS), Attention(D_MODEL, HEADS, 4)):
        for length in (1, 7):
            _, cache = decode_steps(mixer, torch.randn(1, length, D_MODEL))
            tensors = [v for v in vars(cache).values() if isinstance(v, torch.Tensor)]
            held = sum(t.numel() * t.element_size() for t in tensors)
            assert held == mixer.cache_bytes(length, torch.float32), type(mixer).__name__


@pytest.mark.parametrize("mixer_name", MIXERS)
@pytest.mark.parametrize(
    "pattern",
    [
        LayerPattern(dilation=4, window=40),  # the window covers every key
        LayerPattern(dilation=64, sinks=40),  # the sinks cover every key
        LayerPattern(topk_blocks=10, block_size=4),  # k covers every earlier block
        LayerPattern(dilation=5, window=40, dense_heads=1),
    ],
    ids=lambda p: p.label(),
)
def test_every_sparse_pattern_at_full_budget_equals_dense(mixer_name, pattern):
    # PITFALLS 6: a sparse method given every key must be dense attention, on both paths.
    mixer = MIXERS[mixer_name]().double()
    x = torch.randn(2, 37, D_MODEL, dtype=torch.float64)
    dense = mixer(x)
    mixer.set_pattern(pattern)
    assert_close(mixer(x), dense, 1e-12, pattern.label())
    assert_close(decode_steps(mixer, x)[0], dense, 1e-10, pattern.label())
