"""Resume through a real Lightning Trainer continues the exact batch sequence (PITFALLS 1).

An uninterrupted run and runs resumed from checkpoints (mid-epoch, at an epoch's end, in a later
epoch) must see the same batches in the same order, and on CPU the same losses bit for bit.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from rat_lightning.data import DataError, PretrainDataModule

MakeDocs = Callable[..., list[str]]
WriteTxt = Callable[..., list[Path]]


SEQ = 128
BATCH = 16


class Recorder(L.LightningModule):
    """A tiny LM that records every training batch and loss."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, 8)
        self.head = nn.Linear(8, vocab_size)
        self.seen: list[torch.Tensor] = []
        self.losses: list[torch.Tensor] = []

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        input_ids, targets = batch
        self.seen.append(input_ids.clone())
        logits = self.head(self.embed(input_ids))
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        self.losses.append(loss.detach().clone())
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", self.head(self.embed(batch[0])).mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def run(
    prepared: Path, root: Path, max_steps: int, ckpt_path: Path | None = None
) -> tuple[Recorder, PretrainDataModule]:
    """Fit; a fresh run saves a checkpoint after every step into ``root``, a resumed run saves none."""
    dm = PretrainDataModule(
        data_dir=str(prepared), seq_len=SEQ, batch_size=BATCH, val_fraction=0.05, val_max_windows=2, seed=42
    )
    torch.manual_seed(0)
    model = Recorder(dm.vocab_size)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1,
        enable_checkpointing=ckpt_path is None,
        callbacks=(
            [ModelCheckpoint(dirpath=root, filename="{step}", every_n_train_steps=1, save_top_k=-1, save_last=True)]
            if ckpt_path is None
            else []
        ),
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model, dm


@pytest.fixture(scope="module")
def uninterrupted(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Recorder, Path, int, int]:
    root = tmp_path_factory.mktemp("full")
    dm = PretrainDataModule(data_dir=str(prepared), seq_len=SEQ, batch_size=BATCH, val_fraction=0.05)
    dm.setup("fit")
    steps_per_epoch = len(dm.train_dataset) // BATCH
    assert steps_per_epoch >= 6, "the test corpus is too small for this test"
    max_steps = 2 * steps_per_epoch + 3
    model, _ = run(prepared, root, max_steps)
    assert len(model.seen) == max_steps
    return model, root, steps_per_epoch, max_steps


def test_uninterrupted_epochs_are_permutations(uninterrupted: tuple[Recorder, Path, int, int]) -> None:
    model, _, steps_per_epoch, _ = uninterrupted
    epoch0 = torch.cat(model.seen[:steps_per_epoch])
    epoch1 = torch.cat(model.seen[steps_per_epoch : 2 * steps_per_epoch])
    # A new order each epoch, and no window twice within an epoch (drop_last cuts a different tail).
    assert not torch.equal(epoch0, epoch1)
    for epoch in (epoch0, epoch1):
        assert len({tuple(row.tolist()) for row in epoch}) == len(epoch)


@pytest.mark.parametrize("where", ["mid_epoch", "end_of_epoch", "later_epoch"])
def test_resume_continues_the_same_batches(
    prepared: Path, tmp_path: Path, uninterrupted: tuple[Recorder, Path, int, int], where: str
) -> None:
    full, root, steps_per_epoch, max_steps = uninterrupted
    step = {"mid_epoch": steps_per_epoch // 2, "end_of_epoch": steps_per_epoch, "later_epoch": steps_per_epoch + 3}[
        where
    ]
    checkpoint = root / f"step={step}.ckpt"
    state = torch.load(checkpoint, weights_only=False)["PretrainDataModule"]
    assert state["consumed_in_epoch"] == (step - (step > steps_per_epoch) * steps_per_epoch) * BATCH

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed, _ = run(prepared, tmp_path, max_steps, ckpt_path=checkpoint)
    assert not [w for w in caught if "not resumable" in str(w.message)]

    assert len(resumed.seen) == max_steps - step
    for index, (expected, actual) in enumerate(zip(full.seen[step:], resumed.seen, strict=True)):
        assert torch.equal(expected, actual), f"batch {step + index} differs after resuming from step {step}"
    # Weights, optimizer state and data all continue: the loss curve is identical on CPU.
    assert torch.equal(torch.stack(full.losses[step:]), torch.stack(resumed.losses))


def test_resume_on_changed_data_is_refused(
    tmp_path: Path, uninterrupted: tuple[Recorder, Path, int, int], make_docs: MakeDocs, write_txt: WriteTxt
) -> None:
    _, root, _, max_steps = uninterrupted
    write_txt(tmp_path / "raw", make_docs(60, seed=31))
    other = tmp_path / "other"
    PretrainDataModule(data_dir=str(other), source=[str(tmp_path / "raw")], vocab_size=512, seq_len=SEQ)
    with pytest.raises(DataError, match="the data changed since the checkpoint"):
        run(other, tmp_path / "ckpt", max_steps, ckpt_path=root / "step=3.ckpt")
