"""BNF and ASFT losses against a naive, loop-by-loop transcription of docs/methods.md.

The reference implementations below deliberately do not share code with `axolotl_bnf_plugin.methods`:
they walk rows and tokens in Python, build BNF's target distribution Q over the whole vocabulary from
full logits, and compute everything in float64. The implementation is fed per-token log-probs derived
from the same logits, so its gradient w.r.t. the logits can be compared with (a) the naive loss's
autograd gradient and (b) the closed forms stated in docs/methods.md.
"""
from __future__ import annotations

import math

import pytest
import torch

from axolotl_bnf_plugin.methods.asft import asft_loss
from axolotl_bnf_plugin.methods.bnf import bnf_loss

EPS = 1e-6  # the two 1e-6 constants in docs/methods.md's definition of q and c
ASFT_LBAR_CAP = -1e-6  # documented in asft_loss: log(1 - pibar) is evaluated at min(lbar, -1e-6)

PREFERENCE_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                      "logps/chosen", "logps/rejected")
BNF_METRICS = PREFERENCE_METRICS + ("bnf/weight_chosen", "bnf/weight_rejected", "bnf/below_ref_frac_chosen",
                                    "bnf/below_ref_frac_rejected")
ASFT_METRICS = ("asft/nll_loss", "asft/align_loss") + PREFERENCE_METRICS + ("log_odds_chosen",)


# --------------------------------------------------------------------------------------------------
# Random batches
# --------------------------------------------------------------------------------------------------

# Each layout: (pair_ids or None, signs or None). None signs = drawn at random (both signs present).
# For paired rows the sign is drawn per pair (one +1 and one -1, in random order within the pair).
LAYOUTS = {
    # two rows per id, ids neither contiguous nor sorted, partners not adjacent
    "paired": ([7, 2, 11, 7, 2, 11], None),
    "unpaired_none": (None, None),
    "unpaired_minus1": ([-1, -1, -1, -1, -1], None),
    "mixed": ([4, -1, 0, -1, 4, 0, -1], None),
    "sft_only": (None, [1, 1, 1, 1]),
    "single_pair": ([3, 3], None),
}


def make_batch(layout: str, seed: int, T: int = 7, V: int = 11):
    """Random logits, reference logits, labels, a ragged mask (with one all-zero row), sign, pair ids."""
    pair_list, sign_list = LAYOUTS[layout]
    g = torch.Generator().manual_seed(seed)
    B = len(pair_list) if pair_list is not None else (len(sign_list) if sign_list is not None else 5)

    if sign_list is not None:
        sign = torch.tensor(sign_list, dtype=torch.long)
    else:
        sign = torch.where(torch.rand(B, generator=g) < 0.5, 1, -1)
        if pair_list is not None:
            ids = torch.tensor(pair_list)
            for pid in set(pair_list) - {-1}:
                rows = (ids == pid).nonzero().flatten().tolist()
                first = 1 if torch.rand(1, generator=g).item() < 0.5 else -1
                sign[rows[0]], sign[rows[1]] = first, -first
        unpaired = [i for i in range(B) if pair_list is None or pair_list[i] < 0]
        if pair_list is None:  # make sure both signs occur
            sign[0], sign[1] = 1, -1
        elif len(unpaired) >= 2:
            sign[unpaired[0]], sign[unpaired[1]] = 1, -1
    pair_ids = None if pair_list is None else torch.tensor(pair_list, dtype=torch.long)

    z = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2.0)
    z_ref = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2.0)
    labels = torch.randint(0, V, (B, T), generator=g)
    # Make some tokens likely under the policy so both clipped and unclipped BNF tokens occur.
    boost = torch.rand(B, T, generator=g) < 0.4
    z.scatter_add_(2, labels[..., None], (boost.double() * 6.0)[..., None])

    mask = torch.zeros(B, T, dtype=torch.long)
    for i in range(B):
        start = int(torch.randint(0, 3, (1,), generator=g))
        length = int(torch.randint(1, T - start + 1, (1,), generator=g))
        mask[i, start : start + length] = 1
    empty_row = 1 if B > 2 else None  # an all-zero-mask row (kept out of tiny batches)
    if empty_row is not None:
        mask[empty_row] = 0
    return dict(z=z, z_ref=z_ref, labels=labels, mask=mask, sign=sign, pair_ids=pair_ids)


