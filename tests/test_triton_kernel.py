"""The Triton implementation of `token_logprobs` against the PyTorch one.

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest), in fp32 and fp16
(its bf16 `tl.dot` is wrong, though these kernels do no dot). With a GPU the same tests run on CUDA,
plus bf16 with a CCE-style criterion: the error against an fp32 truth is no larger than plain bf16
PyTorch's error plus a small tolerance.
"""
from __future__ import annotations

import pytest
import torch

from axolotl_bnf_plugin.kernels import resolve_impl, token_logprobs, triton_available

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not triton_available(DEVICE), reason="Triton cannot run here")


@pytest.fixture(autouse=True)
def small_vocab_blocks(monkeypatch):
    """Force several vocabulary blocks per row even for small V, so the online softmax is exercised."""
    from axolotl_bnf_plugin.kernels import triton_rows

    monkeypatch.setattr(triton_rows, "MAX_BLOCK_V", 16)


def make(n, h, v, dtype, seed=0, ignore_frac=0.2, bias=False):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g) * 0.8).to(DEVICE, dtype)
    weight = (torch.randn(v, h, generator=g) * 0.8).to(DEVICE, dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < ignore_frac] = -100
    b = (torch.randn(v, generator=g) * 0.5).to(DEVICE, dtype) if bias else None
    return hidden, weight, labels.to(DEVICE), b, torch.randn(n, generator=g).to(DEVICE)


def run(impl, hidden, weight, labels, bias, upstream, **kw):
    hidden = hidden.detach().clone().requires_grad_(True)
    weight = weight.detach().clone().requires_grad_(True)
    bias = bias.detach().clone().requires_grad_(True) if bias is not None else None
    logp, neg_entropy = token_logprobs(hidden, weight, labels, bias=bias, impl=impl, **kw)
    (logp * upstream).sum().backward()
    return logp, neg_entropy, hidden.grad, weight.grad, bias.grad if bias is not None else None


TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.float16: dict(atol=2e-2, rtol=2e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("n,h,v,chunk", [(1, 8, 3, None), (7, 16, 17, 3), (33, 24, 100, 8), (20, 8, 257, 64)])
@pytest.mark.parametrize("options", [{}, {"softcap": 5.0}, {"scale": 0.6}, {"softcap": 4.0, "scale": 1.7, "bias": True}],
                         ids=["plain", "softcap", "scale", "softcap-scale-bias"])
def test_triton_matches_torch(dtype, n, h, v, chunk, options):
    options = dict(options)
    bias_flag = options.pop("bias", False)
    hidden, weight, labels, bias, up = make(n, h, v, dtype, seed=n * v, bias=bias_flag)
    ref = run("torch", hidden, weight, labels, bias, up, chunk_size=chunk, **options)
    got = run("triton", hidden, weight, labels, bias, up, chunk_size=chunk, **options)
    for name, r, g in zip(("logp", "neg_entropy", "d_hidden", "d_weight", "d_bias"), ref, got):
        if r is None:
            assert g is None
            continue
        assert g.dtype == r.dtype, name
        torch.testing.assert_close(g.float(), r.float(), **TOL[dtype], msg=name)
    ignored = labels == -100
    assert (got[0][ignored] == 0).all() and (got[2][ignored] == 0).all()


def test_frozen_weight_skips_weight_gradient():
    hidden, weight, labels, _, up = make(9, 8, 40, torch.float32)
    h = hidden.clone().requires_grad_(True)
    logp, _ = token_logprobs(h, weight, labels, impl="triton")
    (logp * up).sum().backward()
    ref = run("torch", hidden, weight, labels, None, up)
    torch.testing.assert_close(h.grad, ref[2], **TOL[torch.float32])
    assert weight.grad is None


def test_all_rows_ignored():
    hidden, weight, labels, _, up = make(5, 8, 30, torch.float32, ignore_frac=1.1)
    logp, neg_entropy, d_h, d_w, _ = run("triton", hidden, weight, labels, None, up)
    assert not logp.any() and not neg_entropy.any() and not d_h.any() and not d_w.any()


def test_extreme_logits_stay_finite():
    hidden, weight, labels, _, up = make(6, 4, 50, torch.float32, ignore_frac=0.0)
    logp, neg_entropy, d_h, d_w, _ = run("triton", hidden * 300, weight * 300, labels, None, up)
    ref = run("torch", hidden * 300, weight * 300, labels, None, up)
    for t in (logp, neg_entropy, d_h, d_w):
        assert torch.isfinite(t).all()
    torch.testing.assert_close(logp, ref[0], atol=1e-2, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 needs a GPU (the interpreter's bf16 is unreliable)")
@pytest.mark.parametrize("n,h,v", [(256, 512, 32000), (1000, 256, 128256)])
def test_bf16_error_no_worse_than_plain_pytorch(n, h, v):
    hidden, weight, labels, _, up = make(n, h, v, torch.bfloat16, ignore_frac=0.1)
    truth = run("torch", hidden.float(), weight.float(), labels, None, up)
    fused = run("triton", hidden, weight, labels, None, up)

    def naive_bf16():
        hh, ww = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        z = hh @ ww.t()
        logp = torch.log_softmax(z.float(), -1).gather(1, labels.clamp(min=0)[:, None])[:, 0] * (labels != -100)
        (logp * up).sum().backward()
        return logp, None, hh.grad, ww.grad

    plain = naive_bf16()
    for i, name in ((0, "logp"), (2, "d_hidden"), (3, "d_weight")):
        err_fused = (fused[i].float() - truth[i].float()).abs().max().item()
        err_plain = (plain[i].float() - truth[i].float()).abs().max().item()
        assert err_fused <= err_plain + 1e-2 * (1 + truth[i].abs().max().item()), (name, err_fused, err_plain)


def test_impl_resolution():
    assert resolve_impl("auto", torch.device("cpu")) == "torch"
    assert resolve_impl("triton", DEVICE) == "triton"
    with pytest.raises(ValueError, match="impl"):
        resolve_impl("cuda", DEVICE)


def test_op_compiles_without_graph_breaks():
    """The op is a custom op: torch.compile(fullgraph=True) traces around it (forward and backward)."""
    hidden, weight, labels, _, up = make(12, 8, 40, torch.float32, ignore_frac=0.0)
    rows = torch.arange(12, device=DEVICE)

    def loss_fn(h, w):
        logp, neg_entropy = token_logprobs(torch.tanh(h), w, labels, row_index=rows, impl="torch", chunk_size=5)
        return (logp * up).sum() + neg_entropy.sum()

    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    compiled(h1, w1).backward()
    loss_fn(h2, w2).backward()
    torch.testing.assert_close(h1.grad, h2.grad)
    torch.testing.assert_close(w1.grad, w2.grad)
