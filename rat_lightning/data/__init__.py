"""Data: tokenizer, ``prepare`` (raw text -> token shards + manifest), shard reader, pretraining DataModule."""

from rat_lightning.data.errors import DataError
from rat_lightning.data.prepare import prepare
from rat_lightning.data.pretrain import PretrainDataModule
from rat_lightning.data.shards import TokenShards
from rat_lightning.data.tokenizer import load_tokenizer, train_tokenizer

__all__ = ["DataError", "PretrainDataModule", "TokenShards", "load_tokenizer", "prepare", "train_tokenizer"]
