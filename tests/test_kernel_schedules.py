"""The op's backward schedules and its generic single pass, against materialised logits.

- The vocabulary-sliced backward (several slices, a label in every slice, bias, soft-cap) and the
  row-chunked one give the same values and gradients as float64 autograd, on both back-ends.
- A gradient rule other than BNF's, registered by a test, runs through the single pass and equals autograd
  of its loss: the kernel layer serves any loss whose per-row gradient is known in the forward.
- The kernel layer imports no loss.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from test_kernel import assert_matches, make_inputs, naive_token_logprobs, run_both

from axolotl_bnf_plugin.kernels import GradRule, chunked, register_grad_rule, schedule, token_logprobs, triton_available
from axolotl_bnf_plugin.kernels.workspace import Workspace

IMPLS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not triton_available(torch.device("cpu")), reason="Triton cannot run here"))]


def backward_schedule(n, v, chunk, impl, dtype=torch.float32):
    return "rows" if schedule.vocab_slice_cols(n, v, dtype, impl, "cpu", chunk_size=chunk) is None else "vocab"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("options", [{}, {"softcap": 3.0, "scale": 0.8}], ids=["plain", "softcap-scale"])
@pytest.mark.parametrize("min_cols,expected", [(1, "vocab"), (10**9, "rows")])
def test_both_backward_schedules_match_materialised_logits(monkeypatch, impl, options, min_cols, expected):
    """N=24 rows, V=97, chunk 6: the sliced backward holds 6 * 97 logits, i.e. slices of 24 columns (5 slices,
    the last one short); with a floor on the slice width above V it chunks rows instead."""
    monkeypatch.setattr(schedule, "MIN_SLICE_COLS", min_cols)
    n, h, v, chunk = 24, 16, 97, 6
    assert backward_schedule(n, v, chunk, impl) == expected
    if expected == "vocab":
        assert schedule.vocab_slice_cols(n, v, torch.float32, impl, "cpu", chunk_size=chunk) == 24
    hidden, weight, bias, labels, upstream = make_inputs(n, h, v, seed=3, with_bias=True, ignore_frac=0.2)
    labels[:5] = torch.tensor([0, 23, 24, 96, 50])  # labels at slice edges
    impl_out, ref_out = run_both(hidden, weight, bias, labels, upstream, chunk_size=chunk, impl=impl, **options)
    assert_matches(impl_out, ref_out)


def test_sliced_backward_is_taken_and_writes_each_weight_slice_once(monkeypatch):
    """The schedule the op runs is the one `vocab_slice_cols` names: count the products per schedule."""
    monkeypatch.setattr(schedule, "MIN_SLICE_COLS", 1)
    calls = {"rows": 0, "vocab": 0}
    by_rows, by_vocab = chunked._backward_by_rows, chunked._backward_by_vocab

    def count(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(chunked, "_backward_by_rows", count("rows", by_rows))
    monkeypatch.setattr(chunked, "_backward_by_vocab", count("vocab", by_vocab))
    hidden, weight, _, labels, upstream = make_inputs(24, 8, 97, seed=4)
    run_both(hidden, weight, None, labels, upstream, need=("h", "w"), chunk_size=6, impl="torch")
    # d weight needed: sliced.
    assert calls == {"vocab": 1, "rows": 0}


def test_frozen_head_builds_hidden_gradient_in_forward_and_recomputes_no_logits(monkeypatch):
    """Only d hidden needed (LoRA): one projection per row chunk in all, no backward pass over the logits;
    the gradient is still the reference one (run_both compares with autograd on full logits)."""
    projections, backward_passes = [], []
    project = Workspace.project

    def counted_project(self, hidden, weight, bias):
        projections.append(hidden.shape[0])
        return project(self, hidden, weight, bias)

    monkeypatch.setattr(Workspace, "project", counted_project)
    for name in ("_backward_by_rows", "_backward_by_vocab"):
        monkeypatch.setattr(chunked, name, lambda *a, **k: backward_passes.append(a))
    hidden, weight, bias, labels, upstream = make_inputs(24, 8, 97, seed=4, with_bias=True)
    impl_out, ref_out = run_both(hidden, weight, bias, labels, upstream, need=("h",), chunk_size=6, impl="torch",
                                 softcap=5.0, scale=0.7)
    assert_matches(impl_out, ref_out)
    scored = int((labels != -100).sum())
    assert projections == [min(6, scored - start) for start in range(0, scored, 6)]
    assert backward_passes == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sliced_backward_in_half_precision_matches_the_row_chunked_one(monkeypatch, dtype):
    """Half inputs on CPU: d hidden accumulates in fp32 across slices (through fp32 copies of the block and the weight slice)."""
    hidden, weight, bias, labels, upstream = make_inputs(40, 16, 300, seed=5, dtype=dtype, with_bias=True)
    results = {}
    for name, min_cols in (("vocab", 1), ("rows", 10**9)):
        monkeypatch.setattr(schedule, "MIN_SLICE_COLS", min_cols)
        assert (schedule.vocab_slice_cols(40, 300, dtype, "torch", "cpu", chunk_size=8, hidden_size=16) is None) == (name == "rows")
        results[name] = run_both(hidden, weight, bias, labels, upstream, chunk_size=8, impl="torch")
    truth = results["rows"][1][2]
    for key in ("h", "w", "b"):
        err = {name: ((r[0][2][key].double() - truth[key]).norm() / truth[key].norm()).item()
               for name, r in results.items()}
        assert err["vocab"] <= 1.25 * err["rows"] + 1e-6, (key, err)


# --------------------------------------------------------------------------------------------------
# A loss that is not BNF through the single pass
# --------------------------------------------------------------------------------------------------

def _weighted_nll_grad(logp, a, b):
    """d/d logp of sum(-a * logp + b * exp(logp)): a per-row weight and a likelihood penalty."""
    return -a + b * logp.exp()


WEIGHTED_NLL = register_grad_rule(GradRule(
    "test_weighted_nll", grad=_weighted_nll_grad, bound=lambda a, b: a.abs() + b.abs()))


@pytest.mark.parametrize("impl", IMPLS)
def test_a_registered_rule_gives_its_own_loss_gradient(impl):
    n, h, v = 30, 12, 53
    hidden, weight, bias, labels, _ = make_inputs(n, h, v, seed=6, with_bias=True, ignore_frac=0.2)
    g = torch.Generator().manual_seed(7)
    a, b = torch.rand(n, generator=g) * 1e-3, torch.rand(n, generator=g) * 1e-4  # small: the prescale matters

    def loss_of(logp):
        return (-a * logp + b * logp.exp()).sum()

    fused = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
    logp, *_ = token_logprobs(*fused[:2], labels, bias=fused[2], chunk_size=7, impl=impl,
                             grad_rule=WEIGHTED_NLL, grad_inputs=(a, b))
    (2.0 * loss_of(logp)).backward()  # any constant factor upstream
    naive = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    r_logp, _ = naive_token_logprobs(naive[0], naive[1], labels, bias=naive[2])
    (2.0 * loss_of(r_logp)).backward()
    torch.testing.assert_close(logp.double(), r_logp.detach(), atol=2e-5, rtol=1e-4)
    for got, want in zip(fused, naive):
        torch.testing.assert_close(got.grad.double(), want.grad, atol=1e-7, rtol=1e-4)
        assert want.grad.abs().max() > 0


def test_rule_registry_refuses_ambiguity():
    with pytest.raises(ValueError, match="already registered"):
        register_grad_rule(GradRule("test_weighted_nll", grad=_weighted_nll_grad, bound=lambda a, b: a))
    hidden, weight, _, labels, _ = make_inputs(4, 3, 5, seed=8)
    with pytest.raises(ValueError, match="no gradient rule registered as 'nope'"):
        token_logprobs(hidden.requires_grad_(), weight, labels, grad_rule="nope", grad_inputs=(labels, labels))
    with pytest.raises(ValueError, match="go together"):
        token_logprobs(hidden, weight, labels, grad_rule=WEIGHTED_NLL)


def test_every_row_scored_uses_the_rows_in_place():
    """row_index covering all rows: same values and gradients as the op finding the rows itself."""
    hidden, weight, _, labels, upstream = make_inputs(16, 8, 30, seed=9)
    out = []
    for row_index in (None, torch.arange(16)):
        h = hidden.detach().clone().requires_grad_()
        logp, neg = token_logprobs(h, weight, labels, row_index=row_index, impl="torch")
        (logp * upstream).sum().backward()
        out.append((logp, neg, h.grad))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b)


def test_kernel_layer_imports_no_loss():
    """`kernels` is a generic op: importing it (and running its single pass) loads no method module."""
    code = (
        "import sys, torch\n"
        "from axolotl_bnf_plugin.kernels import GradRule, register_grad_rule, token_logprobs\n"
        "r = register_grad_rule(GradRule('ones', grad=lambda l, a, b: a, bound=lambda a, b: a))\n"
        "h = torch.randn(4, 3, requires_grad=True)\n"
        "token_logprobs(h, torch.randn(5, 3), torch.tensor([0, 1, 2, 3]), impl='torch', grad_rule=r,\n"
        "               grad_inputs=(torch.ones(4), torch.ones(4)))[0].sum().backward()\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('axolotl_bnf_plugin.')\n"
        "                and not m.startswith('axolotl_bnf_plugin.kernels'))\n"
        "print(loaded)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_fp32_slices_cover_the_whole_accumulator(monkeypatch):
    """The fallback for a torch whose CUDA addmm cannot accumulate half inputs into fp32: row slices of the
    accumulator (the last one short) sum to the whole product."""
    monkeypatch.setattr(chunked, "SLICE_BYTES", 3 * 5 * 4)  # 3 rows of 5 fp32 per slice
    g = torch.Generator().manual_seed(10)
    acc = torch.randn(11, 5, generator=g)
    a, b = torch.randn(11, 7, generator=g).half(), torch.randn(7, 5, generator=g).half()
    want = acc + a.float() @ b.float()
    chunked._add_product_in_slices(acc, a, b)
    torch.testing.assert_close(acc, want)
