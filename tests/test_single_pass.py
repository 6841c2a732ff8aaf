"""BNF's single-pass op (gradient built in the forward, `kernels/single_pass.py`) against materialised logits
and against the two-pass op, at the kernel and at the training-loss level."""
from __future__ import annotations

import pytest
import torch
from conftest import TwoPassBNF
from test_kernel import naive_token_logprobs
from test_packing import setup  # noqa: F401  (fixture)

from axolotl_bnf_plugin.data.collator import ResponseBatchCollator
from axolotl_bnf_plugin.kernels import token_logprobs
from axolotl_bnf_plugin.methods.bnf import BNF, BNF_GRAD_RULE, bnf_loss, bnf_response_scale
from axolotl_bnf_plugin.step_loss import LossSettings, batch_loss

IMPLS = ["torch", "triton"]


def with_bnf(grad):
    """token_logprobs keywords for BNF's single pass with `grad = (ref_logp, token_scale)`; none for None."""
    return {} if grad is None else dict(grad_rule=BNF_GRAD_RULE, grad_inputs=grad)


def bnf_inputs(B=3, T=9, H=12, V=41, seed=0, with_bias=True):
    """B responses of T positions (some unscored) as one flat batch of B*T rows, with a reference."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B * T, H, generator=g, dtype=torch.float64).float().requires_grad_()
    weight = (0.3 * torch.randn(V, H, generator=g)).requires_grad_()
    bias = (0.1 * torch.randn(V, generator=g)).requires_grad_() if with_bias else None
    labels = torch.randint(0, V, (B * T,), generator=g)
    labels[torch.rand(B * T, generator=g) < 0.3] = -100
    labels[:T] = -100  # an empty response
    labels[T] = 5
    ref = torch.log_softmax(torch.randn(B * T, V, generator=g), -1).gather(1, labels.clamp(min=0)[:, None])[:, 0]
    sign = torch.tensor([1, -1, 1][:B])
    pair_ids = torch.tensor([0, 0, -1][:B])
    return hidden, weight, bias, labels, ref, sign, pair_ids


def loss_and_grads(logp_fn, hidden, weight, bias, labels, ref, sign, pair_ids, length_norm, normalizer, B, T):
    mask = (labels != -100).view(B, T)
    scale = bnf_response_scale(mask, sign, pair_ids, length_norm, normalizer)
    logp, neg_entropy = logp_fn((ref, scale[:, None].expand(B, T).reshape(-1)))[:2]
    loss, metrics = bnf_loss(logp.view(B, T), ref.view(B, T), neg_entropy.view(B, T), mask, sign, pair_ids,
                             length_norm=length_norm, normalizer=normalizer)
    leaves = [t for t in (hidden, weight, bias) if t is not None and t.requires_grad]
    grads = torch.autograd.grad(3.5 * loss, leaves)  # any constant factor upstream is allowed
    return loss.detach(), {k: v.detach() for k, v in metrics.items()}, grads


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("length_norm", ["sequence", "batch_min"])
@pytest.mark.parametrize("transform", [{}, {"softcap": 3.0, "scale": 0.7}], ids=["plain", "softcap-scale"])
@pytest.mark.parametrize("chunk", [1, 4, None])
def test_single_pass_equals_materialised_logits(impl, length_norm, transform, chunk):
    B, T = 3, 9
    hidden, weight, bias, labels, ref, sign, pair_ids = bnf_inputs(B, T)
    common = (hidden, weight, bias, labels, ref, sign, pair_ids, length_norm, 2.0, B, T)
    fused = loss_and_grads(lambda grad: token_logprobs(hidden, weight, labels, bias=bias, chunk_size=chunk, impl=impl,
                                                       **with_bnf(grad), **transform), *common)
    naive = loss_and_grads(lambda grad: tuple(t.float() for t in naive_token_logprobs(
        hidden, weight, labels, bias=bias, **transform)), *common)
    torch.testing.assert_close(fused[0], naive[0], rtol=1e-5, atol=1e-6)
    for name in naive[1]:
        torch.testing.assert_close(fused[1][name], naive[1][name], rtol=1e-5, atol=1e-6, msg=name)
    for got, want in zip(fused[2], naive[2]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert all(g.abs().max() > 0 for g in fused[2])


def test_frozen_weight_gets_no_weight_work_and_the_same_hidden_gradient():
    B, T = 3, 9
    hidden, weight, bias, labels, ref, sign, pair_ids = bnf_inputs(B, T, with_bias=False)
    weight.requires_grad_(False)
    common = (hidden, weight, None, labels, ref, sign, pair_ids, "sequence", None, B, T)
    fused = loss_and_grads(lambda grad: token_logprobs(hidden, weight, labels, impl="torch", **with_bnf(grad)), *common)
    two_pass = loss_and_grads(lambda grad: token_logprobs(hidden, weight, labels, impl="torch"), *common)
    torch.testing.assert_close(fused[2][0], two_pass[2][0], rtol=1e-5, atol=1e-7)


def test_any_other_use_of_the_log_probs_fails_loudly():
    """The gradient is built for BNF's loss: feeding logp to another loss must not give a silent wrong answer."""
    B, T = 3, 9
    hidden, weight, bias, labels, ref, sign, pair_ids = bnf_inputs(B, T)
    mask = (labels != -100).view(B, T)
    scale = bnf_response_scale(mask, sign, pair_ids)[:, None].expand(B, T).reshape(-1)
    logp, *_ = token_logprobs(hidden, weight, labels, bias=bias, impl="torch", grad_rule=BNF_GRAD_RULE, grad_inputs=(ref, scale))
    with pytest.raises(RuntimeError, match="single-pass op built for gradient rule 'bnf' got an upstream gradient"):
        logp.sum().backward()


