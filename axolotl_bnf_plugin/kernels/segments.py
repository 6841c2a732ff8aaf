"""Rows grouped into segments (a response's tokens): blocks that hold whole segments, and their statistics.

A gradient rule over whole responses (ASFT's depends on the mean log-prob of the token's own response)
can build its d logits in the forward only once every row of the response is in the block at hand. The
single pass therefore cuts its row chunks at segment boundaries: consecutive whole segments fill a block
up to the chunk size. A segment longer than a block cannot be served that way; its rows go to the
two-pass op (logits again in backward), and only its rows.

Segments are given by their lengths, in row order, on the host (`segment_lengths`): the collator knows
them on the CPU, so planning needs no device-to-host synchronisation. Zero-length segments (a response
with no scored token) are allowed and ignored.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

LOG = logging.getLogger(__name__)
_LOGGED_SPLIT = False


@dataclass(frozen=True)
class SegmentPlan:
    """How the single pass covers rows grouped into segments.

    `blocks`: `(start, stop)` row ranges of the single pass over its own rows (the rows of the segments that
    fit a block, in order), each holding whole segments; `single_rows` / `long_rows`: which of the op's
    rows those are and which go to the two-pass op (None: all / none, no copy needed); `local`: for each
    single-pass row, its segment's number within its block; `segment_of_row`: for every row of the op, its
    segment's number among the non-empty segments (for reductions over whole segments outside the blocks)."""

    blocks: list[tuple[int, int]]
    single_rows: list[int] | None
    long_rows: list[int] | None
    local: list[int]
    segment_of_row: list[int]
    long_segment: list[int]  # for each long row, its segment's number among the long segments

    @property
    def long_share(self) -> float:
        total = len(self.segment_of_row)
        return len(self.long_rows or ()) / total if total else 0.0


def plan_segments(segment_lengths: list[int], chunk_size: int) -> SegmentPlan:
    """Greedy blocks of consecutive whole segments of at most `chunk_size` rows (module doc)."""
    blocks: list[tuple[int, int]] = []
    single, long_rows, local, segment_of_row = [], [], [], []
    row = kept = block_start = 0
    in_block = 0  # segments in the open block
    number = 0  # non-empty segments so far
    long_segment, long_count = [], 0
    for length in (int(x) for x in segment_lengths):
        if length < 0:
            raise ValueError(f"segment lengths must be >= 0, got {length}")
        if length == 0:
            continue
        segment_of_row += [number] * length
        number += 1
        if length > chunk_size:
            long_rows += range(row, row + length)
            long_segment += [long_count] * length
            long_count += 1
        else:
            if kept + length - block_start > chunk_size:
                blocks.append((block_start, kept))
                block_start, in_block = kept, 0
            single += range(row, row + length)
            local += [in_block] * length
            in_block += 1
            kept += length
        row += length
    if kept > block_start:
        blocks.append((block_start, kept))
    every = not long_rows
    return SegmentPlan(blocks, None if every else single, long_rows or None, local, segment_of_row, long_segment)


def host_ints(values: list[int], device: torch.device) -> torch.Tensor:
    """An int64 tensor of host integers on `device`, without waiting for the device: on CUDA through pinned
    memory and an asynchronous copy (a copy from pageable memory would wait for all queued work)."""
    tensor = torch.tensor(values, dtype=torch.long)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


@dataclass
class SplitCounts:
    """Scored rows that rules over segments trained on in this process since the last `reset`: in the
    single pass, and in the two-pass op (their response longer than a block). The trainer logs the share
    over the run (`fused/two_pass_share`)."""

    single: int = 0
    two_pass: int = 0

    def reset(self) -> None:
        self.single = self.two_pass = 0


SPLIT = SplitCounts()


def record_split(plan: SegmentPlan, chunk_size: int) -> None:
    """Count the plan's rows in `SPLIT`, and say once per process that responses longer than a block take
    the two-pass op, with their share of this first batch."""
    global _LOGGED_SPLIT
    long_rows = len(plan.long_rows or ())
    SPLIT.two_pass += long_rows
    SPLIT.single += len(plan.segment_of_row) - long_rows
    if plan.long_rows and not _LOGGED_SPLIT:
        _LOGGED_SPLIT = True
        LOG.info("fused op: responses longer than a block of %d rows take the two-pass op (logits again in "
                 "backward): %.1f%% of this batch's scored rows (over the run: fused/two_pass_share); the others "
                 "take the single pass. A larger bnf_loss_chunk_size keeps more of them in one pass", chunk_size,
                 100 * plan.long_share)


@dataclass(frozen=True)
class SegmentStats:
    """Per row, statistics of the rows of its own segment: `total` (sum of the values), `count`, `mean`."""

    total: torch.Tensor
    count: torch.Tensor

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count

    @staticmethod
    def of(values: torch.Tensor, segment: torch.Tensor) -> "SegmentStats":
        """The statistics of `values` `[C]` grouped by `segment` `[C]` (segment numbers below C), per row."""
        total = torch.zeros(values.shape[0], dtype=torch.float32, device=values.device)
        total.index_add_(0, segment, values.float())
        count = torch.zeros_like(total).index_add_(0, segment, torch.ones_like(total))
        return SegmentStats(total.index_select(0, segment), count.index_select(0, segment))

    def shifted(self, delta_mean: torch.Tensor) -> "SegmentStats":
        """The same segments with every mean moved by `delta_mean` (per row): for rounding bounds."""
        return SegmentStats(self.total + delta_mean * self.count, self.count)
