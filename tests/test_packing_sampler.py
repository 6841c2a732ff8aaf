"""`data.packing`: the bins keep every example once per epoch, fit their capacity, give every process the same
number of batches, and only their order changes between epochs."""
from __future__ import annotations

import random

import pytest

from axolotl_bnf_plugin.data.packing import EpochBins


@pytest.mark.parametrize("processes,bins_per_batch", [(1, 1), (2, 1), (8, 1), (3, 2)])
def test_every_example_once_per_epoch_in_equal_shares(processes, bins_per_batch):
    rng = random.Random(processes)
    lengths = [rng.randint(5, 120) for _ in range(203)]
    sampler = EpochBins(lengths, capacity=256, bins_per_batch=bins_per_batch, processes=processes, seed=3)
    epochs = [list(sampler) for _ in range(2)]
    for batches in epochs:
        assert len(batches) == len(sampler) and len(batches) % processes == 0
        seen = [i for batch in batches for bin_ in batch for i in bin_]
        assert sorted(seen) == list(range(len(lengths)))  # each example exactly once
        assert all(sum(lengths[i] for i in bin_) <= 256 for batch in batches for bin_ in batch)
        assert all(1 <= len(batch) <= bins_per_batch for batch in batches)
    assert epochs[0] != epochs[1]  # reshuffled
    assert sorted(map(sorted, (b for batch in epochs[0] for b in batch))) == \
        sorted(map(sorted, (b for batch in epochs[1] for b in batch)))  # same bins
    twin = EpochBins(lengths, capacity=256, bins_per_batch=bins_per_batch, processes=processes, seed=3)
    assert list(twin) == epochs[0]  # every process builds the same sequence


def test_fewer_examples_than_processes_repeat_a_bin():
    sampler = EpochBins([10, 20, 30], capacity=256, bins_per_batch=1, processes=8, seed=0)
    batches = list(sampler)
    assert len(batches) == 8
    assert sorted({i for batch in batches for bin_ in batch for i in bin_}) == [0, 1, 2]


def test_an_example_longer_than_a_bin_is_an_error():
    with pytest.raises(ValueError, match="exceeds the packing capacity"):
        EpochBins([10, 300], capacity=256, bins_per_batch=1, processes=1, seed=0)