def token_inputs(z, labels, z_ref):
    """What a caller feeds the losses: per-token policy log-probs (differentiable), ref log-probs, -entropy."""
    logp_full = torch.log_softmax(z, dim=-1)
    logps = logp_full.gather(-1, labels[..., None]).squeeze(-1)
    ref_logps = torch.log_softmax(z_ref, dim=-1).gather(-1, labels[..., None]).squeeze(-1)
    neg_entropy = (logp_full.exp() * logp_full).sum(-1).detach()
    return logps, ref_logps.detach(), neg_entropy


# --------------------------------------------------------------------------------------------------
# Naive transcriptions of docs/methods.md
# --------------------------------------------------------------------------------------------------

def naive_n(sign, pair_ids):
    """n = (number of distinct pairs) + (number of unpaired responses)."""
    if pair_ids is None:
        return len(sign)
    ids = pair_ids.tolist()
    return len({i for i in ids if i >= 0}) + sum(1 for i in ids if i < 0)


def naive_pairs(sign, pair_ids):
    """[(chosen_row, rejected_row)] for every pair."""
    if pair_ids is None:
        return []
    out = []
    ids = pair_ids.tolist()
    for pid in sorted({i for i in ids if i >= 0}):
        rows = [r for r, i in enumerate(ids) if i == pid]
        chosen = [r for r in rows if sign[r] > 0]
        rejected = [r for r in rows if sign[r] < 0]
        out.append((chosen[0], rejected[0]))
    return out


def naive_bnf(z_leaf, labels, z_ref, mask, sign, pair_ids, length_norm):
    """BNF exactly as written: explicit Q over the vocabulary, g_t = sum_v Q_v log p_v, loops everywhere.

    Returns (loss tensor differentiable w.r.t. z_leaf, expected metric items, per-token w and q).
    """
    B, T, V = z_leaf.shape
    lengths = [int(mask[i].sum()) for i in range(B)]
    nonempty = [L for L in lengths if L > 0]
    n = naive_n(sign, pair_ids)
    total = z_leaf.new_zeros(())
    w_tok = torch.zeros(B, T, dtype=torch.float64)
    q_tok = torch.ones(B, T, dtype=torch.float64)
    rewards, logps_sum = [], []
    for i in range(B):
        if length_norm == "sequence":
            N_i = lengths[i]
        else:
            N_i = min(nonempty) if nonempty else 1
        S_i = z_leaf.new_zeros(())
        reward_i, logp_i = 0.0, 0.0
        for t in range(T):
            if not mask[i, t]:
                continue
            y = int(labels[i, t])
            log_p = torch.log_softmax(z_leaf[i, t], dim=-1)
            p = log_p.detach().exp()
            p_y = float(p[y])
            p_ref = float(torch.softmax(z_ref[i, t], dim=-1)[y])
            q = min(p_y / (p_ref + EPS), 1.0)
            c = (1.0 - q + EPS) / (1.0 - p_y + EPS)
            Q = c * p.clone()
            Q[y] = q
            S_i = S_i + (Q * log_p).sum()  # Q is a constant (stop-gradient)
            w_tok[i, t] = q - c * p_y
            q_tok[i, t] = q
            reward_i += math.log(p_y) - math.log(p_ref)
            logp_i += float(log_p[y].detach())
        if lengths[i] > 0:
            S_i = S_i / N_i
        total = total + int(sign[i]) * S_i
        rewards.append(reward_i)
        logps_sum.append(logp_i)
    loss = -total / n

    # Rows with no scored tokens are left out of every metric (they have no response to measure).
    chosen = [i for i in range(B) if sign[i] > 0 and lengths[i] > 0]
    rejected = [i for i in range(B) if sign[i] < 0 and lengths[i] > 0]
    pairs = [(c, r) for c, r in naive_pairs(sign, pair_ids) if lengths[c] > 0 and lengths[r] > 0]
    margins = [rewards[c] - rewards[r] for c, r in pairs]

    def tok(rows, values):
        return [float(values[i, t]) for i in rows for t in range(T) if mask[i, t]]

    items = {
        "rewards/chosen": [rewards[i] for i in chosen],
        "rewards/rejected": [rewards[i] for i in rejected],
        "rewards/margins": margins,
        "rewards/accuracies": [1.0 if m > 0 else 0.0 for m in margins],
        "logps/chosen": [logps_sum[i] for i in chosen],
        "logps/rejected": [logps_sum[i] for i in rejected],
        "bnf/weight_chosen": tok(chosen, w_tok),
        "bnf/weight_rejected": tok(rejected, w_tok),
        "bnf/below_ref_frac_chosen": [1.0 if v < 1 else 0.0 for v in tok(chosen, q_tok)],
        "bnf/below_ref_frac_rejected": [1.0 if v < 1 else 0.0 for v in tok(rejected, q_tok)],
    }
    return loss, items, w_tok


