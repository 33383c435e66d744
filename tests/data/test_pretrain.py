"""PretrainDataModule: exact windows of the stream, EOS masking, disjoint validation, checked arguments."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from rat_lightning.data import DataError, PretrainDataModule, TokenShards
from rat_lightning.data.pretrain import ResumableSampler
from rat_lightning.errors import ConfigError

MakeDocs = Callable[..., list[str]]
WriteTxt = Callable[..., list[Path]]


SEQ = 32


@pytest.fixture(scope="module")
def full(prepared: Path) -> torch.Tensor:
    shards = TokenShards(prepared)
    return torch.from_numpy(shards.tokens(0, shards.num_tokens))


def make(prepared: Path, **kwargs: object) -> PretrainDataModule:
    options = {"data_dir": str(prepared), "seq_len": SEQ, "batch_size": 4, "val_fraction": 0.1, **kwargs}
    return PretrainDataModule(**options)


def test_windows_are_exact_slices_and_targets_masked_after_eos(prepared: Path, full: torch.Tensor) -> None:
    dm = make(prepared)
    dm.setup("fit")
    n = len(full)
    split = n - int(n * 0.1)
    assert len(dm.train_dataset) == (split - 1) // SEQ
    assert len(dm.val_dataset) == (n - split - 1) // SEQ
    masked = 0
    for dataset, begin in ((dm.train_dataset, 0), (dm.val_dataset, split)):
        for i in range(len(dataset)):
            input_ids, targets = dataset[i]
            start = begin + i * SEQ
            assert input_ids.dtype == targets.dtype == torch.int64 and input_ids.shape == targets.shape == (SEQ,)
            assert torch.equal(input_ids, full[start : start + SEQ])
            expected = full[start + 1 : start + SEQ + 1].clone()
            expected[input_ids == 0] = -100
            assert torch.equal(targets, expected)
            masked += int((targets == -100).sum())
    # Every document ends with EOS, so masks occur (one per EOS inside an input).
    assert masked > 50


def test_validation_is_disjoint_from_training(prepared: Path, full: torch.Tensor) -> None:
    dm = make(prepared)
    dm.setup("fit")
    train_last = dm.train_dataset.window_start(len(dm.train_dataset) - 1) + SEQ  # last token index used
    val_first = dm.val_dataset.window_start(0)
    assert train_last < val_first == len(full) - int(len(full) * 0.1)
    assert dm.val_dataset.window_start(len(dm.val_dataset) - 1) + SEQ < len(full)


def test_no_mask_option(prepared: Path, full: torch.Tensor) -> None:
    dm = make(prepared, mask_eos_input=False)
    dm.setup("fit")
    for i in range(len(dm.train_dataset)):
        assert torch.equal(dm.train_dataset[i][1], full[i * SEQ + 1 : i * SEQ + SEQ + 1])


def test_train_batches_follow_the_sampler_order(prepared: Path) -> None:
    dm = make(prepared, seed=11)
    dm.setup("fit")
    loader = dm.train_dataloader()
    order = list(ResumableSampler(len(dm.train_dataset), seed=11))
    batches = list(loader)
    assert len(batches) == len(loader) == len(dm.train_dataset) // 4
    for b, (input_ids, targets) in enumerate(batches):
        assert input_ids.shape == targets.shape == (4, SEQ)
        expected = torch.stack([dm.train_dataset[i][0] for i in order[b * 4 : b * 4 + 4]])
        assert torch.equal(input_ids, expected)


def test_worker_processes_give_the_same_batches(prepared: Path) -> None:
    single = [b[0] for b in make(prepared, seed=3).train_dataloader()]
    workers = make(prepared, seed=3, num_workers=2).train_dataloader()
    assert all(torch.equal(a, b[0]) for a, b in zip(single, workers, strict=True))


def test_eval_loaders_are_the_fixed_validation_windows(prepared: Path) -> None:
    dm = make(prepared, val_max_windows=5)
    dm.setup("validate")
    assert len(dm.val_dataset) == 5
    for loader in (dm.val_dataloader(), dm.test_dataloader(), dm.predict_dataloader()):
        batches = list(loader)
        assert torch.equal(torch.cat([b[0] for b in batches]), torch.stack([dm.val_dataset[i][0] for i in range(5)]))
    assert [b[0].shape[0] for b in batches] == [4, 1]


def test_vocab_and_eos_are_known_right_after_init(prepared: Path) -> None:
    manifest = json.loads((prepared / "manifest.json").read_text())
    dm = make(prepared, vocab_size=9999)
    assert dm.vocab_size == manifest["vocab_size"]
    assert dm.eos_id == manifest["eos_id"] == 0


def test_source_is_prepared_at_construction(tmp_path: Path, make_docs: MakeDocs, write_txt: WriteTxt) -> None:
    write_txt(tmp_path / "raw", make_docs(20, seed=21))
    data_dir = tmp_path / "prepared"
    dm = PretrainDataModule(
        data_dir=str(data_dir), source=[str(tmp_path / "raw" / "*.txt")], vocab_size=300, seq_len=16
    )
    manifest = json.loads((data_dir / "manifest.json").read_text())
    assert dm.vocab_size == manifest["vocab_size"] <= 300
    dm.prepare_data()  # already prepared: a no-op
    dm.setup("fit")
    assert len(dm.train_dataset) > 0


def test_no_data_and_no_source(tmp_path: Path) -> None:
    dm = PretrainDataModule(data_dir=str(tmp_path / "none"), vocab_size=1000)
    assert dm.vocab_size == 1000 and dm.eos_id == 0
    with pytest.raises(DataError, match=r"none holds no prepared data.*rat-lightning prepare --inputs .* data\.source"):
        dm.prepare_data()


def test_corpus_too_small(prepared: Path, full: torch.Tensor) -> None:
    dm = make(prepared, seq_len=len(full) // 2, val_fraction=0.05)
    with pytest.raises(DataError, match=rf"has {len(full)} tokens, too few .* needs at least \d+ tokens"):
        dm.setup("fit")


def test_given_tokenizer_must_be_the_data_s(prepared: Path, tmp_path: Path, make_docs: MakeDocs) -> None:
    from rat_lightning.data import train_tokenizer

    (tmp_path / "t.txt").write_text("".join(make_docs(5, seed=22)), encoding="utf-8")
    train_tokenizer([tmp_path / "t.txt"], vocab_size=300, output=tmp_path / "other.json")
    dm = make(prepared, tokenizer=str(tmp_path / "other.json"))
    with pytest.raises(DataError, match=r"prepared with another tokenizer .*other\.json"):
        dm.setup("fit")
    make(prepared, tokenizer=str(prepared / "tokenizer.json")).setup("fit")


def test_model_with_a_smaller_vocabulary_is_refused(prepared: Path) -> None:
    from types import SimpleNamespace

    dm = make(prepared)
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(config=SimpleNamespace(vocab_size=300)))
    with pytest.raises(
        DataError, match=rf"model's vocab_size is 300 but the data in .* uses {dm.vocab_size} token ids"
    ):
        dm.setup("fit")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("seq_len", 0, "data.seq_len must be a positive int"),
        ("seq_len", 2.5, "data.seq_len must be a positive int"),
        ("batch_size", -1, "data.batch_size must be a positive int"),
        ("val_fraction", 0.0, "data.val_fraction must be a number with 0 < val_fraction < 1"),
        ("val_fraction", 1.0, "data.val_fraction must be"),
        ("val_max_windows", 0, "data.val_max_windows must be a positive int or null"),
        ("vocab_size", 10, "data.vocab_size must be an int >= 257"),
        ("seed", -3, "data.seed must be a non-negative int"),
        ("num_workers", -1, "data.num_workers must be an int >= 0"),
        ("mask_eos_input", "yes", "data.mask_eos_input must be true or false"),
        ("source", [], "data.source must be a non-empty list"),
        ("data_dir", "", "data.data_dir must be a folder path"),
    ],
)
def test_arguments_are_checked(prepared: Path, field: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make(prepared, **{field: value})
    assert issubclass(ConfigError, ValueError)


def test_state_dict_round_trip_and_mismatches(
    prepared: Path, tmp_path: Path, make_docs: MakeDocs, write_txt: WriteTxt
) -> None:
    dm = make(prepared, seed=5)
    dm.setup("fit")
    state = dm.state_dict()
    assert state == {"epoch": 0, "consumed_in_epoch": 0, "seed": 5, "fingerprint": dm.fingerprint, "seq_len": SEQ}
    restored = make(prepared, seed=5)
    restored.load_state_dict({**state, "epoch": 2, "consumed_in_epoch": 12})
    sampler = restored.train_dataloader().sampler
    assert (sampler.epoch, sampler.start) == (2, 12)
    fresh = ResumableSampler(len(restored.train_dataset), seed=5)
    fresh.set_epoch(2)
    assert list(sampler) == list(fresh)[12:]

    with pytest.raises(DataError, match=r"data\.seq_len=32 but data\.seq_len is 16"):
        make(prepared, seed=5, seq_len=16).load_state_dict(state)
    with pytest.raises(DataError, match=r"data\.seed=5 but data\.seed is 6"):
        make(prepared, seed=6).load_state_dict(state)
    write_txt(tmp_path / "raw", make_docs(40, seed=23))
    other = PretrainDataModule(data_dir=str(tmp_path / "other"), source=[str(tmp_path / "raw")], vocab_size=300, seed=5)
    with pytest.raises(
        DataError, match=rf"the data changed since the checkpoint: .*{state['fingerprint']}.*{other.fingerprint}"
    ):
        other.load_state_dict(state)
