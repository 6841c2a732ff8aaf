"""Gradient rules over whole responses: the single pass with blocks cut at response boundaries.

ASFT's token gradient depends on its response's mean log-prob, so the op must have every row of the
response in the block before forming its d logits. The gradients of hidden, weight and bias must equal
those of the two-pass op differentiated by autograd through `asft_loss` (the reference), for pairs,
unpaired rows and mixed batches, with soft-capping, a logit scale and a bias, on both row implementations;
responses longer than a block take the two-pass op, and their gradients are the same too.
"""
from __future__ import annotations

import pytest
import torch

from test_packing import setup  # noqa: F401  (fixture)

from axolotl_bnf_plugin.kernels import token_logprobs, with_rule_gradient
from axolotl_bnf_plugin.kernels.grad_rules import GradRule, register_grad_rule
from axolotl_bnf_plugin.kernels.segments import SegmentStats, plan_segments
from axolotl_bnf_plugin.methods.asft import asft_grad_rule, asft_loss


def test_blocks_hold_whole_segments_and_long_ones_go_to_the_two_pass_op():
    plan = plan_segments([3, 0, 4, 9, 2, 5], chunk_size=8)
    assert plan.blocks == [(0, 7), (7, 14)]  # 3 + 4 rows, then 2 + 5: no segment cut
    assert plan.long_rows == list(range(7, 16))  # the 9-row segment
    assert plan.single_rows == list(range(7)) + list(range(16, 23))
    assert plan.local == [0] * 3 + [1] * 4 + [0] * 2 + [1] * 5
    assert plan.segment_of_row == [0] * 3 + [1] * 4 + [2] * 9 + [3] * 2 + [4] * 5
    assert plan.long_segment == [0] * 9
    assert plan_segments([2, 2], chunk_size=8).single_rows is None  # every row in the single pass, no copy


def batch(lengths, signs, pair_ids, vocab=48, hidden=16, seed=0, dtype=torch.float32, bias=False):
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    h = (torch.randn(n, hidden, generator=g) * 2).to(dtype)
    w = (torch.randn(vocab, hidden, generator=g) * 0.5).to(dtype)
    b = (torch.randn(vocab, generator=g) * 0.3).to(dtype) if bias else None
    labels = torch.randint(0, vocab, (n,), generator=g)
    return h, w, b, labels, torch.tensor(signs), torch.tensor(pair_ids)


def as_rows(values, lengths):
    """[N] per-token values -> [B, T] rows (one per response) and the mask."""
    width = max(lengths)
    out = values.new_zeros(len(lengths), width)
    mask = torch.zeros(len(lengths), width, dtype=torch.bool)
    start = 0
    for i, length in enumerate(lengths):
        out[i, :length] = values[start:start + length]
        mask[i, :length] = True
        start += length
    return out, mask


def gradients(lengths, signs, pair_ids, single, chunk_size, impl="torch", frozen_head=False, **kw):
    h, w, b, labels, sign, pairs = batch(lengths, signs, pair_ids, bias=kw.pop("bias", False))
    params = [t.requires_grad_() for t in ((h,) if frozen_head else (h, w, b)) if t is not None]
    hyper = dict(lam=0.7, beta=1.3, sft_weight=0.9)
    op = dict(bias=b, chunk_size=chunk_size, impl=impl, **kw)
    if single:
        rule = asft_grad_rule(hyper["lam"], hyper["beta"], hyper["sft_weight"])
        n = len(lengths) - (pairs >= 0).sum().item() // 2
        per_token = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        a, inv_n = sign.float()[per_token], torch.full((sum(lengths),), 1.0 / n)
        logp, _, rule_grad = token_logprobs(h, w, labels, grad_rule=rule, grad_inputs=(a, inv_n),
                                            segment_lengths=lengths, **op)
        rows, mask = as_rows(logp.detach(), lengths)
        loss, _ = asft_loss(rows, mask, sign, pairs, lam=hyper["lam"], beta=hyper["beta"], sft_weight=hyper["sft_weight"])
        loss = with_rule_gradient(loss, logp, rule_grad)
    else:
        logp, _ = token_logprobs(h, w, labels, **op)
        rows, mask = as_rows(logp, lengths)
        loss, _ = asft_loss(rows, mask, sign, pairs, lam=hyper["lam"], beta=hyper["beta"], sft_weight=hyper["sft_weight"])
    loss.backward()
    return loss.detach(), [p.grad for p in params]


CASES = {
    "pairs": ([5, 7, 3, 6], [1, -1, 1, -1], [0, 0, 1, 1]),
    "unpaired": ([4, 9, 2], [1, -1, -1], [-1, -1, -1]),
    "mixed": ([6, 3, 8, 5, 2], [1, -1, 1, -1, 1], [0, 0, -1, -1, -1]),
}


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("chunk_size", [8, 64], ids=["some-long", "all-fit"])
@pytest.mark.parametrize("transform", [{}, {"softcap": 5.0, "scale": 0.5, "bias": True}], ids=["plain", "capped"])
def test_asft_single_pass_gradients_equal_the_two_pass_op(impl, case, chunk_size, transform):
    """(Triton runs in its interpreter on the CPU.)"""
    lengths, signs, pairs = CASES[case]
    loss_ref, grads_ref = gradients(lengths, signs, pairs, single=False, chunk_size=chunk_size, impl="torch", **transform)
    loss, grads = gradients(lengths, signs, pairs, single=True, chunk_size=chunk_size, impl=impl, **transform)
    torch.testing.assert_close(loss, loss_ref)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("chunk_size", [8, 64], ids=["some-long", "all-fit"])
