"""What every method shares: the batch layout its loss receives, the normaliser n, and the metrics container.

A method's loss takes `[B, T]` per-token tensors (fp32) plus a `[B, T]` mask of scored tokens, a `[B]` sign
(+1 preferred, -1 dispreferred) and an optional `[B]` pair id (the two rows of a pair share an id >= 0,
unpaired rows carry -1), and returns `(loss, metrics)`. `metrics` maps docs/methods.md names to detached scalar
means, and `metrics.counts[name]` says how many items (rows, pairs or tokens) each mean is over, so a
caller can combine micro-batches or processes exactly.

The batch normaliser n is (distinct pairs) + (unpaired rows): on paired data the loss is a mean over
pairs, on unpaired data a mean over responses. Callers that accumulate gradients over several
micro-batches pass `normalizer=` to use the optimiser step's n instead of the micro-batch's.
"""
from __future__ import annotations

import torch

__all__ = ["Metrics", "batch_normalizer", "check_inputs", "pair_margins", "resolve_normalizer",
           "add_preference_metrics"]


class Metrics(dict):
    """Detached scalar metric means, with `counts[name]` = the number of items averaged."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, torch.Tensor] = {}

    def add_mean(self, name: str, values: torch.Tensor, select: torch.Tensor | None = None):
        """Record the mean of `values[select]` (skipped when nothing is selected, never a 0/0)."""
        values = values.detach().float()
        if select is None:
            select = torch.ones_like(values, dtype=torch.bool)
        count = select.sum()
        total = torch.where(select, values, torch.zeros_like(values)).sum()
        self[name] = total / count.clamp(min=1)
        self.counts[name] = count.detach()

    def merge(self, other: "Metrics") -> "Metrics":
        """Add another set of metrics (names must not collide)."""
        self.update(other)
        self.counts.update(other.counts)
        return self


def check_inputs(mask, sign, pair_ids, *per_token):
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, T], got shape {tuple(mask.shape)}")
    for t in per_token:
        if t.shape != mask.shape:
            raise ValueError(f"per-token inputs must match mask shape {tuple(mask.shape)}, got {tuple(t.shape)}")
    if sign.shape != mask.shape[:1]:
        raise ValueError(f"sign must be [B] = {tuple(mask.shape[:1])}, got {tuple(sign.shape)}")
    if pair_ids is not None and pair_ids.shape != sign.shape:
        raise ValueError(f"pair_ids must be [B] = {tuple(sign.shape)}, got {tuple(pair_ids.shape)}")
    if torch.compiler.is_compiling():
        return
    if not bool(((sign == 1) | (sign == -1)).all()):
        raise ValueError("sign must hold +1 (preferred) or -1 (dispreferred) for every row")
    if pair_ids is not None:
        same, paired = pair_structure(pair_ids)
        rows_per_id = same.sum(1)
        signs_per_id = (same * sign[None, :].to(same.dtype)).sum(1)
        bad = paired & ((rows_per_id != 2) | (signs_per_id != 0))
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"pair id {int(pair_ids[row])} (row {row}) must tie exactly one +1 row to one -1 row; "
                f"it has {int(rows_per_id[row])} rows with signs summing to {int(signs_per_id[row])}"
            )


def pair_structure(pair_ids: torch.Tensor):
    """`same[i, j]` = rows i and j belong to one pair; `paired[i]` = row i is in some pair."""
    paired = pair_ids >= 0
    same = (pair_ids[:, None] == pair_ids[None, :]) & paired[:, None] & paired[None, :]
    return same.to(torch.float32), paired


def batch_normalizer(pair_ids: torch.Tensor | None, batch_size: int, device=None) -> torch.Tensor:
    """n = (number of distinct pairs) + (number of unpaired rows), computed without a host sync."""
    if pair_ids is None:
        return torch.tensor(float(batch_size), device=device)
    same, paired = pair_structure(pair_ids)
    # A paired row contributes 1 / (rows sharing its id), so each pair adds up to exactly 1.
    per_row = torch.where(paired, 1.0 / same.sum(1).clamp(min=1), torch.ones_like(same[0]))
    return per_row.sum()


def pair_margins(values: torch.Tensor, sign: torch.Tensor, pair_ids: torch.Tensor | None, nonempty: torch.Tensor):
    """For each chosen row in a pair: its value minus its rejected partner's, and which rows count
    (both responses of the pair must have scored tokens)."""
    if pair_ids is None:
        return values, torch.zeros_like(values, dtype=torch.bool)
    same, paired = pair_structure(pair_ids)
    partner = same * (sign < 0).to(same.dtype)[None, :]
    partner_rejected = (partner * values[None, :]).sum(1)
    partner_nonempty = (partner * nonempty.to(same.dtype)[None, :]).sum(1) > 0
    return values - partner_rejected, paired & (sign > 0) & nonempty & partner_nonempty


def resolve_normalizer(normalizer, pair_ids, mask):
    """The batch's n (at least 1, for a batch of no rows), or the caller's value as given (must be > 0)."""
    if normalizer is None:
        return batch_normalizer(pair_ids, mask.shape[0], mask.device).clamp(min=1)
    return torch.as_tensor(normalizer, dtype=torch.float32, device=mask.device)


def add_preference_metrics(metrics: Metrics, rewards, logps, sign, pair_ids, nonempty):
    """Row metrics over responses with scored tokens; pair metrics over pairs whose both rows have some."""
    chosen, rejected = (sign > 0) & nonempty, (sign < 0) & nonempty
    metrics.add_mean("rewards/chosen", rewards, chosen)
    metrics.add_mean("rewards/rejected", rewards, rejected)
    margins, has_pair = pair_margins(rewards, sign, pair_ids, nonempty)
    metrics.add_mean("rewards/margins", margins, has_pair)
    metrics.add_mean("rewards/accuracies", (margins > 0).float(), has_pair)
    metrics.add_mean("logps/chosen", logps, chosen)
    metrics.add_mean("logps/rejected", logps, rejected)
