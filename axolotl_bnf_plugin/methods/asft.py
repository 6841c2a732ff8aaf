"""ASFT, Aligned Supervised Fine-Tuning (Wang et al., arXiv 2409.10571): its keys and math. Reference-free.

Each response is scored by its length-normalised log-likelihood lbar; a preferred response adds an NLL
term, and every response an alignment term on its log-odds r = log(pibar / (1 - pibar)) (METHODS.md). The
gradient depends on sequence-level values, so the fused op runs its two-pass schedule.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field

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


@register
@dataclass(frozen=True)
class ASFT(Method):
    """ASFT on the fused op's per-token log-probs (two-pass: no gradient rule)."""

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

    def describe(self) -> str:
        return f"lambda={self.lam} beta={self.beta} c_sft={self.sft_weight}"
