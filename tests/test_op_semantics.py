"""The fused op behaves as a PyTorch op should: mixed input dtypes as `nn.Linear` takes them, a second backward
with `retain_graph`, a clear refusal of double backward, memory-safe labels, and a GEMM fallback that
swallows nothing but the missing kernel it exists for."""
from __future__ import annotations

import logging

import pytest
import torch
from test_kernel import naive_token_logprobs

from axolotl_bnf_plugin.kernels import chunked, token_logprobs, triton_available
from axolotl_bnf_plugin.methods.bnf import BNF_GRAD_RULE

IMPLS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not triton_available(torch.device("cpu")), reason="Triton cannot run here"))]


def inputs(n=14, h=10, v=29, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden, weight = torch.randn(n, h, generator=g), 0.4 * torch.randn(v, h, generator=g)
    bias, labels = 0.2 * torch.randn(v, generator=g), torch.randint(0, v, (n,), generator=g)
    labels[::5] = -100
    return hidden, weight, bias, labels, -torch.rand(n, generator=g) - 1.0, torch.randn(n, generator=g) * 0.1


# ---------------------------------------------------------------------------------------------------------
# Mixed dtypes outside autocast
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["torch"])  # bf16 under Triton's interpreter is not trustworthy
def test_fp32_bias_and_hidden_beside_a_bf16_head(impl):
    """As `nn.Linear` under autocast: everything in the head's dtype, gradients back in each input's dtype."""
    hidden, weight, bias, labels, _, upstream = inputs()
    h, w, b = hidden.clone().requires_grad_(), weight.bfloat16().requires_grad_(), bias.clone().requires_grad_()
    logp, _ = token_logprobs(h, w, labels, bias=b, impl=impl)
    (logp * upstream).sum().backward()
    # The truth: the same computation on the bf16-rounded inputs, in fp64.
    h64, w64, b64 = (t.detach().bfloat16().double().requires_grad_() for t in (hidden, w, bias))
    want, _ = naive_token_logprobs(h64, w64, labels, bias=b64)
    (want * upstream.double()).sum().backward()
    scored = labels != -100
    torch.testing.assert_close(logp[scored].double(), want[scored].detach(), atol=3e-2, rtol=3e-2)
    assert (h.grad.dtype, w.grad.dtype, b.grad.dtype) == (torch.float32, torch.bfloat16, torch.float32)
    for got, ref in ((h.grad, h64.grad), (w.grad, w64.grad), (b.grad, b64.grad)):
        assert (got.double() - ref).abs().max() <= 3e-2 * ref.abs().max()


# ---------------------------------------------------------------------------------------------------------
# Autograd: retain_graph, double backward
# ---------------------------------------------------------------------------------------------------------

def _paths(impl, dtype):
    """(name, leaves, loss) for each schedule the op has: two-pass, frozen head, single pass."""
    hidden, weight, bias, labels, ref, upstream = inputs()
    scale = torch.full_like(ref, 0.3)
    cases = []
    for name, weight_grad, rule in (("two-pass", True, False), ("frozen head", False, False),
                                    ("single pass", True, True), ("single pass, frozen head", False, True)):
        h = hidden.to(dtype).clone().requires_grad_()
        w = weight.to(dtype).clone().requires_grad_(weight_grad)
        kw = dict(grad_rule=BNF_GRAD_RULE, grad_inputs=(ref, scale)) if rule else {}
        logp, *rest = token_logprobs(h, w, labels, impl=impl, chunk_size=4, **kw)
        # The single pass's loss takes the op's own gradient (as the trainer does); the others any weighting.
        loss = (rest[-1].detach() * logp).sum() if rule else (logp * upstream).sum()
        cases.append((name, [t for t in (h, w) if t.requires_grad], loss))
    return cases


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_a_retained_graph_gives_the_same_gradients_twice(impl, dtype):
    for name, leaves, loss in _paths(impl, dtype):
        first = torch.autograd.grad(3.0 * loss, leaves, retain_graph=True)
        second = torch.autograd.grad(3.0 * loss, leaves)
        for a, b in zip(first, second):
            assert a.abs().max() > 0, name
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("impl", IMPLS)
def test_double_backward_is_refused_by_name(impl):
    for name, leaves, loss in _paths(impl, torch.float32):
        with pytest.raises(RuntimeError, match="does not support double backward"):
            torch.autograd.grad(loss, leaves, create_graph=True)


