"""Metrics averaged exactly over a logging window, over micro-batches and processes.

Every micro-batch's metrics arrive as (mean, count) (`methods.common.Metrics`) and are kept as device sums
(no host sync per step). At a logging step they are summed over processes in one all_reduce and divided,
so means over pairs, responses or tokens stay correct whatever the batch composition.
"""
from __future__ import annotations

from collections import defaultdict

import torch

from .methods.common import Metrics


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class MetricSums:
    """Sums and counts per split ("train" / "eval") since the last log."""

    def __init__(self):
        self.sums = {"train": defaultdict(float), "eval": defaultdict(float)}
        self.counts = {"train": defaultdict(float), "eval": defaultdict(float)}

    def add(self, metrics: Metrics, split: str) -> None:
        """Add a micro-batch's sums and counts (device tensors: no host sync until logging)."""
        for name, mean in metrics.items():
            count = metrics.counts[name].detach().double()
            self.sums[split][name] = self.sums[split][name] + mean.detach().double() * count
            self.counts[split][name] = self.counts[split][name] + count

    def means(self, split: str, logs: dict, device) -> dict[str, float]:
        """Every process's means since the last log (then cleared); `logs` is the Trainer's log being made."""
        sums, counts = self.sums[split], self.counts[split]
        names = _names_on_every_process(sorted(sums), logs)
        out = {}
        if names:
            totals = torch.stack([torch.as_tensor(x, dtype=torch.float64, device=device)
                                  for x in [sums.get(n, 0.0) for n in names] + [counts.get(n, 0.0) for n in names]]
                                 ).view(2, -1)
            if _distributed():
                torch.distributed.all_reduce(totals)
            totals = totals.cpu()
            out = {name: total / count for name, total, count in zip(names, totals[0].tolist(), totals[1].tolist())
                   if count > 0}
        sums.clear()
        counts.clear()
        return out


def _names_on_every_process(names: list[str], logs: dict) -> list[str]:
    """The union of every process's metric names, in one order: the all_reduce in `MetricSums.means` then has
    the same size and layout everywhere, also when a process saw no batch since the last log (no names) or
    batches of another kind. One all_gather_object per log call, not per step (2 CPU processes over gloo
    on a busy 2-core machine: 9 ms, against 3 ms for the all_reduce itself); a fixed list of names would
    save that but silently drop any metric it does not list.

    Only logs that every process makes take part: the Trainer's training logs and evaluations, which
    carry a loss. A log made by the main process alone (some Axolotl callbacks) reduces nothing.
    """
    if not _distributed():
        return names
    if not any(key == "loss" or key.endswith("_loss") for key in logs):
        return []
    gathered: list[list[str] | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, names)
    return sorted(set().union(*gathered))
