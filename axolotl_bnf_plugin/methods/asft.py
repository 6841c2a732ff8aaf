"""ASFT, Aligned Supervised Fine-Tuning (Wang et al., arXiv 2409.10571): its keys and math. Reference-free.

Each response is scored by its length-normalised log-likelihood lbar; a preferred response adds an NLL
term, and every response an alignment term on its log-odds r = log(pibar / (1 - pibar)) (docs/methods.md). A token's
gradient depends on its whole response's lbar, so ASFT's gradient rule is over segments: the fused op's
blocks hold whole responses and build the gradient in the forward, one logits pass.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache, partial

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field

from ..kernels.grad_rules import GradRule, register_grad_rule
from .base import Method, option
from .common import Metrics, add_preference_metrics, check_inputs, pair_margins, resolve_normalizer
from .registry import register

__all__ = ["ASFT", "asft_loss"]

# Largest mean log-prob ASFT evaluates log(1 - pibar) at: pibar == 1 exactly would give log(0).
_ASFT_MAX_LBAR = -1e-6


class ASFTOptions(BaseModel):
    """ASFT's config keys."""

    asft_lambda: float = Field(default=1.0, ge=0.0, json_schema_extra={"description": "ASFT alignment weight lambda."})
    asft_beta: float = Field(default=1.0, gt=0.0, json_schema_extra={"description": "ASFT temperature beta (paper: 1)."})
    asft_sft_weight: float = Field(
        default=1.0, ge=0.0, json_schema_extra={"description": "ASFT weight c_sft of the NLL term (paper: 1)."}
    )


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler's split at -log 2)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def asft_loss(
    policy_logps: torch.Tensor,
    mask: torch.Tensor,
    sign: torch.Tensor,
    pair_ids: torch.Tensor | None = None,
    lam: float = 1.0,
    beta: float = 1.0,
    sft_weight: float = 1.0,
    *,
    normalizer: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Aligned Supervised Fine-Tuning loss (Wang et al., arXiv 2409.10571). Reference-free.

    With lbar the length-normalised log-likelihood and r = log(pibar / (1 - pibar)), a preferred row
    contributes `-sft_weight * lbar - lam * log sigmoid(beta * r)` and a dispreferred one
    `-lam * log sigmoid(-beta * r)`; the sum is divided by n (pairs + unpaired rows).
    `log(1 - pibar)` is evaluated at `min(lbar, -1e-6)` so that pibar == 1 stays finite. A row with no
    scored tokens has no lbar: it adds nothing to the loss and is left out of the metrics.
    """
    check_inputs(mask, sign, pair_ids, policy_logps)
    scored = mask.bool()
    dtype = torch.promote_types(policy_logps.dtype, torch.float32)
    logp = torch.where(scored, policy_logps.to(dtype), torch.zeros_like(policy_logps, dtype=dtype))
    lengths = scored.sum(1)
    nonempty = lengths > 0
    lbar = logp.sum(1) / lengths.clamp(min=1)
    log_odds = lbar - _log1mexp(lbar.clamp(max=_ASFT_MAX_LBAR))
    preferred = sign > 0
    # -log sigmoid(x) = softplus(-x): finite for every finite x.
    align = torch.where(preferred, F.softplus(-beta * log_odds), F.softplus(beta * log_odds))
    align = torch.where(nonempty, align, torch.zeros_like(align))
    nll = torch.where(preferred & nonempty, -lbar, torch.zeros_like(lbar))
    n = resolve_normalizer(normalizer, pair_ids, mask)
    loss = (sft_weight * nll.sum() + lam * align.sum()) / n

    # The two terms as means over this batch's own n (whatever normaliser the loss used), so that
    # micro-batches combine exactly: loss = sft_weight * nll_loss + lam * align_loss when n is the batch's.
    metrics = Metrics()
    n_batch = resolve_normalizer(None, pair_ids, mask).detach()
    metrics["asft/nll_loss"] = nll.sum().detach() / n_batch
    metrics.counts["asft/nll_loss"] = n_batch
    metrics["asft/align_loss"] = align.sum().detach() / n_batch
    metrics.counts["asft/align_loss"] = n_batch
    add_preference_metrics(metrics, beta * lbar, lbar, sign, pair_ids, nonempty)
    odds_margin, has_pair = pair_margins(log_odds, sign, pair_ids, nonempty)
    metrics.add_mean("log_odds_chosen", odds_margin, has_pair)
    return loss, metrics


# 1 / (1 - pibar) at the largest lbar the loss evaluates log(1 - pibar) at: the alignment gradient's bound.
_ASFT_MAX_ODDS_SLOPE = 1.0 + 1.0 / math.expm1(-_ASFT_MAX_LBAR)


def _asft_grad(logp, sign, inv_n, stats, *, lam, beta, sft_weight):
    """d loss / d logp of a scored token: (1/n) (1/|y|) dl/dlbar of its response, with lbar its mean log-prob
    (from the segment statistics) and l the response's term of `asft_loss`. The alignment term's derivative
    goes through r = lbar - log(1 - exp(min(lbar, -1e-6))): dr/dlbar = 1 + 1 / expm1(-lbar) below the clamp,
    1 above it (where the clamp's gradient is 0), as autograd differentiates `asft_loss`."""
    lbar = stats.mean
    below = lbar <= _ASFT_MAX_LBAR
    slope = 1.0 + torch.where(below, 1.0 / torch.expm1(-lbar.clamp(max=_ASFT_MAX_LBAR)), torch.zeros_like(lbar))
    log_odds = lbar - _log1mexp(lbar.clamp(max=_ASFT_MAX_LBAR))
    preferred = sign > 0
    d_align = torch.where(preferred, -beta * torch.sigmoid(-beta * log_odds), beta * torch.sigmoid(beta * log_odds))
    d_term = lam * d_align * slope - torch.where(preferred, sft_weight, 0.0)
    return inv_n * d_term / stats.count


@lru_cache(maxsize=None)
def asft_grad_rule(lam: float, beta: float, sft_weight: float) -> GradRule:
    """ASFT's gradient rule for these hyper-parameters, over segments (each response's mean log-prob)."""

    def bound(sign, inv_n):
        return inv_n.abs() * (sft_weight + lam * beta * _ASFT_MAX_ODDS_SLOPE)

    grad = partial(_asft_grad, lam=lam, beta=beta, sft_weight=sft_weight)
    name = f"asft(lambda={lam!r}, beta={beta!r}, c_sft={sft_weight!r})"
    return register_grad_rule(GradRule(name, grad=grad, bound=bound, over_segments=True))


@register
@dataclass(frozen=True)
class ASFT(Method):
    """ASFT on the fused op, its gradient built in the forward by a rule over whole responses (each token's
    gradient depends on its response's mean log-prob: the op's blocks hold whole responses)."""

    name = "asft"
    paper = "ASFT: Aligned Supervised Fine-Tuning (Wang et al., arXiv 2409.10571) -- not Anchored SFT (2509.23753)"
    formula = ("L = (1/n) sum [-c_sft lbar_w - lambda log sig(beta r_w) - lambda log sig(-beta r_l)],  "
               "r = log(pibar/(1-pibar))")
    options = ASFTOptions
    metrics = ("asft/nll_loss", "asft/align_loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
               "rewards/accuracies", "logps/chosen", "logps/rejected", "log_odds_chosen")

    lam: float = option(ASFTOptions, "asft_lambda")
    beta: float = option(ASFTOptions, "asft_beta")
    sft_weight: float = option(ASFTOptions, "asft_sft_weight")

    def loss(self, logp, ref_logp, neg_entropy, mask, sign, pair_ids=None, *, normalizer=None):
        return asft_loss(logp, mask, sign, pair_ids, lam=self.lam, beta=self.beta, sft_weight=self.sft_weight,
                         normalizer=normalizer)

    @property
    def grad_rule(self) -> GradRule:
        return asft_grad_rule(float(self.lam), float(self.beta), float(self.sft_weight))

    def grad_inputs(self, ref_logp, to_positions, mask, sign, pair_ids, normalizer=None):
        """(sign, 1 / n) per position: the rule reads the response's mean log-prob from the op's blocks."""
        n = resolve_normalizer(normalizer, pair_ids, mask)
        inv_n = torch.ones(sign.shape[0], dtype=torch.float32, device=sign.device) / n
        return to_positions(sign.float()), to_positions(inv_n)

    def describe(self) -> str:
        return f"lambda={self.lam} beta={self.beta} c_sft={self.sft_weight}"
