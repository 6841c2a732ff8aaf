"""BNF and ASFT losses on per-token log-probs, exactly as specified in METHODS.md.

Both functions take `[B, T]` per-token tensors (fp32) plus a `[B, T]` mask of scored tokens, a `[B]` sign
(+1 preferred, -1 dispreferred) and an optional `[B]` pair id (the two rows of a pair share an id >= 0,
unpaired rows carry -1). They return `(loss, metrics)`; `metrics` maps the METHODS.md names to detached
scalar means, and `metrics.counts[name]` says how many items (rows, pairs or tokens) each mean is over,
so a caller can combine micro-batches or processes exactly.

The batch normaliser n is (distinct pairs) + (unpaired rows): on paired data the loss is a mean over
pairs, on unpaired data a mean over responses. Callers that accumulate gradients over several
micro-batches may pass `normalizer=` to use the optimiser step's n instead of the micro-batch's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["bnf_loss", "asft_loss", "Metrics", "batch_normalizer", "LENGTH_NORMS"]

LENGTH_NORMS = ("sequence", "batch_min")
# Largest mean log-prob ASFT evaluates log(1 - pibar) at: pibar == 1 exactly would give log(0).
_ASFT_MAX_LBAR = -1e-6


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


def _check_inputs(mask, sign, pair_ids, *per_token):
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
        same, paired = _pair_structure(pair_ids)
        rows_per_id = same.sum(1)
        signs_per_id = (same * sign[None, :].to(same.dtype)).sum(1)
        bad = paired & ((rows_per_id != 2) | (signs_per_id != 0))
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"pair id {int(pair_ids[row])} (row {row}) must tie exactly one +1 row to one -1 row; "
                f"it has {int(rows_per_id[row])} rows with signs summing to {int(signs_per_id[row])}"
            )


def _pair_structure(pair_ids: torch.Tensor):
    """`same[i, j]` = rows i and j belong to one pair; `paired[i]` = row i is in some pair."""
    paired = pair_ids >= 0
    same = (pair_ids[:, None] == pair_ids[None, :]) & paired[:, None] & paired[None, :]
    return same.to(torch.float32), paired


def batch_normalizer(pair_ids: torch.Tensor | None, batch_size: int, device=None) -> torch.Tensor:
    """n = (number of distinct pairs) + (number of unpaired rows), computed without a host sync."""
    if pair_ids is None:
        return torch.tensor(float(batch_size), device=device)
    same, paired = _pair_structure(pair_ids)
    # A paired row contributes 1 / (rows sharing its id), so each pair adds up to exactly 1.
    per_row = torch.where(paired, 1.0 / same.sum(1).clamp(min=1), torch.ones_like(same[0]))
    return per_row.sum()


def _pair_margins(values: torch.Tensor, sign: torch.Tensor, pair_ids: torch.Tensor | None, nonempty: torch.Tensor):
    """For each chosen row in a pair: its value minus its rejected partner's, and which rows count
    (both responses of the pair must have scored tokens)."""
    if pair_ids is None:
        return values, torch.zeros_like(values, dtype=torch.bool)
    same, paired = _pair_structure(pair_ids)
    partner = same * (sign < 0).to(same.dtype)[None, :]
    partner_rejected = (partner * values[None, :]).sum(1)
    partner_nonempty = (partner * nonempty.to(same.dtype)[None, :]).sum(1) > 0
    return values - partner_rejected, paired & (sign > 0) & nonempty & partner_nonempty


def _resolve_normalizer(normalizer, pair_ids, mask):
    """The batch's n (at least 1, for a batch of no rows), or the caller's value as given (must be > 0)."""
    if normalizer is None:
        return batch_normalizer(pair_ids, mask.shape[0], mask.device).clamp(min=1)
    return torch.as_tensor(normalizer, dtype=torch.float32, device=mask.device)


def _add_preference_metrics(metrics: Metrics, rewards, logps, sign, pair_ids, nonempty):
    """Row metrics over responses with scored tokens; pair metrics over pairs whose both rows have some."""
    chosen, rejected = (sign > 0) & nonempty, (sign < 0) & nonempty
    metrics.add_mean("rewards/chosen", rewards, chosen)
    metrics.add_mean("rewards/rejected", rewards, rejected)
    margins, has_pair = _pair_margins(rewards, sign, pair_ids, nonempty)
    metrics.add_mean("rewards/margins", margins, has_pair)
    metrics.add_mean("rewards/accuracies", (margins > 0).float(), has_pair)
    metrics.add_mean("logps/chosen", logps, chosen)
    metrics.add_mean("logps/rejected", logps, rejected)


def bnf_token_weight(logp: torch.Tensor, ref_logp: torch.Tensor):
    """(q, c, w) per token: the target's label mass q, the spread factor c, and w = dg/dl = q - c * p_y."""
    p_y = logp.exp()
    q = torch.clamp(p_y / (ref_logp.exp() + 1e-6), max=1.0)
    c = (1.0 - q + 1e-6) / (1.0 - p_y + 1e-6)
    return q, c, q - c * p_y


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
    (`kernels.token_logprobs(..., grad_rule=bnf_grad_rule.BNF_GRAD_RULE, grad_inputs=...)`) builds the
    gradient from it during the forward.
    """
    if length_norm not in LENGTH_NORMS:
        raise ValueError(f"length_norm must be one of {LENGTH_NORMS}, got {length_norm!r}")
    lengths = mask.bool().sum(1).float()
    n = _resolve_normalizer(normalizer, pair_ids, mask)
    return -sign.float() / (bnf_length_normalizer(lengths, length_norm) * n)


def bnf_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
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
        ref_logps: `[B, T]` reference model log-probs of the same tokens.
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
    _check_inputs(mask, sign, pair_ids, policy_logps, ref_logps, neg_entropy)
    scored = mask.bool()
    zero = torch.zeros_like(policy_logps)
    # Unscored positions may hold anything (padding, -inf): keep them out of every expression.
    logp = torch.where(scored, policy_logps.float(), zero)
    ref = torch.where(scored, ref_logps.float(), zero).detach()
    neg_ent = torch.where(scored, neg_entropy.float(), zero).detach()

    with torch.no_grad():
        q, c, weight = bnf_token_weight(logp.detach(), ref)
        p_y = logp.detach().exp()
    score = q * logp + c * (neg_ent - p_y * logp)

    lengths = scored.sum(1).float()
    seq_score = torch.where(scored, score, zero).sum(1) / bnf_length_normalizer(lengths, length_norm)
    n = _resolve_normalizer(normalizer, pair_ids, mask)
    loss = -(sign.float() * seq_score).sum() / n

    metrics = Metrics()
    rewards = torch.where(scored, logp - ref, zero).sum(1)
    _add_preference_metrics(metrics, rewards, logp.sum(1), sign, pair_ids, lengths > 0)
    chosen_tok = scored & (sign > 0)[:, None]
    rejected_tok = scored & (sign < 0)[:, None]
    metrics.add_mean("bnf/weight_chosen", weight, chosen_tok)
    metrics.add_mean("bnf/weight_rejected", weight, rejected_tok)
    metrics.add_mean("bnf/clipped_frac_chosen", (q < 1).float(), chosen_tok)
    metrics.add_mean("bnf/clipped_frac_rejected", (q < 1).float(), rejected_tok)
    return loss, metrics


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
    _check_inputs(mask, sign, pair_ids, policy_logps)
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
    n = _resolve_normalizer(normalizer, pair_ids, mask)
    loss = (sft_weight * nll.sum() + lam * align.sum()) / n

    # The two terms as means over this batch's own n (whatever normaliser the loss used), so that
    # micro-batches combine exactly: loss = sft_weight * nll_loss + lam * align_loss when n is the batch's.
    metrics = Metrics()
    n_batch = _resolve_normalizer(None, pair_ids, mask).detach()
    metrics["asft/nll_loss"] = nll.sum().detach() / n_batch
    metrics.counts["asft/nll_loss"] = n_batch
    metrics["asft/align_loss"] = align.sum().detach() / n_batch
    metrics.counts["asft/align_loss"] = n_batch
    _add_preference_metrics(metrics, beta * lbar, lbar, sign, pair_ids, nonempty)
    odds_margin, has_pair = _pair_margins(log_odds, sign, pair_ids, nonempty)
    metrics.add_mean("log_odds_chosen", odds_margin, has_pair)
    return loss, metrics
