import pytest
import torch

from rat_lightning.errors import ConfigError
from rat_lightning.model import ModelConfig, RATLanguageModel, generate
from rat_lightning.sparse.pattern import InferencePattern
from tests.conftest import assert_close


def tiny(**overrides):
    args = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, chunk_size=4, window=6, max_seq_len=32)
    args.update(overrides)
    return ModelConfig(**args)


@pytest.mark.parametrize("mixer", ["rat", "attention", "local_attention", "rnn", "retention",
                                   ["local_attention", "rat"], ["rat", "rnn"]])
def test_forward_equals_step_for_the_whole_model(mixer):
    model = RATLanguageModel(tiny(mixer=mixer)).double()
    ids = torch.randint(0, 97, (2, 19))
    caches = model.init_cache(2)
    logits = []
    for t in range(19):
        out, caches = model.step(ids[:, t], caches)
        logits.append(out)
    assert_close(torch.stack(logits, 1), model(ids), 1e-10)


def test_pattern_repeats_over_layers():
    config = tiny(n_layers=4, mixer=["local_attention", "rat"])
    assert config.layer_mixers == ["local_attention", "rat", "local_attention", "rat"]
    model = RATLanguageModel(config)
    assert [type(b.mixer).__name__ for b in model.blocks] == ["Attention", "RAT", "Attention", "RAT"]
    assert model.blocks[0].mixer.window == 6


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"d_model": 30, "n_heads": 4}, r"d_model \(30\) must be divisible by model.n_heads \(4\)"),
        ({"d_model": -8}, "model.d_model must be a positive integer"),
        ({"n_layers": 0}, "model.n_layers must be a positive integer"),
        ({"chunk_size": 2.5}, "model.chunk_size must be a positive integer"),
        ({"mixer": "transformer"}, "unknown names"),
        ({"n_layers": 3, "mixer": ["rat", "rnn"]}, "does not divide model.n_layers"),
        ({"n_heads": 4, "n_groups": 3}, "divisible by model.n_groups"),
        ({"d_model": 36, "n_heads": 4}, "must be even"),
    ],
)
def test_bad_configs_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny(**overrides)


def test_tied_embeddings_share_storage_and_count_once():
    tied = RATLanguageModel(tiny(tie_embeddings=True))
    untied = RATLanguageModel(tiny(tie_embeddings=False))
    assert tied.head.weight is tied.embed.weight
    assert untied.num_parameters() - tied.num_parameters() == 97 * 32


def test_flops_per_token_grow_with_length_for_attention_only():
    attention = RATLanguageModel(tiny(mixer="attention"))
    rnn = RATLanguageModel(tiny(mixer="rnn"))
    assert attention.flops_per_token(4096) > 10 * attention.flops_per_token(128) / 10
    assert attention.flops_per_token(4096) - attention.flops_per_token(128) > 1e6
    assert rnn.flops_per_token(4096) == rnn.flops_per_token(128)
    # 6N at least: forward 2 FLOPs per matmul weight, training 3x.
    assert rnn.flops_per_token(128) >= 6 * rnn.num_matmul_parameters()


def test_paper_shape_has_about_1_3b_parameters():
    config = ModelConfig(vocab_size=32000, d_model=2048, n_layers=24, n_heads=16, n_groups=2, chunk_size=16)
    with torch.device("meta"):
        model = RATLanguageModel(config)
    assert 1.2e9 < model.num_parameters() < 1.5e9


def test_generation_greedy_top_k_top_p():
    model = RATLanguageModel(tiny()).eval()
    prompt = torch.randint(0, 97, (3, 5))
    greedy = generate(model, prompt, 6, temperature=0)
    assert greedy.shape == (3, 11) and torch.equal(greedy[:, :5], prompt)
    assert torch.equal(generate(model, prompt, 6, temperature=1.0, top_k=1), greedy)
    assert torch.equal(generate(model, prompt, 6, temperature=1.0, top_p=1e-6), greedy)
    gen = torch.Generator().manual_seed(3)
    a = generate(model, prompt, 6, temperature=1.0, top_k=20, generator=gen)
    b = generate(model, prompt, 6, temperature=1.0, top_k=20, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_greedy_generation_matches_parallel_argmax():
    model = RATLanguageModel(tiny()).double().eval()
    out = generate(model, torch.randint(0, 97, (2, 4)), 8, temperature=0)
    logits = model(out[:, :-1])
    assert torch.equal(logits[:, 3:].argmax(-1), out[:, 4:])


def test_eos_stops_rows():
    model = RATLanguageModel(tiny()).eval()
    prompt = torch.randint(0, 97, (4, 3))
    out = generate(model, prompt, 20, temperature=1.0, eos_id=5, generator=torch.Generator().manual_seed(0))
    for row in out[:, 3:]:
        hits = (row == 5).nonzero()
        if len(hits):
            assert (row[hits[0, 0] :] == 5).all()


@pytest.mark.parametrize("mixer", ["rat", "attention", ["local_attention", "rat"]])
def test_activation_checkpointing_saves_less_and_gives_the_same_gradients(mixer, monkeypatch):
    model = RATLanguageModel(tiny(mixer=mixer)).double()
    ids = torch.randint(0, 97, (2, 19))

    def run(recompute: bool):
        model.config.activation_checkpointing = recompute
        saved = []
        # Counts what autograd keeps outside checkpointed regions (checkpoint hooks its own).
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            loss = model(ids).logsumexp(-1).mean()
        return loss, torch.autograd.grad(loss, list(model.parameters())), sum(saved)

    loss, grads, saved = run(False)
    loss_recomputed, grads_recomputed, saved_recomputed = run(True)
    assert loss_recomputed.item() == loss.item()
    for grad, grad_recomputed in zip(grads, grads_recomputed):
        assert_close(grad_recomputed, grad, 1e-12)
    assert saved_recomputed < saved / 2
    # Inference (no autograd) never wraps a block in a checkpoint.
    monkeypatch.setattr("rat_lightning.model.lm.checkpoint", lambda *args, **kwargs: pytest.fail("checkpointed"))
    with torch.no_grad():
        model(ids)


def test_activation_checkpointing_recomputes_under_the_forwards_pattern():
    # RAT+ joint training: the second forward runs under a sparse pattern, its backward after the
    # pattern is switched back; the recompute must still use the sparse one.
    model = RATLanguageModel(tiny(mixer="rat_plus", chunk_size=4)).double()
    ids = torch.randint(0, 97, (2, 19))

    def grads(recompute: bool):
        model.config.activation_checkpointing = recompute
        loss = model(ids).logsumexp(-1).mean()
        with model.using_pattern(InferencePattern(dilation=4)):
            loss = loss + model(ids).logsumexp(-1).mean()
        return torch.autograd.grad(loss, list(model.parameters()))

    for grad, grad_recomputed in zip(grads(False), grads(True)):
        assert_close(grad_recomputed, grad, 1e-12)
