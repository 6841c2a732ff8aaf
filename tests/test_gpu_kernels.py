"""bf16 on a CUDA GPU: the fused log-prob op and BNF's and ASFT's single passes against an fp64 reference (ASFT in
fp16 too), and the op's memory.

Skipped without CUDA. Both implementations ("triton" and "torch") run on the same bf16 inputs, and each result
is compared with `log_softmax(hidden.double() @ weight.double().T)` (plus bias, scale and soft-cap) computed
in fp64 on those same inputs, backpropagated by autograd from the same random upstream gradient.
Tolerances (bf16 logits carry a relative rounding error of 2^-9: ~0.01 at the |z| ~ 4 of the largest
logits here, which moves a probability by ~1%):
- log-probs and negative entropy of the scored rows: max |got - ref| < 5e-2;
- gradients w.r.t. hidden, weight and bias: ||got - ref|| / ||ref|| < 1e-2;
- ignored rows: exactly 0 for the log-prob, the negative entropy and their d hidden row.
Backward schedules are chosen with `chunk_size` (`kernels.schedule.vocab_slice_cols`): the default
workspace; a chunk size whose block gives several vocabulary slices; one whose block is too small for a
slice of MIN_SLICE_COLS columns, so the backward goes by row chunks (each case checks the rule picks the
schedule it asks for).
Memory: the extra peak of one full fine-tuning forward + backward (N=4096, H=1024, V=128256) stays within
one logits block + one fp32 [V, H] + one fp32 [N, H] + 64 MiB, and naive PyTorch's does not.
"""
from __future__ import annotations

import gc
import math
from dataclasses import dataclass

import pytest
import torch

from axolotl_bnf_plugin.kernels import token_logprobs
from axolotl_bnf_plugin.kernels.schedule import MIN_SLICE_COLS, rows_per_block, vocab_slice_cols
from axolotl_bnf_plugin.methods.bnf import bnf_loss, bnf_response_scale

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 kernels on a CUDA GPU")

DEVICE = torch.device("cuda")
DTYPE = torch.bfloat16
IGNORE = -100
IMPLS = ["triton", "torch"]
LOGP_ATOL = 5e-2
GRAD_RTOL = 1e-2
MIB = 2**20

SHAPES = {"N1000-H512-V32000": (1000, 512, 32000), "N300-H512-V128256": (300, 512, 128256)}
OPTIONS = {
    "plain": {},
    "bias": {"bias": True},
    "softcap-scale": {"softcap": 30.0, "scale": 0.5},
    "softcap-scale-bias": {"softcap": 30.0, "scale": 0.5, "bias": True},
}
SCHEDULES = ["default", "vocab-slices", "row-chunks"]


@dataclass
class Case:
    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    labels: torch.Tensor
    upstream: torch.Tensor
    transform: dict
    ref: tuple  # fp64 (logp, neg_entropy, d hidden, d weight, d bias)