def test_no_grad_falls_back_to_the_plain_op():
    hidden, weight, bias, labels, ref, sign, _ = bnf_inputs()
    with torch.no_grad():
        got = token_logprobs(hidden, weight, labels, bias=bias, impl="torch", grad_rule=BNF_GRAD_RULE, grad_inputs=(ref, torch.ones_like(ref)))
        want = token_logprobs(hidden, weight, labels, bias=bias, impl="torch")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("length_norm", ["sequence", "batch_min"])
def test_training_loss_single_pass_equals_two_pass(setup, packed, length_norm):  # noqa: F811
    """`batch_loss` with the single-pass op: same loss, metrics and parameter gradients as the two-pass op."""
    tokenizer, examples, model, reference = setup
    check_single_pass_equals_two_pass(model, tokenizer, examples, packed, BNF(length_norm=length_norm),
                                      TwoPassBNF(length_norm=length_norm), reference=reference)


def check_single_pass_equals_two_pass(model, tokenizer, examples, packed, single, two_pass, reference=None,
                                      chunk_size=None):
    """`batch_loss` of one collated batch under `single` and `two_pass` (the same method without its rule):
    the same loss, metrics and parameter gradients."""
    collate = ResponseBatchCollator(tokenizer)
    batch = collate([examples[:3], examples[3:]]) if packed else collate(examples)
    results = []
    for method in (single, two_pass):
        model.zero_grad()
        settings = LossSettings(method, chunk_size=chunk_size)
        loss, metrics = batch_loss(model, batch, settings, reference=reference, normalizer=7.0)
        loss.backward()
        results.append((loss.detach(), dict(metrics), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss1, m1, g1), (loss2, m2, g2) = results
    torch.testing.assert_close(loss1, loss2, rtol=1e-6, atol=1e-7)
    for name in m2:
        torch.testing.assert_close(m1[name], m2[name], rtol=1e-6, atol=1e-7, msg=name)
    for name in g2:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-4, atol=1e-7, msg=name)
    assert g1["lm_head.weight"].abs().max() > 0


def test_single_pass_compiles_without_graph_breaks():
    """A custom op with its own autograd: torch.compile(fullgraph=True) traces the BNF loss around it."""
    B, T = 3, 9
    hidden, weight, bias, labels, ref, sign, pair_ids = bnf_inputs(B, T)
    mask = (labels != -100).view(B, T)
    rows = (labels != -100).nonzero().squeeze(1)

    def loss_fn(h, w):
        scale = bnf_response_scale(mask, sign, pair_ids)[:, None].expand(B, T).reshape(-1)
        logp, neg, _ = token_logprobs(torch.tanh(h), w, labels, row_index=rows, impl="torch", chunk_size=5,
                                   grad_rule=BNF_GRAD_RULE, grad_inputs=(ref, scale))
        return bnf_loss(logp.view(B, T), ref.view(B, T), neg.view(B, T), mask, sign, pair_ids)[0]

    h1, w1 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    compiled(h1, w1).backward()
    loss_fn(h2, w2).backward()
    torch.testing.assert_close(h1.grad, h2.grad)
    torch.testing.assert_close(w1.grad, w2.grad)


def test_non_finite_values_reach_the_gradients_instead_of_failing():
    """A NaN in the forward is the step guard's business (skip the step), not a misuse error."""
    B, T = 3, 9
    hidden, weight, bias, labels, ref, sign, pair_ids = bnf_inputs(B, T)
    poisoned = hidden.detach().clone()
    poisoned[T + 1] = float("nan")
    poisoned.requires_grad_()
    loss, _, grads = loss_and_grads(
        lambda grad: token_logprobs(poisoned, weight, labels, bias=bias, impl="torch", **with_bnf(grad)),
        poisoned, weight, bias, labels, ref, sign, pair_ids, "sequence", None, B, T)
    assert not torch.isfinite(loss)
    assert not all(torch.isfinite(g).all() for g in grads)
