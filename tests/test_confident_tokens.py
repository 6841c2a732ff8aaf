"""The single pass on the logits real models produce: confident tokens, a policy equal to its reference.

The single pass must agree with its own loss there (no misuse error), give the two-pass op's gradients, and
train: on both back-ends (Triton in its interpreter on CPU), plain and soft-capped / scaled, in fp32 and
fp16 (the regimes: `logit_regimes.py`; the same sweep runs compiled, in bf16 too, in test_gpu_kernels.py).
"""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import TwoPassBNF
from test_packing import setup  # noqa: F401  (fixture)

from axolotl_bnf_plugin.data.collator import ResponseBatchCollator, response_rows
from logit_regimes import REGIMES, TRANSFORMS, bnf_grads, max_rel_err, regime_inputs

from axolotl_bnf_plugin.kernels import SinglePassMisuse, token_logprobs, triton_available
from axolotl_bnf_plugin.methods.bnf import BNF, BNF_GRAD_RULE
from axolotl_bnf_plugin.model_io import response_token_logps
from axolotl_bnf_plugin.step_loss import LossSettings, batch_loss

IMPLS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not triton_available(torch.device("cpu")), reason="Triton cannot run here"))]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_single_pass_equals_two_pass_in_every_regime(impl, dtype, transform):
    transform = TRANSFORMS[transform]
    hidden, weight, labels, ref, regime, p = regime_inputs(transform, dtype)
    assert len(REGIMES) == 5
    assert (p[regime < 3] > 1 - 1e-6).all() and (p[regime == 4] < 1e-3).all()  # the regimes are what they say
    single = bnf_grads(hidden, weight, labels, ref, impl, transform, single_pass=True)
    two_pass = bnf_grads(hidden, weight, labels, ref, impl, transform, single_pass=False)
    # fp32 tolerance; in fp16 the d logits (and the gradients) are themselves fp16 numbers.
    rtol = 1e-4 if dtype == torch.float32 else 2e-3
    for name, got, want in zip(("d hidden", "d weight"), single, two_pass):
        assert want.abs().max() > 0, name
        assert max_rel_err(got, want) < rtol, f"{name}: {max_rel_err(got, want):.2e}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_a_loss_recomputing_the_rule_is_not_a_misuse(impl, transform):
    """BNF's own loss on the single pass's log-probs, recomputing w itself (as a hand-written loop does): the
    check tolerates the rounding of the rule's inputs, and the gradients agree with the two-pass op's."""
    transform = TRANSFORMS[transform]
    hidden, weight, labels, ref, _, _ = regime_inputs(transform, torch.float32, seed=1)
    single = bnf_grads(hidden, weight, labels, ref, impl, transform, single_pass=True, loss_uses_op_gradient=False)
    two_pass = bnf_grads(hidden, weight, labels, ref, impl, transform, single_pass=False)
    for got, want in zip(single, two_pass):
        assert max_rel_err(got, want) < 1e-4


@pytest.mark.parametrize("impl", IMPLS)
def test_a_different_loss_is_refused_and_its_step_poisoned(impl):
    hidden, weight, labels, ref, _, _ = regime_inputs({}, torch.float32, seed=2)
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight)]
    scale = torch.full_like(ref, 0.1)
    logp, _, _ = token_logprobs(*leaves, labels, impl=impl, grad_rule=BNF_GRAD_RULE, grad_inputs=(ref, scale))
    loss = (logp * torch.linspace(-1, 1, logp.shape[0])).sum()  # not BNF's: per-row weights of its own
    with pytest.raises(SinglePassMisuse, match="may only feed the loss whose rule it is"):
        loss.backward()


def _warm_up(model, batch, steps=80, lr=1e-2, sharpen=5.0):
    """Plain SFT on the batch's responses, then a sharper head (a lower temperature): most tokens are then
    confident, as a chat model is on its template and easy tokens."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    labels = batch["labels"]
    for _ in range(steps):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(sharpen)


@pytest.mark.parametrize("impl", IMPLS)
def test_a_step_one_batch_of_confident_tokens_trains(setup, impl):  # noqa: F811
    """The realistic first step: a model that is sure of most of its tokens, its reference a frozen copy of it.
    The default single pass runs (no misuse error), equals the two-pass op, and a few steps raise the
    chosen-over-rejected margin."""
    tokenizer, examples, model, _ = setup
    model = copy.deepcopy(model)
    batch = ResponseBatchCollator(tokenizer)(examples)
    _warm_up(model, batch)
    reference = copy.deepcopy(model).eval()
    settings = LossSettings(BNF(), impl=impl)
    with torch.no_grad():
        token_logp, _, scored = response_token_logps(model, batch, impl=impl)
    confident = (token_logp[scored].exp() > 1 - 1e-6).float().mean()
    assert confident > 0.3, f"only {confident:.0%} of the tokens are confident: the test would not test the regime"

    grads = []
    for method in (BNF(), TwoPassBNF()):
        model.zero_grad()
        loss, _ = batch_loss(model, batch, LossSettings(method, impl=impl), reference=reference)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, want in grads[1].items():
        assert (grads[0][name] - want).abs().max() <= 1e-4 * want.abs().max() + 1e-9, name

    def margin():
        with torch.no_grad():
            token_logp, _, scored = response_token_logps(model, batch, impl=impl)
            mask, per_token = response_rows(batch, token_logp)
            total = per_token.sum(1)
            chosen = (batch["sign"] > 0) & (batch["pair_ids"] >= 0)
            rejected = (batch["sign"] < 0) & (batch["pair_ids"] >= 0)
            return total[chosen].sum() - total[rejected].sum()

    before = margin()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        loss, _ = batch_loss(model, batch, settings, reference=reference)
        loss.backward()
        opt.step()
    assert margin() > before


@pytest.mark.parametrize("k", [1.0, 0.25, 65536.0])
def test_the_fit_holds_when_every_trusted_row_is_tiny(k):
    """Late in training: every chosen token near-certain (untrusted: rounding moves their weight a lot) and
    the one informative row a rejected token at p ~ e^-40, whose predicted gradient (~4e-16 at a token scale
    of 1e-4) squares to below fp32's normal range. An exact upstream gradient must still fit, at any loss
    scale."""
    from axolotl_bnf_plugin.kernels.grad_rules import rounding_slack
    from axolotl_bnf_plugin.kernels.single_pass import upstream_factor

    logp = torch.cat([-torch.linspace(0, 3e-5, 300), torch.tensor([-40.0])])
    ref, scale = logp + 1e-7, torch.full_like(logp, 1e-4)
    pred = BNF_GRAD_RULE.grad(logp, ref, scale)
    slack = rounding_slack(BNF_GRAD_RULE, logp, ref, scale, pred)
    factor = upstream_factor(k * pred, pred, slack, "bnf")  # raises SinglePassMisuse if it does not fit
    torch.testing.assert_close(factor, torch.tensor(k), rtol=1e-5, atol=0)
