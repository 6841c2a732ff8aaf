"""BNF, Bidirectional Negative Feedback (Mao et al., arXiv 2410.04834, ICLR 2025): its keys, math and rule.

Per token, the target puts q = min(p_y / p_ref, 1) on the label and spreads the rest over the policy's own
distribution; the loss is the signed cross-entropy against that target (docs/methods.md). It needs the initial
policy's log-prob of every scored token (`ref_logp`). Its gradient w.r.t. a token's label log-prob is
`token_scale * w(logp, ref_logp)`, with the per-response `token_scale` (`bnf_response_scale`) and
|w| <= 1 (`bnf_token_weight`) both fixed before the forward, so the fused op can build it in the forward
pass: `BNF_GRAD_RULE`, registered as "bnf", with `grad_inputs = (ref_logp, token_scale)`:

    token_logprobs(hidden, weight, labels, grad_rule=BNF_GRAD_RULE, grad_inputs=(ref_logp, token_scale))
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, Field

from ..kernels.grad_rules import GradRule, register_grad_rule
from .base import Method, option
from .common import Metrics, add_preference_metrics, check_inputs, resolve_normalizer
from .registry import register

__all__ = ["BNF", "BNF_GRAD_RULE", "LENGTH_NORMS", "bnf_loss", "bnf_response_scale", "bnf_token_weight"]

LENGTH_NORMS = ("sequence", "batch_min")


class BNFOptions(BaseModel):
    """BNF's config keys."""

    bnf_length_norm: Literal[LENGTH_NORMS] = Field(
        default="sequence",
        json_schema_extra={
            "description": "BNF sequence normaliser: each response's own length (the paper) or the "
            "shortest response in the micro-batch (the authors' released code)."
        },
    )


_LOG_EPS = math.log(1e-6)


def bnf_token_weight(logp: torch.Tensor, ref_logp: torch.Tensor):
    """(q, c, w) per token: the target's label mass q, the spread factor c, and w = dg/dl = q - c * p_y.

    With q = min(p_y / (p_ref + 1e-6), 1) and c = (1 - q + 1e-6) / (1 - p_y + 1e-6), evaluated from the
    log-probs: 1 - p_y as -expm1(l) and 1 - q as -expm1(log q). Computed as 1 - exp(l), a confident token
    (p_y > 1 - 1e-6, common among template and easy tokens) would lose most of 1 - p_y to the rounding of
    p_y, and one ulp of p_y would move w by several percent.
    """
    log_q = torch.clamp(logp - torch.logaddexp(ref_logp, torch.full_like(ref_logp, _LOG_EPS)), max=0.0)
    q = log_q.exp()
    c = (1e-6 - torch.expm1(log_q)) / (1e-6 - torch.expm1(logp))
    return q, c, q - c * logp.exp()


def bnf_length_normalizer(lengths: torch.Tensor, length_norm: str) -> torch.Tensor:
    """Each response's divisor: its own scored length, or the micro-batch's shortest non-empty one."""
    if length_norm == "sequence":
        return lengths.clamp(min=1)
    nonempty = lengths > 0
    shortest = torch.where(nonempty, lengths, torch.full_like(lengths, float("inf"))).min()
    return torch.where(nonempty.any(), shortest, torch.ones_like(shortest)).expand_as(lengths)


def bnf_response_scale(mask, sign, pair_ids=None, length_norm: str = "sequence", normalizer=None) -> torch.Tensor:
    """`[B]` d loss / d (a token's weighted score) for each response: -sign / (length normaliser * n).

    BNF's gradient w.r.t. a token's label log-prob is this times the token's `w`; the single-pass op
    (`kernels.token_logprobs(..., grad_rule=BNF_GRAD_RULE, grad_inputs=(ref_logp, token_scale))`) builds
    the gradient from it during the forward.
    """
    if length_norm not in LENGTH_NORMS:
        raise ValueError(f"length_norm must be one of {LENGTH_NORMS}, got {length_norm!r}")
    lengths = mask.bool().sum(1).float()
    n = resolve_normalizer(normalizer, pair_ids, mask)
    return -sign.float() / (bnf_length_normalizer(lengths, length_norm) * n)