# ---------------------------------------------------------------------------------------------------------
# Labels given with row_index are never read outside their row
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("single_pass", [False, True], ids=["two-pass", "single-pass"])
def test_an_out_of_vocabulary_label_poisons_only_its_row(impl, single_pass):
    """With `row_index` the op does not check label values (that would sync): a bad label must read nothing
    outside its row and give a NaN log-prob there (which the step guard skips), the other rows untouched."""
    hidden, weight, bias, labels, ref, upstream = inputs()
    v = weight.shape[0]
    bad = labels.clone()
    bad[1], bad[7] = v + 1000, -7
    rows = (labels != -100).nonzero().squeeze(1)
    kw = dict(grad_rule=BNF_GRAD_RULE, grad_inputs=(ref, torch.full_like(ref, 0.3))) if single_pass else {}
    h = hidden.clone().requires_grad_()
    logp, neg, *_ = token_logprobs(h, weight, bad, bias=bias, row_index=rows, impl=impl, chunk_size=4, **kw)
    want, _ = naive_token_logprobs(hidden.double(), weight.double(), labels.clamp(min=0), bias=bias.double())
    good = torch.ones_like(labels, dtype=torch.bool)
    good[[1, 7]] = False
    good &= labels != -100
    assert torch.isnan(logp[[1, 7]]).all()
    torch.testing.assert_close(logp[good].double(), want[good], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(neg).all()


# ---------------------------------------------------------------------------------------------------------
# The fp32-accumulating GEMM: a missing kernel selects the fallback, nothing else does
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture
def fresh_probe(monkeypatch):
    monkeypatch.setattr(chunked, "_ACCUMULATING_GEMM", {})


def _raising(exc):
    def addmm(*args, **kwargs):
        if "out_dtype" in kwargs:
            raise exc
        return torch.ops.aten.addmm.default(*args)
    return addmm


@pytest.mark.usefixtures("fresh_probe")
@pytest.mark.parametrize("exc", [NotImplementedError("Could not run 'aten::addmm.dtype_out' with arguments from the "
                                                     "'CPU' backend"), TypeError("unexpected keyword 'out_dtype'")],
                         ids=["no kernel", "no keyword"])
def test_a_missing_kernel_selects_the_fallback_once_and_says_so(monkeypatch, caplog, exc):
    monkeypatch.setattr(torch, "addmm", _raising(exc))
    with caplog.at_level(logging.INFO, logger=chunked.__name__):
        assert chunked.accumulating_gemm(torch.device("cpu"), torch.bfloat16) is False
        assert chunked.accumulating_gemm(torch.device("cpu"), torch.bfloat16) is False
    notes = [r.getMessage() for r in caplog.records if "fp32 accumulation" in r.getMessage()]
    assert len(notes) == 1 and "fp32 copies" in notes[0]
    acc, a, b = torch.zeros(5, 3), torch.randn(5, 4).bfloat16(), torch.randn(4, 3).bfloat16()
    chunked.add_product_(acc, a, b)  # the fallback's answer
    torch.testing.assert_close(acc, a.float() @ b.float())


@pytest.mark.usefixtures("fresh_probe")
@pytest.mark.parametrize("exc", [torch.OutOfMemoryError("CUDA out of memory"),
                                 RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling cublasGemmEx")],
                         ids=["out of memory", "cublas error"])
def test_any_other_error_propagates(monkeypatch, exc):
    monkeypatch.setattr(torch, "addmm", _raising(exc))
    with pytest.raises(type(exc)):
        chunked.accumulating_gemm(torch.device("cpu"), torch.float16)
    # ... and so does one from the real product, once the GEMM is known to exist.
    chunked._ACCUMULATING_GEMM[("cpu", torch.float16)] = True
    with pytest.raises(type(exc)):
        chunked.add_product_(torch.zeros(5, 3), torch.randn(5, 4).half(), torch.randn(4, 3).half())
