"""Pretraining data: fixed-length windows of the token stream, in a resumable shuffled order.

The stream (every document followed by ``<|endoftext|>``) is split once: the last ``val_fraction``
of tokens is validation, the rest training, so no window straddles the two. Window ``i`` of a region
starts at token ``i * seq_len`` and holds ``seq_len + 1`` tokens: inputs are the first ``seq_len``,
targets the last ``seq_len``.

Resume (PITFALLS 1): the training order is a permutation drawn from ``(seed, epoch)``; the position
in it is one integer, the number of samples consumed in the epoch by all ranks together. It goes
into the checkpoint with the data's fingerprint, and a resumed run (with any number of processes)
continues the same order at that cursor.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from rat_lightning.data.errors import DataError
from rat_lightning.data.prepare import MANIFEST_NAME, prepare
from rat_lightning.data.shards import TokenShards, read_manifest
from rat_lightning.data.tokenizer import MIN_VOCAB_SIZE, eos_id, load_tokenizer, tokenizer_fingerprint
from rat_lightning.errors import ConfigError
from rat_lightning.model.loss import IGNORE_INDEX

log = logging.getLogger(__name__)

# Id that `prepare` gives <|endoftext|> in the tokenizers it trains (the first special token).
DEFAULT_EOS_ID = 0


class TokenWindows(Dataset):
    """``count`` windows of ``seq_len + 1`` tokens starting at ``begin``, ``begin + seq_len``, ...

    Item ``i`` is ``(input_ids, targets)``, both ``LongTensor[seq_len]``: ``targets`` is the window
    shifted by one, with ``-100`` where the input token is EOS when ``mask_eos_input`` (the next
    document's first token is not predicted from the previous document).
    """

    def __init__(
        self, shards: TokenShards, begin: int, count: int, seq_len: int, eos_id: int, mask_eos_input: bool = True
    ) -> None:
        self.shards = shards
        self.begin = begin
        self.count = count
        self.seq_len = seq_len
        self.eos_id = eos_id
        self.mask_eos_input = mask_eos_input

    def __len__(self) -> int:
        return self.count

    def window_start(self, index: int) -> int:
        """Stream position of window ``index``'s first token."""
        return self.begin + index * self.seq_len

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.count:
            raise IndexError(f"window {index} out of range [0, {self.count})")
        start = self.window_start(index)
        window = torch.from_numpy(self.shards.tokens(start, start + self.seq_len + 1))
        input_ids = window[:-1]
        targets = window[1:].clone()
        if self.mask_eos_input:
            targets[input_ids == self.eos_id] = IGNORE_INDEX
        return input_ids, targets


def _epoch_seed(seed: int, epoch: int) -> int:
    # A hash, not seed + epoch: (seed=1, epoch=1) and (seed=2, epoch=0) must not share an order.
    digest = hashlib.sha256(f"rat-lightning:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class ResumableSampler(DistributedSampler):
    """Shuffled sample order that resumes from a global cursor, sharded across ranks at read time.

    The epoch's order is ``torch.randperm(num_samples)`` from a generator seeded by ``(seed, epoch)``;
    it does not depend on the number of processes. ``start`` counts samples of that order already
    consumed by all ranks together; rank ``r`` of ``world_size`` reads
    ``order[start + r :: world_size]``, cut so every rank gets the same number of samples.

    ``len()`` is the per-rank count of a whole epoch (``num_samples // world_size``), also right after
    a resume: Lightning restores how many batches of the epoch were done and counts on from there.
    :attr:`remaining` is what one iteration yields now.

    It subclasses ``DistributedSampler`` only so that Lightning under DDP keeps it instead of wrapping
    it in another distributed sampler (which would shard twice); it does its own sharding.

    Args:
        num_samples: size of the dataset.
        seed: base seed of the order.
        rank: this process's global rank.
        world_size: number of processes.
    """

    def __init__(self, num_samples: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        # DistributedSampler.__init__ wants a dataset and a process group; we need neither.
        Sampler.__init__(self)
        if num_samples < 0:
            raise ConfigError(f"num_samples must be >= 0, got {num_samples}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.num_samples_total = num_samples
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        # The attribute names DistributedSampler users read.
        self.num_replicas = world_size
        self.shuffle = True
        self.drop_last = True
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's permutation; a new epoch starts at cursor 0 (Lightning calls this each epoch)."""
        if epoch != self.epoch:
            self.start = 0
        self.epoch = epoch

    def order(self) -> torch.Tensor:
        """The epoch's full order of sample indices (int64, world-size independent)."""
        generator = torch.Generator()
        generator.manual_seed(_epoch_seed(self.seed, self.epoch))
        return torch.randperm(self.num_samples_total, generator=generator)

    @property
    def remaining(self) -> int:
        """Samples this rank yields from the cursor to the end of the epoch."""
        return max(self.num_samples_total - self.start, 0) // self.world_size

    def __len__(self) -> int:
        return self.num_samples_total // self.world_size

    def __iter__(self) -> Iterator[int]:
        stop = self.start + self.remaining * self.world_size
        indices = self.order()[self.start + self.rank : stop : self.world_size]
        return iter(indices.tolist())


class _ResumableDataLoader(DataLoader):
    """DataLoader that Lightning recognizes as resumable mid-epoch.

    The position itself lives in :class:`PretrainDataModule` (whose ``state_dict`` goes into the
    checkpoint) and reaches the loader through its :class:`ResumableSampler`. These two methods only
    mark the loader as stateful; without them Lightning warns that a mid-epoch resume is unreliable.
    """

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _local_rank_zero() -> bool:
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("RANK", "0") == "0"


class PretrainDataModule(L.LightningDataModule):
    """Windows of a prepared token stream for causal-LM pretraining, with an exactly resumable order.

    Batches are ``(input_ids, targets)``, each ``LongTensor[batch_size, seq_len]``; ``targets`` is
    ``-100`` where no loss is taken.

    If ``data_dir`` has no ``manifest.json`` and ``source`` is given, the data is prepared (tokenizer
    trained, shards written) already in ``__init__``, so that :attr:`vocab_size` is the real one when
    LightningCLI links it into the model config (it instantiates the data module before calling
    ``prepare_data``). Only local rank 0 prepares there; under a launcher that starts all processes
    at once (torchrun), run ``rat-lightning prepare`` beforehand.

    Args:
        data_dir: folder written by ``rat-lightning prepare`` (manifest.json, shards, tokenizer.json).
        source: raw inputs (files or glob patterns) to prepare into ``data_dir`` when it has no data
            yet; None requires ``data_dir`` to be prepared already.
        tokenizer: tokenizer.json to prepare ``source`` with and to check the data against; None
            trains one on ``source``.
        vocab_size: vocabulary of the tokenizer trained on ``source``; ignored once data exists
            (then :attr:`vocab_size` is the manifest's).
        seq_len: tokens per training example.
        batch_size: examples per batch per process.
        val_fraction: fraction of the stream, taken from its end, held out for validation and test.
        val_max_windows: at most this many validation windows (the first ones); None keeps all.
        seed: seed of the training order (one permutation per epoch).
        num_workers: DataLoader worker processes.
        mask_eos_input: no loss on the target after an EOS input (no prediction across documents).
    """

    def __init__(
        self,
        data_dir: str = "data/prepared/quickstart",
        source: list[str] | None = None,
        tokenizer: str | None = None,
        vocab_size: int = 4096,
        seq_len: int = 256,
        batch_size: int = 16,
        val_fraction: float = 0.02,
        val_max_windows: int | None = None,
        seed: int = 1234,
        num_workers: int = 0,
        mask_eos_input: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(data_dir, (str, Path)) or not str(data_dir):
            raise ConfigError(f"data.data_dir must be a folder path, got {data_dir!r}")
        if isinstance(source, (str, Path)):
            source = [str(source)]
        if source is not None and (not source or not all(isinstance(s, (str, Path)) and str(s) for s in source)):
            raise ConfigError(
                f"data.source must be a non-empty list of files or glob patterns, or null; got {source!r}"
            )
        if tokenizer is not None and (not isinstance(tokenizer, (str, Path)) or not str(tokenizer)):
            raise ConfigError(f"data.tokenizer must be a tokenizer.json path or null, got {tokenizer!r}")
        if not _is_int(vocab_size) or vocab_size < MIN_VOCAB_SIZE:
            raise ConfigError(f"data.vocab_size must be an int >= {MIN_VOCAB_SIZE}, got {vocab_size!r}")
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
            if not _is_int(value) or value < 1:
                raise ConfigError(f"data.{name} must be a positive int, got {value!r}")
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
            raise ConfigError(f"data.val_fraction must be a number with 0 < val_fraction < 1, got {val_fraction!r}")
        if val_max_windows is not None and (not _is_int(val_max_windows) or val_max_windows < 1):
            raise ConfigError(f"data.val_max_windows must be a positive int or null, got {val_max_windows!r}")
        if not _is_int(seed) or seed < 0:
            raise ConfigError(f"data.seed must be a non-negative int, got {seed!r}")
        if not _is_int(num_workers) or num_workers < 0:
            raise ConfigError(f"data.num_workers must be an int >= 0, got {num_workers!r}")
        if not isinstance(mask_eos_input, bool):
            raise ConfigError(f"data.mask_eos_input must be true or false, got {mask_eos_input!r}")
        self.save_hyperparameters()

        self.data_dir = Path(data_dir)
        self.source = [str(s) for s in source] if source is not None else None
        self.tokenizer = str(tokenizer) if tokenizer is not None else None
        self._vocab_size_arg = vocab_size
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.val_fraction = float(val_fraction)
        self.val_max_windows = val_max_windows
        self.seed = seed
        self.num_workers = num_workers
        self.mask_eos_input = mask_eos_input

        self._manifest: dict[str, Any] | None = None
        self._shards: TokenShards | None = None
        # A vocabulary size handed out before any manifest existed, checked against the data in setup.
        self._guessed_vocab_size: int | None = None
        self.train_dataset: TokenWindows | None = None
        self.val_dataset: TokenWindows | None = None
        self._sampler: ResumableSampler | None = None
        # Resume position: the epoch and the samples consumed in it by all ranks together.
        self._epoch = 0
        self._consumed = 0

        if self.source is not None and not self._has_manifest() and _local_rank_zero():
            self._prepare()

    # Data on disk.

    def _has_manifest(self) -> bool:
        return (self.data_dir / MANIFEST_NAME).is_file()

    def _prepare(self) -> None:
        log.info("no prepared data in %s: preparing it from %s", self.data_dir, self.source)
        prepare(self.source, str(self.data_dir), tokenizer=self.tokenizer, vocab_size=self._vocab_size_arg)
        self._manifest = None

    def _read_manifest(self) -> dict[str, Any] | None:
        if self._shards is not None:
            return self._shards.manifest
        if self._manifest is None and self._has_manifest():
            self._manifest = read_manifest(self.data_dir)
        return self._manifest

    def _open_shards(self) -> TokenShards:
        if self._shards is None:
            self._shards = TokenShards(self.data_dir)
        return self._shards

    @property
    def vocab_size(self) -> int:
        """Vocabulary size of the data's tokenizer (the manifest's; before any data exists, the
        given tokenizer's or the ``vocab_size`` argument)."""
        manifest = self._read_manifest()
        if manifest is not None:
            return int(manifest["vocab_size"])
        if self.tokenizer is not None:
            guess = load_tokenizer(self.tokenizer).get_vocab_size(with_added_tokens=True)
        else:
            guess = self._vocab_size_arg
        self._guessed_vocab_size = guess
        return guess

    @property
    def eos_id(self) -> int:
        """Id of ``<|endoftext|>`` in the data (the manifest's; before any data exists, the given
        tokenizer's or the id ``prepare`` assigns, 0)."""
        manifest = self._read_manifest()
        if manifest is not None:
            return int(manifest["eos_id"])
        if self.tokenizer is not None:
            return eos_id(load_tokenizer(self.tokenizer))
        return DEFAULT_EOS_ID

    @property
    def tokenizer_path(self) -> Path:
        """The tokenizer.json of the prepared data (for decoding samples)."""
        manifest = self._read_manifest()
        name = manifest["tokenizer_file"] if manifest is not None else "tokenizer.json"
        return self.data_dir / name

    @property
    def fingerprint(self) -> str:
        """Hash of the prepared token stream (see :attr:`TokenShards.fingerprint`)."""
        return self._open_shards().fingerprint

    # Lightning hooks.

    def prepare_data(self) -> None:
        """Prepare ``source`` into ``data_dir`` if it holds no data yet (Lightning runs this on local rank 0)."""
        if self._has_manifest():
            return
        if self.source is None:
            raise DataError(
                f"{self.data_dir} holds no prepared data ({self.data_dir / MANIFEST_NAME} not found); run "
                f"`rat-lightning prepare --inputs ... --output_dir {self.data_dir}`, or set data.source to raw "
                "text files to prepare them on the first run"
            )
        self._prepare()

    def setup(self, stage: str | None = None) -> None:
        """Open the shards and cut them into training and validation windows."""
        if self.train_dataset is not None:
            return
        shards = self._open_shards()
        if self._guessed_vocab_size is not None and self._guessed_vocab_size != shards.vocab_size:
            raise DataError(
                f"the model was configured with vocab_size {self._guessed_vocab_size} before the data existed, but "
                f"the data in {self.data_dir} has vocab_size {shards.vocab_size}; run again (the data is now "
                "prepared, so the real size is used)"
            )
        # PITFALLS 5: ids at or above the model's vocabulary would index past its embedding.
        model = self.trainer.lightning_module if self.trainer is not None else None
        model_vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if _is_int(model_vocab) and model_vocab < shards.vocab_size:
            raise DataError(
                f"the model's vocab_size is {model_vocab} but the data in {self.data_dir} uses {shards.vocab_size} "
                "token ids; set model.config.vocab_size to the data's (the CLI links it from data.vocab_size) "
                "or prepare the data with the model's tokenizer"
            )
        if self.tokenizer is not None:
            given = tokenizer_fingerprint(load_tokenizer(self.tokenizer))
            if given != shards.manifest["tokenizer_fingerprint"]:
                raise DataError(
                    f"the data in {self.data_dir} was prepared with another tokenizer (sha256 "
                    f"{shards.manifest['tokenizer_fingerprint'][:12]}...) than data.tokenizer={self.tokenizer} "
                    f"({given[:12]}...); unset data.tokenizer, or re-run `rat-lightning prepare --tokenizer "
                    f"{self.tokenizer} --output_dir {self.data_dir} --overwrite true`"
                )

        total = shards.num_tokens
        val_tokens = int(total * self.val_fraction)
        split = total - val_tokens
        # A window needs seq_len + 1 tokens; the last train window ends before `split`.
        n_train = max(split - 1, 0) // self.seq_len
        n_val = max(val_tokens - 1, 0) // self.seq_len
        if n_train < 1 or n_val < 1:
            need = self._tokens_needed()
            raise DataError(
                f"the data in {self.data_dir} has {total} tokens, too few for one training and one validation "
                f"window of seq_len={self.seq_len} with val_fraction={self.val_fraction}: that needs at least "
                f"{need} tokens; add text, lower data.seq_len or raise data.val_fraction"
            )
        if self.val_max_windows is not None:
            n_val = min(n_val, self.val_max_windows)
        eos = shards.eos_id
        self.train_dataset = TokenWindows(shards, 0, n_train, self.seq_len, eos, self.mask_eos_input)
        self.val_dataset = TokenWindows(shards, split, n_val, self.seq_len, eos, self.mask_eos_input)
        log.info(
            "data %s: %d tokens, %d training windows, %d validation windows of %d tokens",
            self.data_dir,
            total,
            n_train,
            n_val,
            self.seq_len,
        )

    def _tokens_needed(self) -> int:
        """Smallest stream length giving one training and one validation window."""
        window = self.seq_len + 1
        total = max(math.ceil(window / self.val_fraction), math.ceil(window / (1 - self.val_fraction)))
        while True:
            val_tokens = int(total * self.val_fraction)
            if val_tokens >= window and total - val_tokens >= window:
                return total
            total += 1

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def _pin_memory(self) -> bool:
        trainer = self.trainer
        if trainer is not None:
            return trainer.strategy.root_device.type == "cuda"
        return torch.cuda.is_available()

    def train_dataloader(self) -> DataLoader:
        """Shuffled windows in the resumable order; ``drop_last`` so every step has a full batch."""
        if self.train_dataset is None:
            self.setup("fit")
        rank, world_size = self._rank_and_world()
        sampler = ResumableSampler(len(self.train_dataset), self.seed, rank, world_size)
        epoch = self.trainer.current_epoch if self.trainer is not None else self._epoch
        sampler.set_epoch(epoch)
        if epoch == self._epoch:
            sampler.start = self._consumed
        self._sampler = sampler
        return _ResumableDataLoader(
            self.train_dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=True,
            num_workers=self.num_workers,
            pin_memory=self._pin_memory(),
            persistent_workers=self.num_workers > 0,
        )

    def _eval_dataloader(self) -> DataLoader:
        if self.val_dataset is None:
            self.setup("validate")
        return DataLoader(
            self.val_dataset,
            batch_size=self.batch_size,
            shuffle=False,
            drop_last=False,
            num_workers=self.num_workers,
            pin_memory=self._pin_memory(),
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        """The held-out windows in fixed order."""
        return self._eval_dataloader()

    def test_dataloader(self) -> DataLoader:
        """The same held-out windows as validation."""
        return self._eval_dataloader()

    def predict_dataloader(self) -> DataLoader:
        """The held-out windows (as prompts)."""
        return self._eval_dataloader()

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count the training samples consumed (by all ranks), which is the resume cursor."""
        trainer = self.trainer
        if trainer is not None and trainer.training:
            if trainer.current_epoch != self._epoch:
                self._epoch = trainer.current_epoch
                self._consumed = 0
            size = (
                batch[0].shape[0] if isinstance(batch, (tuple, list)) and torch.is_tensor(batch[0]) else self.batch_size
            )
            self._consumed += size * trainer.world_size
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Resume state saved in checkpoints: O(1), independent of the number of processes."""
        return {
            "epoch": self._epoch,
            "consumed_in_epoch": self._consumed,
            "seed": self.seed,
            "fingerprint": self.fingerprint,
            "seq_len": self.seq_len,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the position; the data, ``seq_len`` and ``seed`` must be those of the checkpoint.

        Raises:
            DataError: the prepared data, sequence length or seed changed since the checkpoint.
        """
        missing = [k for k in ("epoch", "consumed_in_epoch", "seed", "fingerprint", "seq_len") if k not in state_dict]
        if missing:
            raise DataError(
                f"the checkpoint's data state lacks {', '.join(missing)}; it was not saved by PretrainDataModule"
            )
        if state_dict["fingerprint"] != self.fingerprint:
            raise DataError(
                f"the data changed since the checkpoint: it was trained on data with fingerprint "
                f"{state_dict['fingerprint']}, but {self.data_dir} now has fingerprint {self.fingerprint}; point "
                "data.data_dir at the data the checkpoint was trained on, or start a new run instead of resuming"
            )
        if state_dict["seq_len"] != self.seq_len:
            raise DataError(
                f"the checkpoint was trained with data.seq_len={state_dict['seq_len']} but data.seq_len is "
                f"{self.seq_len}; set data.seq_len={state_dict['seq_len']} to resume"
            )
        if state_dict["seed"] != self.seed:
            raise DataError(
                f"the checkpoint was trained with data.seed={state_dict['seed']} but data.seed is {self.seed}; "
                f"set data.seed={state_dict['seed']} to resume the same sample order"
            )
        self._epoch = int(state_dict["epoch"])
        self._consumed = int(state_dict["consumed_in_epoch"])
        if self._sampler is not None:
            self._sampler.set_epoch(self._epoch)
            self._sampler.start = self._consumed