def make_inputs(n, h, v, seed, bias=False, ignored_frac=0.1):
    """bf16 hidden / weight with logits of about unit variance, labels with ignored rows (the last row
    among them) and both ends of the vocabulary, and an fp32 upstream gradient."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, device=DEVICE).to(DTYPE)
    weight = (torch.randn(v, h, generator=g, device=DEVICE) / h**0.5).to(DTYPE)
    b = (0.5 * torch.randn(v, generator=g, device=DEVICE)).to(DTYPE) if bias else None
    labels = torch.randint(0, v, (n,), generator=g, device=DEVICE)
    labels[torch.rand(n, generator=g, device=DEVICE) < ignored_frac] = IGNORE
    labels[0], labels[1], labels[-1] = 0, v - 1, IGNORE
    upstream = torch.randn(n, generator=g, device=DEVICE)
    return hidden, weight, b, labels, upstream


def naive_fp64(hidden, weight, bias, labels, softcap=None, scale=None):
    """Per-row (logp, neg_entropy) from the full fp64 logits; differentiable w.r.t. fp64 leaves."""
    z = hidden @ weight.t()
    if bias is not None:
        z = z + bias
    if scale is not None:
        z = z * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    log_p = torch.log_softmax(z, dim=-1)
    valid = labels != IGNORE
    logp = torch.where(valid, log_p.gather(1, labels.clamp(min=0)[:, None])[:, 0], torch.zeros_like(log_p[:, 0]))
    neg_entropy = torch.where(valid, (log_p.exp() * log_p).sum(-1), torch.zeros_like(logp)).detach()
    return logp, neg_entropy


def fp64_leaves(*tensors):
    return [t.detach().double().requires_grad_(True) if t is not None else None for t in tensors]


@pytest.fixture(scope="module")
def cases():
    """Inputs and their fp64 reference per (shape, options), built once and shared by every impl / schedule."""
    built = {}

    def get(shape_id: str, options_id: str) -> Case:
        if (shape_id, options_id) not in built:
            n, h, v = SHAPES[shape_id]
            options = dict(OPTIONS[options_id])
            seed = list(SHAPES).index(shape_id) * 10 + list(OPTIONS).index(options_id)
            hidden, weight, bias, labels, upstream = make_inputs(n, h, v, seed, bias=options.pop("bias", False))
            h64, w64, b64 = fp64_leaves(hidden, weight, bias)
            logp, neg = naive_fp64(h64, w64, b64, labels, **options)
            (logp * upstream.double()).sum().backward()
            ref = (logp.detach(), neg, h64.grad, w64.grad, b64.grad if b64 is not None else None)
            built[shape_id, options_id] = Case(hidden, weight, bias, labels, upstream, options, ref)
        return built[shape_id, options_id]

    yield get
    built.clear()
    torch.cuda.empty_cache()


def chunk_for(schedule: str, rows: int, vocab: int, impl: str) -> int | None:
    """A chunk size that makes the two-pass backward take `schedule` for `rows` scored rows (checked)."""
    if schedule == "default":
        return None
    if schedule == "vocab-slices":  # slices of at least 2 * MIN_SLICE_COLS columns, fewer than V
        chunk = math.ceil(2 * MIN_SLICE_COLS * rows / vocab)
        cols = vocab_slice_cols(rows, vocab, DTYPE, impl, "cuda", chunk_size=chunk)
        assert cols is not None and cols < vocab, f"chunk_size={chunk} gives {cols} columns of {vocab}"
        return chunk
    chunk = max(1, math.ceil(MIN_SLICE_COLS * rows / vocab) - 1)  # a block too small for one slice
    cols = vocab_slice_cols(rows, vocab, DTYPE, impl, "cuda", chunk_size=chunk)
    assert cols is None, f"chunk_size={chunk} still gives vocabulary slices of {cols} columns"
    return chunk


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).norm() / ref.double().norm().clamp(min=1e-30)).item()


def run_op(case: Case, impl: str, chunk: int | None, need_weight: bool = True):
    hidden = case.hidden.detach().clone().requires_grad_(True)
    weight = case.weight.detach().clone().requires_grad_(need_weight)
    bias = case.bias.detach().clone().requires_grad_(True) if case.bias is not None else None
    logp, neg = token_logprobs(hidden, weight, case.labels, bias=bias, chunk_size=chunk, impl=impl, **case.transform)
    (logp * case.upstream).sum().backward()
    torch.cuda.synchronize()
    return logp.detach(), neg.detach(), hidden.grad, weight.grad, bias.grad if bias is not None else None


def check_values(case: Case, logp, neg):
    scored = case.labels != IGNORE
    assert logp.dtype == torch.float32 and neg.dtype == torch.float32
    for name, got, ref in (("logp", logp, case.ref[0]), ("neg_entropy", neg, case.ref[1])):
        assert torch.isfinite(got).all(), name
        err = (got.double() - ref)[scored].abs().max().item()
        assert err < LOGP_ATOL, f"{name}: max abs error {err:.3e}"
        assert (got[~scored] == 0).all(), f"{name} of an ignored row is not 0"


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("options_id", list(OPTIONS))
@pytest.mark.parametrize("shape_id", list(SHAPES))
@pytest.mark.parametrize("impl", IMPLS)
def test_logprobs_and_gradients_match_fp64(cases, impl, shape_id, options_id, schedule):
    case = cases(shape_id, options_id)
    rows, vocab = int((case.labels != IGNORE).sum()), case.weight.shape[0]
    logp, neg, d_hidden, d_weight, d_bias = run_op(case, impl, chunk_for(schedule, rows, vocab, impl))
    check_values(case, logp, neg)
    assert d_hidden.dtype == DTYPE and d_weight.dtype == DTYPE
    assert (d_hidden[case.labels == IGNORE] == 0).all(), "an ignored row got a gradient"
    for name, got, ref in (("d_hidden", d_hidden, case.ref[2]), ("d_weight", d_weight, case.ref[3]),
                           ("d_bias", d_bias, case.ref[4])):
        if ref is None:
            assert got is None, name
            continue
        assert torch.isfinite(got).all(), name
        err = rel_err(got, ref)
        assert err < GRAD_RTOL, f"{name}: relative error {err:.3e}"


@pytest.mark.parametrize("impl", IMPLS)
def test_frozen_weight_gives_the_same_hidden_gradient(cases, impl):
    """Without d weight the backward always goes by row chunks (nothing to gain from slices)."""
    case = cases("N1000-H512-V32000", "softcap-scale")
    logp, neg, d_hidden, d_weight, _ = run_op(case, impl, None, need_weight=False)
    check_values(case, logp, neg)
    assert d_weight is None
    err = rel_err(d_hidden, case.ref[2])
    assert err < GRAD_RTOL, f"d_hidden: relative error {err:.3e}"


# BNF: 4 responses of 250 positions (two pairs), 20% of positions unscored (prompt tokens).
BNF_B, BNF_T, BNF_H, BNF_V = 4, 250, 512, 32000


@pytest.mark.parametrize("chunk", [None, 64], ids=["chunk-default", "chunk-64"])
@pytest.mark.parametrize("transform", [{}, {"softcap": 30.0, "scale": 0.5}], ids=["plain", "softcap-scale"])
@pytest.mark.parametrize("impl", IMPLS)
def test_bnf_single_pass_matches_two_pass_and_fp64(impl, transform, chunk):
    from axolotl_bnf_plugin.methods.bnf import BNF_GRAD_RULE

    B, T = BNF_B, BNF_T
    hidden, weight, bias, labels, _ = make_inputs(B * T, BNF_H, BNF_V, seed=99, bias=True, ignored_frac=0.2)
    mask = (labels != IGNORE).view(B, T)
    sign = torch.tensor([1, -1, 1, -1], device=DEVICE)
    pair_ids = torch.tensor([0, 0, 1, 1], device=DEVICE)
    with torch.no_grad():  # a reference model: the policy's own log-probs, shifted so that about half are clipped
        g = torch.Generator(device=DEVICE).manual_seed(5)
        exact = naive_fp64(*fp64_leaves(hidden, weight, bias), labels, **transform)[0]
        ref_logp = (exact + torch.randn(exact.shape, generator=g, device=DEVICE, dtype=torch.float64)).float()
    token_scale = bnf_response_scale(mask, sign, pair_ids)[:, None].expand(B, T).reshape(-1)

    def loss_and_grads(logps, leaves):
        logp, neg = logps[:2]
        loss, _ = bnf_loss(logp.view(B, T), ref_logp.view(B, T), neg.view(B, T), mask, sign, pair_ids)
        grads = torch.autograd.grad(3.5 * loss, leaves)  # any constant factor upstream is allowed
        torch.cuda.synchronize()  # surfaces the single pass's asynchronous upstream-gradient check here
        return loss.detach().double(), grads

    def fused(**rule):
        leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias)]
        return loss_and_grads(token_logprobs(*leaves[:2], labels, bias=leaves[2], chunk_size=chunk, impl=impl,
                                             **transform, **rule), leaves)

    single = fused(grad_rule=BNF_GRAD_RULE, grad_inputs=(ref_logp, token_scale))
    two_pass = fused()
    leaves64 = fp64_leaves(hidden, weight, bias)
    truth = loss_and_grads(naive_fp64(*leaves64, labels, **transform), leaves64)

    assert torch.isfinite(single[0]) and abs(single[0].item()) > 0
    torch.testing.assert_close(single[0], two_pass[0], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(single[0], truth[0], rtol=1e-2, atol=1e-2)
    for name, got, other, ref in zip(("d_hidden", "d_weight", "d_bias"), single[1], two_pass[1], truth[1]):
        assert got.dtype == DTYPE and torch.isfinite(got).all(), name
        for what, err in (("vs fp64", rel_err(got, ref)), ("two-pass vs fp64", rel_err(other, ref)),
                          ("vs two-pass", rel_err(got, other))):
            assert err < GRAD_RTOL, f"{name} {what}: relative error {err:.3e}"


# ASFT: six responses of uneven length (three pairs), every position scored; the first is longer than a
# block of 256 rows, so with chunk 256 its rows take the two-pass op and the others the single pass.
ASFT_LENGTHS, ASFT_H, ASFT_V = [300, 180, 40, 250, 90, 140], 512, 32000


@pytest.mark.parametrize("chunk", [None, 256], ids=["all-fit", "one-long"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("impl", IMPLS)
def test_asft_single_pass_matches_two_pass_and_fp64(impl, dtype, chunk):
    """ASFT's rule over whole responses: one logits pass for every response that fits a block, in bf16 and in
    fp16 (each block its own prescale), the same gradients as the two-pass op and as fp64 autograd."""
    from axolotl_bnf_plugin.kernels import with_rule_gradient
    from axolotl_bnf_plugin.methods.asft import asft_grad_rule, asft_loss

    lengths, n = ASFT_LENGTHS, sum(ASFT_LENGTHS)
    hidden, weight, bias, labels, _ = make_inputs(n, ASFT_H, ASFT_V, seed=7, bias=True, ignored_frac=0.0)
    labels[-1] = 3  # every row scored: the segments are the responses
    hidden, weight, bias = hidden.to(dtype), weight.to(dtype), bias.to(dtype)
    mask = torch.arange(max(lengths), device=DEVICE)[None, :] < torch.tensor(lengths, device=DEVICE)[:, None]
    sign = torch.tensor([1, -1] * 3, device=DEVICE)
    pair_ids = torch.arange(6, device=DEVICE) // 2
    per_token = torch.repeat_interleave(torch.arange(6, device=DEVICE), torch.tensor(lengths, device=DEVICE))
    rule = asft_grad_rule(1.0, 1.0, 1.0)
    upstream = 2.0**12 if dtype == torch.float16 else 3.5  # an fp16 loss scale, or any constant

    def loss_and_grads(logps, leaves, rule_grad=None):
        logp = logps[0].float()
        rows = logp.new_zeros(mask.shape).masked_scatter(mask, logp)
        loss, _ = asft_loss(rows, mask, sign, pair_ids)
        if rule_grad is not None:
            loss = with_rule_gradient(loss, logp, rule_grad)
        grads = torch.autograd.grad(upstream * loss, leaves)
        torch.cuda.synchronize()
        return loss.detach().double(), grads  # all scaled alike: the relative errors below are unaffected

    leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias)]
    out = token_logprobs(*leaves[:2], labels, bias=leaves[2], chunk_size=chunk, impl=impl, grad_rule=rule,
                         grad_inputs=(sign.float()[per_token], torch.full((n,), 1 / 3, device=DEVICE)),
                         segment_lengths=lengths)
    single = loss_and_grads(out, leaves, rule_grad=out[2])
    leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias)]
    two_pass = loss_and_grads(token_logprobs(*leaves[:2], labels, bias=leaves[2], chunk_size=chunk, impl=impl),
                              leaves)
    leaves64 = fp64_leaves(hidden, weight, bias)
    truth = loss_and_grads(naive_fp64(*leaves64, labels), leaves64)

    assert torch.isfinite(single[0]) and abs(single[0].item()) > 0
    torch.testing.assert_close(single[0], two_pass[0], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(single[0], truth[0], rtol=1e-2, atol=1e-2)
    for name, got, other, ref in zip(("d_hidden", "d_weight", "d_bias"), single[1], two_pass[1], truth[1]):
        assert got.dtype == dtype and torch.isfinite(got).all(), name
        for what, err in (("vs fp64", rel_err(got, ref)), ("two-pass vs fp64", rel_err(other, ref)),
                          ("vs two-pass", rel_err(got, other))):
            assert err < GRAD_RTOL, f"{name} {what}: relative error {err:.3e}"


# Memory: full fine-tuning (d hidden and d weight) at a Llama-3 vocabulary.
MEM_N, MEM_H, MEM_V = 4096, 1024, 128256


def _step(loss_fn, hidden, weight):
    h, w = hidden.detach().requires_grad_(True), weight.detach().requires_grad_(True)
    loss_fn(h, w).backward()
    return h.grad, w.grad


def extra_peak(loss_fn, hidden, weight) -> int:
    """max_memory_allocated during one forward + backward, minus what was allocated before and minus the
    gradients it returns; after one unmeasured step (kernels compiled, cuBLAS workspaces allocated)."""
    _step(loss_fn, hidden, weight)
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(DEVICE)
    before = torch.cuda.memory_allocated(DEVICE)
    grads = _step(loss_fn, hidden, weight)
    torch.cuda.synchronize()
    grad_bytes = sum(g.numel() * g.element_size() for g in grads)
    return torch.cuda.max_memory_allocated(DEVICE) - before - grad_bytes


@pytest.fixture(scope="module")
def memory_inputs():
    hidden, weight, _, labels, upstream = make_inputs(MEM_N, MEM_H, MEM_V, seed=3, ignored_frac=0.0)
    labels[-1] = 5  # every row scored
    yield hidden, weight, labels, upstream
    del hidden, weight, labels, upstream
    gc.collect()
    torch.cuda.empty_cache()


def memory_bound(method: str) -> int:
    """One logits block (the larger of the forward's row block and, for the two-pass backward, its
    vocabulary slice over all rows) + one fp32 [V, H] + one fp32 [N, H] + 64 MiB."""
    block = rows_per_block(MEM_V, DTYPE, "triton") * MEM_V * 2
    if method == "two-pass":
        cols = vocab_slice_cols(MEM_N, MEM_V, DTYPE, "triton")
        block = max(block, MEM_N * cols * 2 if cols else 0)
    return block + MEM_V * MEM_H * 4 + MEM_N * MEM_H * 4 + 64 * MIB


def memory_loss(method: str, labels, upstream):
    if method == "two-pass":
        return lambda h, w: (token_logprobs(h, w, labels, impl="triton")[0] * upstream).sum()
    if method == "naive":
        return lambda h, w: (torch.log_softmax((h @ w.t()).float(), -1).gather(1, labels[:, None])[:, 0]
                             * upstream).sum()
    from axolotl_bnf_plugin.methods.bnf import BNF_GRAD_RULE

    mask, sign = (labels != IGNORE)[None], torch.ones(1, dtype=torch.long, device=DEVICE)
    ref = torch.full(labels.shape, -8.0, device=DEVICE)
    scale = bnf_response_scale(mask, sign)[:, None].expand(mask.shape).reshape(-1)

    def loss(h, w):
        logp, neg, _ = token_logprobs(h, w, labels, impl="triton", grad_rule=BNF_GRAD_RULE, grad_inputs=(ref, scale))
        return bnf_loss(logp[None], ref[None], neg[None], mask, sign)[0]

    return loss


@pytest.mark.parametrize("method", ["two-pass", "bnf single pass"])
def test_peak_memory_is_one_block_and_the_accumulators(memory_inputs, method):
    hidden, weight, labels, upstream = memory_inputs
    peak = extra_peak(memory_loss(method, labels, upstream), hidden, weight)
    bound = memory_bound("two-pass" if method == "two-pass" else "single pass")
    assert peak <= bound, f"{method}: extra peak {peak / MIB:.0f} MiB > bound {bound / MIB:.0f} MiB"


def test_naive_peak_memory_exceeds_the_bound(memory_inputs):
    """The bound is tight enough to fail: materialising the logits goes over it."""
    hidden, weight, labels, upstream = memory_inputs
    peak = extra_peak(memory_loss("naive", labels, upstream), hidden, weight)
    bound = memory_bound("two-pass")
    assert peak > bound, f"naive: extra peak {peak / MIB:.0f} MiB <= bound {bound / MIB:.0f} MiB"


# --------------------------------------------------------------------------------------------------------------
# The regimes real models produce (confident tokens, policy = reference), compiled; faults as Python errors
# --------------------------------------------------------------------------------------------------------------

REGIME_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("transform", ["plain", "softcap-scale"])
@pytest.mark.parametrize("impl", IMPLS)
def test_single_pass_equals_two_pass_on_confident_tokens(impl, transform, dtype):
    from logit_regimes import TRANSFORMS, bnf_grads, max_rel_err, regime_inputs

    options = TRANSFORMS[transform]
    hidden, weight, labels, ref, regime, p = regime_inputs(options, dtype, device=DEVICE)
    assert (p[regime < 3] > 1 - 1e-6).all()
    single = bnf_grads(hidden, weight, labels, ref, impl, options, single_pass=True)
    two_pass = bnf_grads(hidden, weight, labels, ref, impl, options, single_pass=False)
    # A loss that recomputes the rule itself (torch's exp, not the kernel's) is not a misuse either.
    recomputed = bnf_grads(hidden, weight, labels, ref, impl, options, single_pass=True, loss_uses_op_gradient=False)
    torch.cuda.synchronize()
    for name, got, other, want in zip(("d hidden", "d weight"), single, recomputed, two_pass):
        assert torch.isfinite(got).all() and want.abs().max() > 0, name
        assert max_rel_err(got, want) < REGIME_TOL[dtype], f"{name}: {max_rel_err(got, want):.2e}"
        assert max_rel_err(other, want) < REGIME_TOL[dtype], f"{name}, recomputed: {max_rel_err(other, want):.2e}"


@pytest.mark.parametrize("impl", IMPLS)
def test_a_misuse_is_a_python_error_and_the_gpu_lives_on(impl):
    """No device-side assert: the wrong loss's gradients come back NaN (the step guard skips them), the error is
    raised once the flag reaches the host, and the CUDA context still works."""
    from axolotl_bnf_plugin.kernels import SinglePassMisuse, raise_pending
    from axolotl_bnf_plugin.methods.bnf import BNF_GRAD_RULE
    from logit_regimes import regime_inputs

    hidden, weight, labels, ref, _, _ = regime_inputs({}, torch.float32, device=DEVICE, seed=3)
    h = hidden.clone().requires_grad_()
    logp, _, _ = token_logprobs(h, weight, labels, impl=impl, grad_rule=BNF_GRAD_RULE,
                                grad_inputs=(ref, torch.full_like(ref, 0.1)))
    (logp * torch.linspace(-1, 1, logp.shape[0], device=DEVICE)).sum().backward()  # returns: no host sync
    assert torch.isnan(h.grad).all()
    with pytest.raises(SinglePassMisuse, match="may only feed the loss whose rule it is"):
        raise_pending(wait=True)
    raise_pending(wait=True)  # reported once
    logp, _ = token_logprobs(hidden, weight, labels, impl=impl)
    assert torch.isfinite(logp).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_an_out_of_vocabulary_label_with_row_index_reads_nothing(impl):
    hidden = torch.randn(64, 32, device=DEVICE, dtype=DTYPE)
    weight = torch.randn(1000, 32, device=DEVICE, dtype=DTYPE)
    labels = torch.randint(0, 1000, (64,), device=DEVICE)
    labels[5], labels[9] = 10**9, -3
    logp, neg = token_logprobs(hidden, weight, labels, row_index=torch.arange(64, device=DEVICE), impl=impl)
    torch.cuda.synchronize()
    assert torch.isnan(logp[[5, 9]]).all() and torch.isfinite(logp[:5]).all() and torch.isfinite(neg).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_a_head_on_another_gpu_runs_there(impl):
    """Launches go to the tensors' device, not the current one (a model split across GPUs)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    g = torch.Generator().manual_seed(4)
    hidden, weight = torch.randn(300, 64, generator=g), torch.randn(5000, 64, generator=g)
    labels, upstream = torch.randint(0, 5000, (300,), generator=g), torch.randn(300, generator=g)
    results = []
    for device in ("cuda:0", "cuda:1"):
        h, w = hidden.to(device).requires_grad_(), weight.to(device).requires_grad_()
        with torch.cuda.device(0):
            logp, _ = token_logprobs(h, w, labels.to(device), impl=impl)
            (logp * upstream.to(device)).sum().backward()
        results.append([t.cpu() for t in (logp.detach(), h.grad, w.grad)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
