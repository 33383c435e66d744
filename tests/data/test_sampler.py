"""ResumableSampler: one order per (seed, epoch), resumable at a global cursor, sharded by rank."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DistributedSampler

from rat_lightning.data.pretrain import ResumableSampler


def order(num: int, seed: int, epoch: int, start: int = 0, rank: int = 0, world_size: int = 1) -> list[int]:
    sampler = ResumableSampler(num, seed, rank=rank, world_size=world_size)
    sampler.set_epoch(epoch)
    sampler.start = start
    return list(sampler)


def test_deterministic_per_seed_and_epoch_and_a_permutation() -> None:
    first = order(100, seed=7, epoch=0)
    assert first == order(100, seed=7, epoch=0)
    assert sorted(first) == list(range(100))
    assert first != list(range(100))
    assert order(100, seed=7, epoch=1) != first
    assert order(100, seed=8, epoch=0) != first
    # Seed and epoch are hashed together, not added.
    assert order(100, seed=1, epoch=1) != order(100, seed=2, epoch=0)
    # The global torch RNG plays no part.
    torch.manual_seed(123)
    assert order(100, seed=7, epoch=0) == first


@pytest.mark.parametrize("start", [0, 1, 37, 99, 100])
def test_resume_from_cursor_is_the_tail_of_the_order(start: int) -> None:
    full = order(100, seed=3, epoch=2)
    assert order(100, seed=3, epoch=2, start=start) == full[start:]


def test_len_is_the_whole_epoch_and_remaining_what_is_left() -> None:
    sampler = ResumableSampler(101, seed=0, rank=1, world_size=4)
    assert len(sampler) == 25
    sampler.start = 10
    assert sampler.remaining == len(list(sampler)) == 22


@pytest.mark.parametrize("start", [0, 6, 7])
def test_ranks_cover_the_single_process_order(start: int) -> None:
    single = order(50, seed=5, epoch=1, start=start)
    rank0 = order(50, seed=5, epoch=1, start=start, rank=0, world_size=2)
    rank1 = order(50, seed=5, epoch=1, start=start, rank=1, world_size=2)
    assert len(rank0) == len(rank1) == (50 - start) // 2
    # Interleaving the ranks gives the single-process order (cut to a multiple of the world size).
    interleaved = [index for pair in zip(rank0, rank1) for index in pair]
    assert interleaved == single[: len(interleaved)]
    assert not set(rank0) & set(rank1)


def test_resume_with_a_different_world_size() -> None:
    # 12 samples consumed by 2 ranks; resume on 3 ranks: together they continue the same order.
    single = order(60, seed=9, epoch=0)
    ranks = [order(60, seed=9, epoch=0, start=12, rank=r, world_size=3) for r in range(3)]
    interleaved = [index for triple in zip(*ranks) for index in triple]
    assert interleaved == single[12:]


def test_new_epoch_resets_the_cursor_and_same_epoch_keeps_it() -> None:
    sampler = ResumableSampler(20, seed=0)
    sampler.set_epoch(3)
    sampler.start = 5
    sampler.set_epoch(3)
    assert sampler.start == 5
    sampler.set_epoch(4)
    assert sampler.start == 0 and list(sampler) == order(20, seed=0, epoch=4)


def test_is_a_distributed_sampler_so_lightning_keeps_it() -> None:
    assert isinstance(ResumableSampler(4, seed=0), DistributedSampler)


def test_bad_rank() -> None:
    with pytest.raises(ValueError, match="rank < world_size"):
        ResumableSampler(10, seed=0, rank=2, world_size=2)
