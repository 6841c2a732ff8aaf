"""Per-row gradient rules: how a loss lets the op build its gradient during the forward pass.

The two-pass op computes each logits block twice: in forward for the statistics, in backward for d logits.
A loss whose gradient w.r.t. a row's label log-prob is a known function of that log-prob and of per-row
values fixed before the forward (a reference log-prob, a response weight) needs only one pass: each block,
once reduced to its statistics, is overwritten with d logits at once and fed to the gradient matmuls.

A method describes that function as a `GradRule` and registers it; the op (`single_pass.py`) receives the
rule's name, so the kernel layer knows no loss. A rule gives:
- `grad(logp, a, b)`: d loss / d logp per row, from fp32 `[C]` tensors, in PyTorch;
- `bound(a, b)`: a per-row upper bound on |grad|, known before the pass. The op scales the d logits by
  a power of two that brings the largest bound to (1/2, 1], so half-precision blocks hold them without
  underflow (see `single_pass.py`).

The rule runs once per block, in PyTorch, on both back-ends (the Triton one runs its statistics kernel,
then the rule, then its d-logits kernel), and the op returns the values it produced: a loss that takes
them as its gradient (`step_loss`) can never disagree with the gradient the forward built, whatever the
rounding. A rule may be ill-conditioned where a loss's own evaluation of it would differ (BNF near
p = 1); `rounding_slack` measures how far, so the op's check of its upstream gradient tolerates exactly
that much.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

Grad = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Bound = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# How many fp32 rounding steps of its inputs a loss's own evaluation of a rule may be off by: p = exp(logp)
# computed by another exp (Triton's on a GPU is within 2 ulp), an input stored and reloaded, a product
# formed in another order.
ROUNDING_ULPS = 4


@dataclass(frozen=True)
class GradRule:
    """d loss / d logp of each row as `grad(logp, a, b)`, with `|grad| <= bound(a, b)`.

    A rule `over_segments` also reads statistics of the row's whole segment (its response):
    `grad(logp, a, b, stats)` with `stats` a `segments.SegmentStats` of the segment's log-probs (sum,
    count, mean). The op then cuts its blocks at segment boundaries (`segments.plan_segments`) and computes
    the statistics from each block's own log-probs before forming its d logits."""

    name: str
    grad: Grad
    bound: Bound
    over_segments: bool = False

    def evaluate(self, logp: torch.Tensor, a: torch.Tensor, b: torch.Tensor, stats=None) -> torch.Tensor:
        """`grad` per row (with the segment statistics for a rule over segments)."""
        if self.over_segments:
            if stats is None:
                raise ValueError(f"gradient rule {self.name!r} reads segment statistics: the op needs segment_lengths")
            return self.grad(logp, a, b, stats)
        return self.grad(logp, a, b)


_RULES: dict[str, GradRule] = {}


def register_grad_rule(rule: GradRule) -> GradRule:
    """Make `rule` reachable by name from the op; registering the same name again must be the same rule."""
    known = _RULES.get(rule.name)
    if known is not None and known is not rule:
        raise ValueError(f"a different gradient rule is already registered as {rule.name!r}")
    _RULES[rule.name] = rule
    return rule


def get_grad_rule(name: str) -> GradRule:
    try:
        return _RULES[name]
    except KeyError:
        raise ValueError(f"no gradient rule registered as {name!r}; registered: {sorted(_RULES)}") from None


def prescale(bound: torch.Tensor) -> torch.Tensor:
    """fp32 2^k with max(bound) * 2^k in (1/2, 1]: every d logit of the pass is then at most 1 in magnitude.

    A device scalar (no host sync); a non-finite bound gives a non-finite factor, hence non-finite
    gradients, which the trainer's step guard skips.
    """
    if not bound.numel():
        return torch.ones((), dtype=torch.float32, device=bound.device)
    largest = bound.float().abs().amax().clamp(min=2.0**-100)
    return torch.exp2(-torch.ceil(torch.log2(largest)))


# How far above the smallest factor of a pass a block's own factor may go: the fp32 accumulators, rescaled to
# the factor in use, then hold every earlier block's contribution times at most this much (no overflow).
BLOCK_PRESCALE_RANGE = 2.0**64
# A block's largest d logit in fp16, as a power of two: 2^8, not 1, so that the rows of a block whose
# gradients are 1e4 times smaller than its largest (a long rejected response beside a short chosen one) stay
# above fp16's subnormals as under a loss scaler. d hidden = d logits @ W then stays within 2 * 2^8 * max|W|
# per element, far inside fp16's range.
BLOCK_HEADROOM = 2.0**8


def block_prescale(grad: torch.Tensor, current: torch.Tensor | None, smallest: torch.Tensor | None) -> torch.Tensor:
    """The factor for a block whose gradients are `grad`: its own `prescale` times `BLOCK_HEADROOM`, at most `BLOCK_PRESCALE_RANGE`
    times the smallest factor used so far; a block of zeros keeps the factor in use (`current`; None for the
    first block). A device scalar; a non-finite gradient gives a non-finite or zero factor, hence non-finite
    gradients."""
    own = prescale(grad) * BLOCK_HEADROOM
    if current is None:
        return own
    own = torch.where(grad.float().abs().amax() > 0, own, current)
    return torch.minimum(own, smallest * BLOCK_PRESCALE_RANGE)


def rounding_slack(rule: GradRule, logp: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                   grad: torch.Tensor, stats=None) -> torch.Tensor:
    """Per row, how far `rule.grad` moves when its inputs move by `ROUNDING_ULPS` fp32 roundings.

    logp and a (and a segment's mean, for a rule over segments) move by that many units of fp32 precision in absolute terms (scaled by 1 + |x|: an error in
    p = exp(logp) of one ulp near p = 1 is an absolute error of one ulp in logp), b by as many in relative
    terms. The largest change over the corners of that box bounds the difference between two honest
    evaluations of the rule on the same numbers.
    """
    step = ROUNDING_ULPS * torch.finfo(torch.float32).eps
    dl, da = step * (1 + logp.abs()), step * (1 + a.abs())
    dm = step * (1 + stats.mean.abs()) if stats is not None else None
    slack = step * grad.abs()
    for sl in (-1.0, 1.0):
        for sa in (-1.0, 1.0):
            moved_stats = stats.shifted(sl * dm) if stats is not None else None
            moved = rule.evaluate(logp + sl * dl, a + sa * da, b, moved_stats).float()
            slack = torch.maximum(slack, (moved - grad).abs() + step * grad.abs())
    return torch.where(torch.isfinite(slack), slack, torch.zeros_like(slack))
