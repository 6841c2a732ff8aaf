"""Sample packing that keeps every example, every epoch, on any number of processes.

Axolotl's multipack sampler repacks each epoch from a fresh shuffle, so the number of bins changes from
epoch to epoch; to keep processes in step it cuts every epoch to the smallest bin count seen on any rank
and drops the last incomplete batch, and the examples in the cut bins are not trained on that epoch (4 of
64 in a 2-process test). Here the examples are packed once (Axolotl's own first-fit packer, on the data's
order), which fixes the bin count, and each epoch shuffles the order of the bins. The count is made a
multiple of the batches the processes take per round by splitting the fullest multi-example bins (a bin
is only repeated when none can be split, in a data set smaller than the processes), so each epoch trains on
every example exactly once and the step count is known before training.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import BatchSampler

from axolotl.utils.logging import get_logger

LOG = get_logger(__name__)


def pack_bins(lengths, capacity: int, group_size: int = 100_000, bin_size: int = 200) -> list[list[int]]:
    """Example indices in bins of at most `capacity` tokens (and `bin_size` examples), deterministically."""
    from axolotl.utils.samplers.multipack import pack_parallel

    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and int(lengths.max()) > capacity:
        raise ValueError(f"an example of {int(lengths.max())} tokens exceeds the packing capacity of {capacity}")
    return pack_parallel(lengths, bin_capacity=capacity, group_size=group_size, bin_size=bin_size,
                         num_processes=1, safe_mode=False)


def even_bins(bins: list[list[int]], lengths, bins_per_batch: int, processes: int) -> tuple[list[list[int]], int]:
    """Split (or, failing that, repeat) bins until every process gets the same number of batches.

    Returns the bins and how many were repeated (their examples are seen twice in an epoch).
    """
    bins = [list(b) for b in bins]
    repeated = 0
    while bins and math.ceil(len(bins) / bins_per_batch) % processes:
        splittable = [i for i, b in enumerate(bins) if len(b) > 1]
        if splittable:
            fullest = max(splittable, key=lambda i: sum(lengths[j] for j in bins[i]))
            half = len(bins[fullest]) // 2
            bins.append(bins[fullest][half:])
            bins[fullest] = bins[fullest][:half]
        else:
            bins.append(list(bins[repeated % len(bins)]))
            repeated += 1
    return bins, repeated


class EpochBins(BatchSampler):
    """Batches of bins of example indices: the same bins every epoch, in an order shuffled per epoch.

    Every process builds the same sampler (same lengths, same seed); accelerate deals its batches out.
    """

    def __init__(self, lengths, capacity: int, bins_per_batch: int, processes: int, seed: int, shuffle: bool = True,
                 group_size: int = 100_000, bin_size: int = 200):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        bins = pack_bins(self.lengths, capacity, group_size, bin_size)
        self.bins, repeated = even_bins(bins, self.lengths, bins_per_batch, processes)
        if repeated:
            LOG.warning("sample packing: %d bin(s) repeated each epoch so that %d processes get equal batches "
                        "(%d examples)", repeated, processes, len(self.lengths))
        self.bins_per_batch, self.seed, self.shuffle = bins_per_batch, seed, shuffle
        self.epoch = 0
        self.batch_size, self.drop_last = bins_per_batch, False

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        order = list(range(len(self.bins)))
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(len(self.bins), generator=generator).tolist()
        self.epoch += 1  # the next pass is the next epoch, also where nobody calls set_epoch
        for start in range(0, len(order), self.bins_per_batch):
            yield [self.bins[i] for i in order[start:start + self.bins_per_batch]]

    def __len__(self) -> int:
        return math.ceil(len(self.bins) / self.bins_per_batch)

    def efficiency(self, capacity: int) -> float:
        return float(self.lengths.sum()) / max(len(self.bins) * capacity, 1)


def packing_shape(micro_batch_size: int, sequence_len: int, real_batches: bool) -> tuple[int, int]:
    """(bin capacity in tokens, bins per micro-batch), as Axolotl's trainer sizes its multipack batches."""
    if real_batches:
        return sequence_len, micro_batch_size
    return micro_batch_size * sequence_len, 1
