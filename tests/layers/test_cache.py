"""SequenceBuffer (in-place appends that keep earlier caches valid) and repeat_cache."""

import pytest
import torch

from rat_lightning.layers.cache import SequenceBuffer, repeat_cache
from rat_lightning.layers.rat import RATCache
from rat_lightning.sparse.attend import PatternCache, PatternKVCache


def _entry(value: float, batch: int = 2) -> torch.Tensor:
    return torch.full((batch, 3, 4), value)


def test_append_writes_in_place_and_older_buffers_still_read_their_entries():
    empty = SequenceBuffer(reserve=4)
    one = empty.append(_entry(1.0))
    two = one.append(_entry(2.0))
    assert empty.data is None and one.length == 1 and two.length == 2
    assert one.storage.data_ptr() == two.storage.data_ptr()  # no copy while room is left
    assert one.data.shape == (2, 1, 3, 4) and (one.data == 1).all()
    assert (two.data[:, 1] == 2).all() and two.nbytes == 2 * 2 * 3 * 4 * 4


def test_growth_doubles_and_keeps_the_entries():
    buffer = SequenceBuffer()
    capacities = []
    for i in range(9):
        buffer = buffer.append(_entry(float(i)))
        capacities.append(buffer.storage.shape[1])
    assert capacities == [1, 2, 4, 4, 8, 8, 8, 8, 16]
    assert torch.equal(buffer.data[0, :, 0, 0], torch.arange(9.0))


def test_dtype_is_fixed_by_the_first_entry():
    buffer = SequenceBuffer.of(torch.zeros(1, 2, 3, 4, dtype=torch.bfloat16), reserve=5)
    buffer = buffer.append(torch.full((1, 3, 4), 1.5, dtype=torch.float64))
    assert buffer.data.dtype == torch.bfloat16 and buffer.storage.shape[1] == 5
    assert (buffer.data[:, 2] == 1.5).all()


def test_clone_makes_branches_independent():
    base = SequenceBuffer(reserve=4).append(_entry(1.0))
    branch = base.clone().append(_entry(2.0))
    other = base.append(_entry(3.0))
    assert (branch.data[:, 1] == 2).all() and (other.data[:, 1] == 3).all()


def test_entries_that_need_grad_are_concatenated_not_written_in_place():
    weight = torch.ones((), requires_grad=True)
    first = SequenceBuffer(reserve=8).append(_entry(1.0) * weight)
    saved = first.data
    second = first.append(_entry(2.0) * weight)
    (second.data.sum() + saved.sum()).backward()  # in-place writes would fail here
    assert weight.grad.item() == pytest.approx(2 * 12 * 4)


def test_repeat_cache_repeats_rows_and_keeps_shared_fields():
    keys = SequenceBuffer(reserve=6).extend(torch.arange(2.0).view(2, 1, 1, 1).expand(2, 3, 1, 1))
    rat = RATCache(keys, keys, (torch.tensor([[[5.0]], [[7.0]]]),) * 2, position=3)
    positions = torch.tensor([0, 4, 8])
    pattern = PatternCache([PatternKVCache(keys, keys, positions)], None, 9)
    rat3, pattern3 = repeat_cache([rat, pattern], 3)
    assert rat3.keys.data.shape == (6, 3, 1, 1) and rat3.keys.storage.shape[1] == 6
    assert rat3.keys.data[:, 0, 0, 0].tolist() == [0, 0, 0, 1, 1, 1]
    assert rat3.state[0].flatten().tolist() == [5, 5, 5, 7, 7, 7] and rat3.position == 3
    assert pattern3.kv[0].positions is positions and pattern3.position == 9
    assert rat3.keys.storage.data_ptr() != keys.storage.data_ptr()
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        repeat_cache(rat, 0)