def bnf_loss(
    policy_logps: torch.Tensor,
    ref_logp: torch.Tensor,
    neg_entropy: torch.Tensor,
    mask: torch.Tensor,
    sign: torch.Tensor,
    pair_ids: torch.Tensor | None = None,
    length_norm: str = "sequence",
    *,
    normalizer: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Bidirectional Negative Feedback loss (Mao et al., arXiv 2410.04834).

    Per token, the target puts q = min(p_y / (p_ref + 1e-6), 1) on the label and spreads the rest in
    proportion to the policy's own (stop-gradient) distribution; the score g_t is the cross-entropy
    against that target, `g_t = q * l_t + c * (E_t - sg(p_y) * l_t)`. Only `policy_logps` carries a
    gradient, and `dg_t / dl_t = w_t = q - c * p_y`, which is what makes the loss a weighted CE.

    Args:
        policy_logps: `[B, T]` policy log-prob of each label token (differentiable).
        ref_logp: `[B, T]` the initial policy's (reference's) log-probs of the same tokens.
        neg_entropy: `[B, T]` `sum_v p_v log p_v` of the policy at each token (value only).
        mask: `[B, T]` 1 on scored (completion) tokens.
        sign: `[B]` +1 preferred, -1 dispreferred.
        pair_ids: `[B]` pair id per row (-1 = unpaired); None = every row unpaired.
        length_norm: "sequence" (divide by the row's own length) or "batch_min" (by the shortest
            non-empty response in the micro-batch, as the authors' released code does).
        normalizer: overrides n (e.g. the pair count of a whole optimiser step).
    """
    if length_norm not in LENGTH_NORMS:
        raise ValueError(f"length_norm must be one of {LENGTH_NORMS}, got {length_norm!r}")
    check_inputs(mask, sign, pair_ids, policy_logps, ref_logp, neg_entropy)
    scored = mask.bool()
    zero = torch.zeros_like(policy_logps)
    # Unscored positions may hold anything (padding, -inf): keep them out of every expression.
    logp = torch.where(scored, policy_logps.float(), zero)
    ref = torch.where(scored, ref_logp.float(), zero).detach()
    neg_ent = torch.where(scored, neg_entropy.float(), zero).detach()

    with torch.no_grad():
        q, c, weight = bnf_token_weight(logp.detach(), ref)
        p_y = logp.detach().exp()
    score = q * logp + c * (neg_ent - p_y * logp)

    lengths = scored.sum(1).float()
    seq_score = torch.where(scored, score, zero).sum(1) / bnf_length_normalizer(lengths, length_norm)
    n = resolve_normalizer(normalizer, pair_ids, mask)
    loss = -(sign.float() * seq_score).sum() / n

    metrics = Metrics()
    rewards = torch.where(scored, logp - ref, zero).sum(1)
    add_preference_metrics(metrics, rewards, logp.sum(1), sign, pair_ids, lengths > 0)
    chosen_tok = scored & (sign > 0)[:, None]
    rejected_tok = scored & (sign < 0)[:, None]
    metrics.add_mean("bnf/weight_chosen", weight, chosen_tok)
    metrics.add_mean("bnf/weight_rejected", weight, rejected_tok)
    # q < 1 exactly where the policy is below the reference: the feedback there is damped, not clipped.
    metrics.add_mean("bnf/below_ref_frac_chosen", (q < 1).float(), chosen_tok)
    metrics.add_mean("bnf/below_ref_frac_rejected", (q < 1).float(), rejected_tok)
    return loss, metrics


def _grad(logp: torch.Tensor, ref_logp: torch.Tensor, token_scale: torch.Tensor) -> torch.Tensor:
    return token_scale * bnf_token_weight(logp, ref_logp)[2]


def _bound(ref_logp: torch.Tensor, token_scale: torch.Tensor) -> torch.Tensor:
    return token_scale.abs()  # |w| <= 1: q and c * p_y both lie in [0, 1]


BNF_GRAD_RULE = register_grad_rule(GradRule("bnf", grad=_grad, bound=_bound))


@register
@dataclass(frozen=True)
class BNF(Method):
    """BNF on the fused op: the loss above, and its gradient built in the forward (`BNF_GRAD_RULE`)."""

    name = "bnf"
    paper = "BNF: Bidirectional Negative Feedback (Mao et al., arXiv 2410.04834, ICLR 2025)"
    formula = ("L = -(1/n) sum_i s_i (1/N_i) sum_t [q_t l_t + c_t (E_t - sg(p_t) l_t)],  q = min(p/p_ref, 1), "
               "c = (1-q)/(1-p)")
    needs_ref_logps = True
    grad_rule = BNF_GRAD_RULE
    options = BNFOptions
    metrics = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
               "logps/rejected", "bnf/weight_chosen", "bnf/weight_rejected", "bnf/below_ref_frac_chosen",
               "bnf/below_ref_frac_rejected")

    length_norm: str = option(BNFOptions, "bnf_length_norm")

    def loss(self, logp, ref_logp, neg_entropy, mask, sign, pair_ids=None, *, normalizer=None):
        return bnf_loss(logp, ref_logp, neg_entropy, mask, sign, pair_ids, self.length_norm, normalizer=normalizer)

    def grad_scale(self, mask, sign, pair_ids, normalizer=None):
        return bnf_response_scale(mask, sign, pair_ids, self.length_norm, normalizer)

    def describe(self) -> str:
        return f"length norm: {self.length_norm}"