def test_asft_single_pass_with_a_frozen_head_gives_the_two_pass_hidden_gradient(impl, chunk_size):
    """LoRA: only d hidden is needed; the single pass builds it in the forward, as for full fine-tuning."""
    lengths, signs, pairs = CASES["mixed"]
    loss_ref, (grad_ref,) = gradients(lengths, signs, pairs, single=False, chunk_size=chunk_size, frozen_head=True)
    loss, (grad,) = gradients(lengths, signs, pairs, single=True, chunk_size=chunk_size, impl=impl, frozen_head=True)
    torch.testing.assert_close(loss, loss_ref)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-6)


# A third rule over segments, to show the form is generic: length-normalised SFT, L = -(1/B) sum_i lbar_i.
def _length_normalised_sft(logp, a, b, stats):
    return -b / stats.count


LN_SFT = register_grad_rule(GradRule("length_normalised_sft", grad=_length_normalised_sft,
                                     bound=lambda a, b: b.abs(), over_segments=True))


def test_a_length_normalised_sft_rule_over_segments():
    lengths = [3, 6, 2, 5]
    h, w, _, labels, _, _ = batch(lengths, [1] * 4, [-1] * 4, seed=3)
    grads = []
    for single in (False, True):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        inv_b = torch.full((sum(lengths),), 1.0 / len(lengths))
        if single:
            logp, _, rule_grad = token_logprobs(hh, ww, labels, chunk_size=7, grad_rule=LN_SFT,
                                                grad_inputs=(inv_b, inv_b), segment_lengths=lengths)
            rows, mask = as_rows(logp.detach(), lengths)
            loss = with_rule_gradient(-(rows.sum(1) / mask.sum(1)).mean(), logp, rule_grad)
        else:
            logp, _ = token_logprobs(hh, ww, labels, chunk_size=7)
            rows, mask = as_rows(logp, lengths)
            loss = -(rows.sum(1) / mask.sum(1)).mean()
        loss.backward()
        grads.append((hh.grad, ww.grad))
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_segment_stats_are_per_row_statistics_of_their_segment():
    values = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0])
    stats = SegmentStats.of(values, torch.tensor([0, 0, 0, 1, 1]))
    assert stats.total.tolist() == [6.0, 6.0, 6.0, 30.0, 30.0]
    assert stats.mean.tolist() == [2.0, 2.0, 2.0, 15.0, 15.0]


def test_a_rule_over_segments_needs_their_lengths():
    h, w, _, labels, _, _ = batch([3, 2], [1, 1], [-1, -1])
    rule = asft_grad_rule(1.0, 1.0, 1.0)
    x = torch.ones(5)
    with pytest.raises(ValueError, match="pass segment_lengths"):
        token_logprobs(h.requires_grad_(), w, labels, grad_rule=rule, grad_inputs=(x, x))
    with pytest.raises(ValueError, match="add up to 4 rows; 5 rows are scored"):
        token_logprobs(h, w, labels, grad_rule=rule, grad_inputs=(x, x), segment_lengths=[2, 2])


def test_responses_that_fit_take_one_logits_pass(monkeypatch):
    """No two-pass op call when every response fits a block; one, for the long responses only, otherwise."""
    import axolotl_bnf_plugin.kernels as kernels

    calls = []
    real = kernels.token_logprobs_op

    def counting(hidden, *args):
        calls.append(hidden.shape[0])
        return real(hidden, *args)

    monkeypatch.setattr(kernels, "token_logprobs_op", counting)
    lengths, signs, pairs = CASES["mixed"]
    gradients(lengths, signs, pairs, single=True, chunk_size=64)
    assert calls == []
    gradients(lengths, signs, pairs, single=True, chunk_size=7)
    assert calls == [8]  # the 8-row response


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("chunk_size", [None, 8], ids=["default-chunks", "long-responses"])
def test_training_loss_single_pass_equals_two_pass(setup, packed, chunk_size):  # noqa: F811
    """`batch_loss` for ASFT through the collator (its per-response lengths): the same loss, metrics and
    parameter gradients as the two-pass op, packed or not, with responses longer than a block or not."""
    from dataclasses import dataclass

    from test_single_pass import check_single_pass_equals_two_pass

    from axolotl_bnf_plugin.methods.asft import ASFT

    @dataclass(frozen=True)
    class TwoPassASFT(ASFT):
        grad_rule = None

    tokenizer, examples, model, _ = setup
    hyper = dict(lam=0.8, beta=1.2, sft_weight=0.9)
    check_single_pass_equals_two_pass(model, tokenizer, examples, packed, ASFT(**hyper), TwoPassASFT(**hyper),
                                      chunk_size=chunk_size)


def test_a_batch_with_no_scored_row_still_backpropagates():
    """All responses without a scored token: zero gradients, as the plain op gives, not a graph-less loss."""
    h, w, _, _, _, _ = batch([3, 3], [1, -1], [0, 0])
    h.requires_grad_()
    labels = torch.full((6,), -100)
    empty = torch.empty(0, dtype=torch.long)
    x = torch.ones(6)
    logp, _, rule_grad = token_logprobs(h, w, labels, row_index=empty, grad_rule=asft_grad_rule(1.0, 1.0, 1.0),
                                        grad_inputs=(x, x), segment_lengths=[0, 0], chunk_size=8)
    with_rule_gradient(torch.zeros(()), logp, rule_grad).backward()
    assert h.grad is not None and not h.grad.any()