def naive_asft_row_terms(z_leaf, labels, mask, i):
    """lbar_i (differentiable) for one row.

    docs/methods.md leaves lbar undefined for |y| = 0; the implementation's convention is that such a row adds
    nothing to the loss and is left out of every metric (naive_asft skips it on count == 0). The layouts
    in LAYOUTS with more than two rows all contain one empty row.
    """
    T = z_leaf.shape[1]
    total = z_leaf.new_zeros(())
    count = 0
    for t in range(T):
        if mask[i, t]:
            total = total + torch.log_softmax(z_leaf[i, t], dim=-1)[int(labels[i, t])]
            count += 1
    return total / max(count, 1), count


def naive_log_odds(lbar):
    """r = log(pibar / (1 - pibar)), with log(1 - pibar) taken at min(lbar, -1e-6) as documented."""
    capped = torch.clamp(lbar, max=ASFT_LBAR_CAP)
    return torch.log(torch.exp(lbar)) - torch.log(1.0 - torch.exp(capped))


def naive_asft(z_leaf, labels, mask, sign, pair_ids, lam, beta, c_sft):
    B = z_leaf.shape[0]
    n = naive_n(sign, pair_ids)
    nll_sum = z_leaf.new_zeros(())
    align_sum = z_leaf.new_zeros(())
    lbars, rs = [], []
    nonempty = []
    for i in range(B):
        lbar, count = naive_asft_row_terms(z_leaf, labels, mask, i)
        r = naive_log_odds(lbar)
        lbars.append(lbar.item())
        rs.append(r.item())
        if count == 0:
            continue
        nonempty.append(i)
        if sign[i] > 0:
            nll_sum = nll_sum - lbar
            align_sum = align_sum - torch.log(torch.sigmoid(beta * r))
        else:
            align_sum = align_sum - torch.log(torch.sigmoid(-beta * r))
    loss = (c_sft * nll_sum + lam * align_sum) / n

    chosen = [i for i in nonempty if sign[i] > 0]
    rejected = [i for i in nonempty if sign[i] < 0]
    pairs = [(c, r) for c, r in naive_pairs(sign, pair_ids) if c in nonempty and r in nonempty]
    margins = [beta * lbars[c] - beta * lbars[r] for c, r in pairs]
    items = {
        "rewards/chosen": [beta * lbars[i] for i in chosen],
        "rewards/rejected": [beta * lbars[i] for i in rejected],
        "rewards/margins": margins,
        "rewards/accuracies": [1.0 if m > 0 else 0.0 for m in margins],
        "logps/chosen": [lbars[i] for i in chosen],
        "logps/rejected": [lbars[i] for i in rejected],
        "log_odds_chosen": [rs[c] - rs[r] for c, r in pairs],
    }
    scalars = {"asft/nll_loss": (nll_sum.item() / n, n), "asft/align_loss": (align_sum.item() / n, n)}
    return loss, items, scalars, lbars, rs


def check_metrics(metrics, items, names, scalars=None, rtol=1e-5, atol=1e-5):
    assert set(names) <= set(metrics), f"missing metrics: {set(names) - set(metrics)}"
    for name, values in items.items():
        got = metrics[name]
        assert got.dim() == 0 and not got.requires_grad, name
        assert int(metrics.counts[name]) == len(values), (name, int(metrics.counts[name]), len(values))
        if values:
            expected = sum(values) / len(values)
            assert float(got) == pytest.approx(expected, rel=rtol, abs=atol), name
    for name, (value, count) in (scalars or {}).items():
        assert float(metrics[name]) == pytest.approx(value, rel=rtol, abs=atol), name
        assert float(metrics.counts[name]) == pytest.approx(count), name


# --------------------------------------------------------------------------------------------------
# BNF: value, metrics and gradients
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("length_norm", ["sequence", "batch_min"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("seed", [0, 1])
def test_bnf_matches_naive_transcription(layout, length_norm, seed):
    torch.manual_seed(seed)
    b = make_batch(layout, seed=100 + seed)
    z = b["z"].clone().requires_grad_(True)
    logps, ref_logps, neg_entropy = token_inputs(z, b["labels"], b["z_ref"])
    loss, metrics = bnf_loss(logps, ref_logps, neg_entropy, b["mask"], b["sign"], b["pair_ids"], length_norm)
    loss.backward()

    z_naive = b["z"].clone().requires_grad_(True)
    naive_loss, items, w_tok = naive_bnf(z_naive, b["labels"], b["z_ref"], b["mask"], b["sign"], b["pair_ids"], length_norm)
    naive_loss.backward()

    assert loss.dim() == 0
    assert loss.item() == pytest.approx(naive_loss.item(), rel=1e-5, abs=1e-6)
    check_metrics(metrics, items, BNF_METRICS)
    # The full-vocabulary cross-entropy against Q has the same gradient as the implementation.
    torch.testing.assert_close(z.grad, z_naive.grad, rtol=1e-4, atol=1e-7)

    # ... and both equal docs/methods.md's closed form (s_i m_t / (n N_i)) w_t (p - onehot(y)).
    B, T, V = z.shape
    mask = b["mask"].double()
    lengths = mask.sum(1)
    if length_norm == "sequence":
        N = lengths.clamp(min=1)
    else:
        N = torch.full_like(lengths, float(lengths[lengths > 0].min()))
    n = naive_n(b["sign"], b["pair_ids"])
    p = torch.softmax(b["z"], -1)
    onehot = torch.nn.functional.one_hot(b["labels"], V).double()
    coef = b["sign"].double()[:, None] * mask / (n * N[:, None]) * w_tok
    closed = coef[..., None] * (p - onehot)
    torch.testing.assert_close(z.grad, closed, rtol=1e-4, atol=1e-7)


def test_bnf_batch_min_uses_shortest_nonempty_row():
    """batch_min divides every row by min |y_j| over non-empty rows: scaling checked against 'sequence'."""
    torch.manual_seed(0)
    B, T = 4, 6
    logps = -torch.rand(B, T, dtype=torch.float64) * 3
    ref = -torch.rand(B, T, dtype=torch.float64) * 3
    ne = -torch.rand(B, T, dtype=torch.float64)
    mask = torch.zeros(B, T, dtype=torch.long)
    lengths = [5, 0, 2, 6]  # shortest non-empty = 2; the empty row must not make it 0
    for i, L in enumerate(lengths):
        mask[i, :L] = 1
    sign = torch.tensor([1, -1, -1, 1])
    # One row at a time (the others' contribution removed via their sign in a separate call).
    total_seq, total_min = 0.0, 0.0
    for i in range(B):
        if lengths[i] == 0:
            continue
        keep = torch.zeros(B, dtype=torch.bool)
        keep[i] = True
        m_i = mask * keep[:, None]
        l_seq, _ = bnf_loss(logps, ref, ne, m_i, sign, normalizer=1.0, length_norm="sequence")
        total_seq += l_seq.item() * lengths[i] / 2
    l_min, _ = bnf_loss(logps, ref, ne, mask, sign, normalizer=1.0, length_norm="batch_min")
    assert l_min.item() == pytest.approx(total_seq, rel=1e-5, abs=1e-7)


# --------------------------------------------------------------------------------------------------
# ASFT: value, metrics, gradients, identity
# --------------------------------------------------------------------------------------------------

ASFT_HPARAMS = [(1.0, 1.0, 1.0), (0.5, 2.0, 0.3), (2.0, 0.5, 0.0), (0.0, 1.0, 1.0)]


@pytest.mark.parametrize("lam,beta,c_sft", ASFT_HPARAMS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_asft_matches_naive_transcription(layout, lam, beta, c_sft):
    torch.manual_seed(0)
    b = make_batch(layout, seed=7)
    z = b["z"].clone().requires_grad_(True)
    logps, _, _ = token_inputs(z, b["labels"], b["z_ref"])
    loss, metrics = asft_loss(logps, b["mask"], b["sign"], b["pair_ids"], lam=lam, beta=beta, sft_weight=c_sft)
    loss.backward()

    z_naive = b["z"].clone().requires_grad_(True)
    naive_loss, items, scalars, lbars, rs = naive_asft(
        z_naive, b["labels"], b["mask"], b["sign"], b["pair_ids"], lam, beta, c_sft
    )
    naive_loss.backward()

    assert loss.item() == pytest.approx(naive_loss.item(), rel=1e-5, abs=1e-6)
    check_metrics(metrics, items, ASFT_METRICS, scalars)
    # loss = sft_weight * nll + lam * align
    assert loss.item() == pytest.approx(
        c_sft * float(metrics["asft/nll_loss"]) + lam * float(metrics["asft/align_loss"]), rel=1e-5, abs=1e-6
    )
    torch.testing.assert_close(z.grad, z_naive.grad, rtol=1e-4, atol=1e-7)

    # Closed form: dL/dz_t = (G_y / (n |y|)) m_t (onehot(y) - p), G_w / G_l from docs/methods.md
    # (docs/methods.md's G is per pair; the batch loss is averaged over n).
    B, T, V = z.shape
    n = naive_n(b["sign"], b["pair_ids"])
    mask = b["mask"].double()
    lengths = mask.sum(1)
    p = torch.softmax(b["z"], -1)
    onehot = torch.nn.functional.one_hot(b["labels"], V).double()
    closed = torch.zeros_like(z)
    for i in range(B):
        if lengths[i] == 0:
            continue
        r = rs[i]
        pibar = math.exp(lbars[i])
        sig = 1.0 / (1.0 + math.exp(-beta * r))
        if b["sign"][i] > 0:
            G = -c_sft - lam * beta * (1.0 - sig) / (1.0 - pibar)
        else:
            G = lam * beta * sig / (1.0 - pibar)
        closed[i] = (G / (n * lengths[i])) * mask[i, :, None] * (onehot[i] - p[i])
    torch.testing.assert_close(z.grad, closed, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0, 4.0])
def test_asft_paper_identity(lam):
    """beta = c_sft = 1: L = mean over pairs of -(1 + lam) lbar_w - lam log(1 - pibar_l)."""
    torch.manual_seed(3)
    P, T = 5, 8
    B = 2 * P
    logps = -torch.rand(B, T, dtype=torch.float64) * 4 - 0.01
    mask = (torch.rand(B, T) < 0.7).long()
    mask[:, 0] = 1
    perm = torch.randperm(B)
    pair_ids = torch.empty(B, dtype=torch.long)
    sign = torch.empty(B, dtype=torch.long)
    pair_ids[perm] = torch.arange(P).repeat_interleave(2) * 3 + 1
    sign[perm] = torch.tensor([1, -1]).repeat(P)
    loss, _ = asft_loss(logps, mask, sign, pair_ids, lam=lam, beta=1.0, sft_weight=1.0)

    lbar = (logps * mask).sum(1) / mask.sum(1)
    expected = 0.0
    for pid in pair_ids.unique().tolist():
        w = int(((pair_ids == pid) & (sign > 0)).nonzero())
        l = int(((pair_ids == pid) & (sign < 0)).nonzero())
        expected += -(1 + lam) * float(lbar[w]) - lam * math.log(1 - math.exp(float(lbar[l])))
    expected /= P
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_asft_unpaired_rows_follow_the_per_row_formula():
    """Desirable: -c lbar - lam log sig(beta r); undesirable: -lam log sig(-beta r); mean over rows."""
    lam, beta, c = 0.7, 1.5, 0.4
    logps = torch.tensor([[-0.3, -1.2, 0.0], [-2.0, -0.1, -5.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    sign = torch.tensor([1, -1])
    loss, _ = asft_loss(logps, mask, sign, None, lam=lam, beta=beta, sft_weight=c)

    def r_of(lb):
        return lb - math.log(1 - math.exp(lb))

    def log_sig(x):
        return -math.log1p(math.exp(-x))

    lb0, lb1 = -0.75, -7.1 / 3
    expected = (-c * lb0 - lam * log_sig(beta * r_of(lb0)) - lam * log_sig(-beta * r_of(lb1))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


# --------------------------------------------------------------------------------------------------
# BNF behaviour table
# --------------------------------------------------------------------------------------------------

def _one_token_bnf(l, l_ref, s):
    logps = torch.tensor([[l]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[l_ref]], dtype=torch.float64)
    ne = torch.tensor([[-1.0]], dtype=torch.float64)
    loss, metrics = bnf_loss(logps, ref, ne, torch.ones(1, 1), torch.tensor([s]))
    loss.backward()
    name = "chosen" if s > 0 else "rejected"
    w = float(metrics[f"bnf/weight_{name}"])
    # dL/dl = -s w / (n N): the weight is also visible in the gradient w.r.t. the log-prob.
    assert float(logps.grad) == pytest.approx(-s * w, rel=1e-6, abs=1e-9)
    return w, float(metrics[f"bnf/below_ref_frac_{name}"])


@pytest.mark.parametrize("s", [1, -1])
@pytest.mark.parametrize("l,l_ref", [(-0.5, -1.0), (-3.0, -3.5), (-0.01, -2.0), (-6.0, -6.0 - 1e-3)])
def test_bnf_weight_is_one_when_policy_above_reference(s, l, l_ref):
    w, clipped = _one_token_bnf(l, l_ref, s)
    assert w == pytest.approx(1.0, abs=1e-4)  # preferred: plain SFT; dispreferred: plain negative CE
    assert clipped == 0.0


@pytest.mark.parametrize("l,l_ref", [(-2.0, -0.5), (-1.0, -0.9), (-4.0, -0.1)])
def test_bnf_preferred_below_reference_is_damped(l, l_ref):
    w, clipped = _one_token_bnf(l, l_ref, 1)
    assert 0.0 < w < 1.0
    assert clipped == 1.0
    p_y, p_ref = math.exp(l), math.exp(l_ref)
    q = p_y / (p_ref + EPS)
    assert w == pytest.approx(q - (1 - q + EPS) / (1 - p_y + EPS) * p_y, rel=1e-6)


@pytest.mark.parametrize("l,l_ref", [(-15.0, -1.0), (-25.0, -0.2), (-12.0, -3.0)])
def test_bnf_dispreferred_far_below_reference_stops_pushing(l, l_ref):
    w, clipped = _one_token_bnf(l, l_ref, -1)
    assert clipped == 1.0
    p_y, p_ref = math.exp(l), math.exp(l_ref)
    # w = q - c p_y with q = p_y / p_ref << 1 and c ~ 1, i.e. w ~ (p_y / p_ref)(1 - p_ref) <= p_y / p_ref ...
    assert w == pytest.approx(p_y / p_ref * (1 - p_ref), rel=1e-3)
    assert 0.0 <= w <= p_y / p_ref
    assert w < 1e-3  # ... -> 0: the likelihood cannot collapse


def test_bnf_weight_monotone_and_in_unit_interval():
    """w in [0, 1] (up to the 1e-6 smoothing), increasing in p_y up to p_ref, ~1 just above it."""
    K = 120
    l_ref = torch.full((1, K), -1.0, dtype=torch.float64)
    # below the reference (q < 1) up to the reference itself, then above it (q = 1)
    l = torch.cat([torch.linspace(-30.0, -1.0, K - 20), torch.linspace(-0.95, -0.05, 20)]).double()[None]
    ne = torch.full_like(l, -1.0)
    for s in (1, -1):
        ws = []
        for t in range(K):
            m = torch.zeros(1, K)
            m[0, t] = 1
            _, metrics = bnf_loss(l, l_ref, ne, m, torch.tensor([s]))
            ws.append(float(metrics["bnf/weight_chosen" if s > 0 else "bnf/weight_rejected"]))
        ws = torch.tensor(ws, dtype=torch.float64)
        assert (ws >= 0).all() and (ws <= 1).all()
        below = ws[: K - 20]
        assert (below[1:] > below[:-1]).all()  # strictly increasing while p_y < p_ref
        assert below[0] < 1e-9
        torch.testing.assert_close(ws[K - 21 :], torch.ones(21, dtype=torch.float64), rtol=0, atol=1e-4)


# --------------------------------------------------------------------------------------------------
# Extreme values
# --------------------------------------------------------------------------------------------------

def _extreme_batch(pol_value, ref_value, pad_value):
    B, T = 4, 5
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]])
    logps = torch.full((B, T), pol_value, dtype=torch.float32)
    ref = torch.full((B, T), ref_value, dtype=torch.float32)
    ne = torch.full((B, T), -1.0 if pol_value < 0 else 0.0, dtype=torch.float32)
    for t in (logps, ref, ne):
        t[mask == 0] = pad_value
    logps.requires_grad_(True)
    sign = torch.tensor([1, -1, 1, -1])
    return logps, ref, ne, mask, sign


@pytest.mark.parametrize("pad_value", [float("-inf"), float("nan"), 0.0])
@pytest.mark.parametrize("pol_value,ref_value", [(-1e4, -1e4), (-1e4, 0.0), (0.0, -1e4), (0.0, 0.0), (-1e-9, -30.0)])
@pytest.mark.parametrize("which", ["bnf_sequence", "bnf_batch_min", "asft", "asft_tempered"])
def test_extreme_values_stay_finite(which, pol_value, ref_value, pad_value):
    logps, ref, ne, mask, sign = _extreme_batch(pol_value, ref_value, pad_value)
    for pair_ids in (None, torch.tensor([0, 0, 5, 5])):
        logps.grad = None
        if which.startswith("bnf"):
            loss, metrics = bnf_loss(logps, ref, ne, mask, sign, pair_ids, which.split("_", 1)[1])
        elif which == "asft":
            loss, metrics = asft_loss(logps, mask, sign, pair_ids)
        else:
            loss, metrics = asft_loss(logps, mask, sign, pair_ids, lam=3.0, beta=5.0, sft_weight=0.2)
        loss.backward()
        assert torch.isfinite(loss), loss
        assert torch.isfinite(logps.grad).all(), logps.grad
        assert (logps.grad[mask == 0] == 0).all()
        for name, value in metrics.items():
            assert torch.isfinite(value), (name, value)


@pytest.mark.parametrize("pad_value", [float("-inf"), float("nan")])
def test_all_masked_batch(pad_value):
    B, T = 3, 4
    logps = torch.full((B, T), pad_value, requires_grad=True)
    ref = torch.full((B, T), pad_value)
    mask = torch.zeros(B, T)
    sign = torch.tensor([1, -1, 1])
    for pair_ids in (None, torch.tensor([2, 2, -1])):
        for norm in ("sequence", "batch_min"):
            logps.grad = None
            loss, metrics = bnf_loss(logps, ref, ref, mask, sign, pair_ids, norm)
            loss.backward()
            assert loss.item() == 0.0  # every S_i is an empty sum
            assert (logps.grad == 0).all()
            assert all(torch.isfinite(v) for v in metrics.values())
            assert int(metrics.counts["bnf/weight_chosen"]) == 0
        logps.grad = None
        loss, metrics = asft_loss(logps, mask, sign, pair_ids)
        loss.backward()
        assert torch.isfinite(loss)
        assert (logps.grad == 0).all()
        assert all(torch.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("which", ["bnf", "asft"])
def test_saturated_logits_give_finite_grads(which):
    """Logits with a 1e4 spread: l is exactly 0 or around -2e4; gradient w.r.t. the logits stays finite."""
    torch.manual_seed(0)
    B, T, V = 4, 3, 6
    z = (torch.randint(-1, 2, (B, T, V)).float() * 1e4).requires_grad_(True)
    z_ref = torch.randint(-1, 2, (B, T, V)).float() * 1e4
    labels = torch.randint(0, V, (B, T))
    logps, ref, ne = token_inputs(z, labels, z_ref)
    mask = torch.ones(B, T)
    sign = torch.tensor([1, -1, 1, -1])
    pair_ids = torch.tensor([0, 0, 1, 1])
    if which == "bnf":
        loss, metrics = bnf_loss(logps, ref, ne, mask, sign, pair_ids)
    else:
        loss, metrics = asft_loss(logps, mask, sign, pair_ids, lam=2.0, beta=3.0)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(z.grad).all()
    assert all(torch.isfinite(v) for v in metrics.values())


# --------------------------------------------------------------------------------------------------
# Normaliser override
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("normalizer", [1.0, 3.0, 17.5, torch.tensor(9.0)])
@pytest.mark.parametrize("which", ["bnf", "asft"])
def test_normalizer_override(which, normalizer):
    b = make_batch("mixed", seed=5)
    n_default = naive_n(b["sign"], b["pair_ids"])

    def run(**kw):
        z = b["z"].clone().requires_grad_(True)
        logps, ref, ne = token_inputs(z, b["labels"], b["z_ref"])
        if which == "bnf":
            loss, metrics = bnf_loss(logps, ref, ne, b["mask"], b["sign"], b["pair_ids"], **kw)
        else:
            loss, metrics = asft_loss(logps, b["mask"], b["sign"], b["pair_ids"], lam=0.5, **kw)
        loss.backward()
        return loss, metrics, z.grad

    loss0, m0, g0 = run()
    loss1, m1, g1 = run(normalizer=normalizer)
    k = float(normalizer)
    assert loss1.item() == pytest.approx(loss0.item() * n_default / k, rel=1e-6)
    torch.testing.assert_close(g1, g0 * n_default / k, rtol=1e-6, atol=1e-12)
    # Metrics describe the batch itself whatever normaliser the loss uses (an optimiser step's n under
    # gradient accumulation), so micro-batches still combine into exact means.
    for name in m0:
        assert float(m1[name]) == pytest.approx(float(m0[name]), rel=1e-6, abs=1e-9), name
        assert float(m1.counts[name]) == pytest.approx(float(m0.counts[name])), name
    if which == "asft":
        assert float(m0.counts["asft/nll_loss"]) == pytest.approx(n_default)


# --------------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------------

def _valid(B=4, T=3):
    torch.manual_seed(0)
    logps = -torch.rand(B, T)
    return dict(logps=logps, ref=-torch.rand(B, T), ne=-torch.rand(B, T), mask=torch.ones(B, T),
                sign=torch.tensor([1, -1, 1, -1]), pair_ids=torch.tensor([0, 0, 1, 1]))


def _call(which, d, **kw):
    if which == "bnf":
        return bnf_loss(d["logps"], d["ref"], d["ne"], d["mask"], d["sign"], d["pair_ids"], **kw)
    return asft_loss(d["logps"], d["mask"], d["sign"], d["pair_ids"], **kw)


@pytest.mark.parametrize("which", ["bnf", "asft"])
def test_valid_inputs_accepted(which):
    _call(which, _valid())


@pytest.mark.parametrize("which", ["bnf", "asft"])
@pytest.mark.parametrize("bad_sign", [[1, 0, 1, -1], [1, -1, 2, -1], [1.0, -1.0, 0.5, -1.0], [-2, -1, 1, 1]])
def test_bad_sign_raises(which, bad_sign):
    d = _valid()
    d["sign"] = torch.tensor(bad_sign)
    d["pair_ids"] = None
    with pytest.raises(ValueError):
        _call(which, d)


@pytest.mark.parametrize("which", ["bnf", "asft"])
@pytest.mark.parametrize(
    "pair_ids,sign",
    [
        ([0, 0, 0, -1], [1, -1, 1, -1]),  # an id used by three rows
        ([0, 0, 1, 1], [1, 1, -1, -1]),  # two rows of the same sign share an id
        ([0, 0, 1, 1], [-1, -1, 1, 1]),
        ([4, 4, 4, 4], [1, -1, 1, -1]),  # four rows, balanced signs, still not a pair
        ([0, 0, 3, -1], [1, -1, 1, -1]),  # an id >= 0 with a single row
    ],
)
def test_malformed_pair_ids_raise(which, pair_ids, sign):
    d = _valid()
    d["pair_ids"] = torch.tensor(pair_ids)
    d["sign"] = torch.tensor(sign)
    with pytest.raises(ValueError):
        _call(which, d)


@pytest.mark.parametrize(
    "which,field",
    [("bnf", f) for f in ("logps", "ref", "ne", "mask", "sign", "pair_ids", "mask_1d")]
    + [("asft", f) for f in ("logps", "mask", "sign", "pair_ids", "mask_1d")],
)
def test_mismatched_shapes_raise(which, field):
    d = _valid()
    if field == "mask_1d":
        d["mask"] = torch.ones(4)
    elif field in ("sign", "pair_ids"):
        d[field] = d[field][:3]
    else:
        d[field] = d[field][:, :2]
    with pytest.raises(ValueError):
        _call(which, d)


@pytest.mark.parametrize("norm", ["", "batch", "token", "Sequence", None])
def test_unknown_length_norm_raises(norm):
    with pytest.raises(ValueError):
        _call("bnf", _valid(), length_norm=norm)


def test_empty_rejected_row_changes_neither_asft_loss_nor_pair_metrics():
    """A pair whose rejected response has no scored tokens adds nothing but its chosen row's terms."""
    logps = torch.tensor([[-1.0, -1.0], [-2.0, -2.0], [-0.5, -1.5], [-3.0, -1.0]])
    sign = torch.tensor([1, -1, 1, -1])
    pair_ids = torch.tensor([0, 0, 1, 1])
    mask = torch.ones(4, 2)
    empty = mask.clone()
    empty[1] = 0
    _, full_metrics = asft_loss(logps, mask, sign, pair_ids)
    loss_empty, metrics = asft_loss(logps, empty, sign, pair_ids)
    # Expected: pair 0 contributes only its chosen row's NLL and alignment terms; n stays 2 pairs.
    lbar = logps.mean(1)
    r = lbar - torch.log1p(-torch.exp(lbar))
    expected = (-lbar[0] - torch.log(torch.sigmoid(r[0]))
                - lbar[2] - torch.log(torch.sigmoid(r[2])) - torch.log(torch.sigmoid(-r[3]))) / 2
    assert loss_empty.item() == pytest.approx(expected.item(), rel=1e-6)
    assert int(metrics.counts["rewards/margins"]) == 1 and int(metrics.counts["rewards/rejected"]) == 1
    assert float(metrics["rewards/accuracies"]) == float((lbar[2] > lbar[3]).float())
    assert float(metrics["log_odds_chosen"]) == pytest.approx(float(r[2] - r[3]), rel=1e-6)
    assert int(full_metrics.counts["rewards/margins"]) == 2


def test_explicit_normalizer_is_used_as_given_even_below_one():
    logps = torch.tensor([[-1.0, -2.0], [-2.0, -2.5]])
    args = (torch.ones(2, 2), torch.tensor([1, -1]), torch.tensor([0, 0]))
    one, _ = asft_loss(logps, *args, normalizer=1.0)
    half, _ = asft_loss(logps, *args, normalizer=0.5)
    assert half.item() == pytest.approx(2 * one.item(), rel=1e-6)
