"""The fused, chunked `token_logprobs` op against materialised logits, plus its memory contract.

The reference materialises the full `[N, V]` logits in float64 (from the same, possibly low-precision,
input values), applies scale / soft-cap, takes `log_softmax`, gathers the label and sums `p log p`.
Gradients are compared through a random upstream gradient on `logp`.
"""
from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils._pytree import tree_leaves
from torch.utils._python_dispatch import TorchDispatchMode

from axolotl_bnf_plugin.kernels import chunked
from axolotl_bnf_plugin.kernels import DEFAULT_WORKSPACE_BYTES, default_chunk_size, token_logprobs


# --------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------

def naive_token_logprobs(hidden, weight, labels, bias=None, ignore_index=-100, softcap=None, scale=None):
    """Full logits, float64. Differentiable w.r.t. whatever leaves are passed in."""
    z = hidden.double() @ weight.double().t()
    if bias is not None:
        z = z + bias.double()
    if scale is not None:
        z = z * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    log_p = torch.log_softmax(z, dim=-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    logp = log_p.gather(1, safe[:, None]).squeeze(1)
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    neg_entropy = (log_p.exp() * log_p).sum(-1).detach()
    neg_entropy = torch.where(valid, neg_entropy, torch.zeros_like(neg_entropy))
    return logp, neg_entropy


def make_inputs(N, H, V, seed, dtype=torch.float32, with_bias=False, ignore_frac=0.0, ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) * (1.5 / H**0.5)
    bias = torch.randn(V, generator=g) * 0.5 if with_bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    if ignore_frac:
        drop = torch.rand(N, generator=g) < ignore_frac
        labels[drop] = ignore_index
    upstream = torch.randn(N, generator=g)
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    bias = bias.to(dtype) if bias is not None else None
    return hidden, weight, bias, labels, upstream


def run_both(hidden, weight, bias, labels, upstream, need=("h", "w", "b"), **kw):
    """(impl logp, impl -entropy, impl grads) and the same from the float64 reference."""
    chunk_size, impl = kw.pop("chunk_size", None), kw.pop("impl", "auto")
    leaves = {"h": hidden, "w": weight, "b": bias}
    impl_in = {k: (v.detach().clone().requires_grad_(k in need) if v is not None else None) for k, v in leaves.items()}
    ref_in = {k: (v.detach().double().requires_grad_(k in need) if v is not None else None) for k, v in leaves.items()}

    logp, ne = token_logprobs(impl_in["h"], impl_in["w"], labels, bias=impl_in["b"], chunk_size=chunk_size, impl=impl,
                              **kw)
    (logp * upstream).sum().backward()
    r_logp, r_ne = naive_token_logprobs(ref_in["h"], ref_in["w"], labels, bias=ref_in["b"], **kw)
    (r_logp * upstream.double()).sum().backward()
    impl_grads = {k: impl_in[k].grad for k in need if impl_in[k] is not None}
    ref_grads = {k: ref_in[k].grad for k in need if ref_in[k] is not None}
    return (logp, ne, impl_grads, impl_in), (r_logp, r_ne, ref_grads)


def assert_matches(impl, ref, atol=2e-5, rtol=1e-4, gatol=2e-5, grtol=1e-4):
    logp, ne, grads, impl_in = impl
    r_logp, r_ne, r_grads = ref
    assert logp.dtype == torch.float32 and ne.dtype == torch.float32
    assert logp.shape == r_logp.shape and ne.shape == r_ne.shape
    torch.testing.assert_close(logp.double(), r_logp.detach(), atol=atol, rtol=rtol)
    torch.testing.assert_close(ne.double(), r_ne, atol=atol, rtol=rtol)
    for k, g in r_grads.items():
        got = grads[k]
        assert got is not None, k
        assert got.dtype == impl_in[k].dtype and got.shape == impl_in[k].shape, k
        torch.testing.assert_close(got.double(), g, atol=gatol, rtol=grtol, msg=lambda m: f"grad {k}: {m}")


# --------------------------------------------------------------------------------------------------
# Forward / backward against the reference
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk", [1, 3, 16, "bigger_than_n", None])
@pytest.mark.parametrize("V", [3, 17, 257])
@pytest.mark.parametrize("H", [5, 24])
@pytest.mark.parametrize("N", [1, 7, 33, 130])
def test_matches_materialised_logits(N, H, V, chunk):
    torch.manual_seed(0)
    chunk_size = N + 5 if chunk == "bigger_than_n" else chunk
    hidden, weight, bias, labels, up = make_inputs(N, H, V, seed=N * 1000 + H * 10 + V)
    impl, ref = run_both(hidden, weight, bias, labels, up, need=("h", "w"), chunk_size=chunk_size)
    assert_matches(impl, ref)


TRANSFORMS = [
    dict(),
    dict(bias=True),
    dict(softcap=3.0),
    dict(softcap=30.0),
    dict(scale=0.25),
    dict(scale=4.0),
    dict(scale=-1.5),
    dict(softcap=2.0, scale=3.0),
    dict(softcap=5.0, scale=0.5, bias=True),
]


@pytest.mark.parametrize("chunk", [1, 4, None])
@pytest.mark.parametrize("transform", TRANSFORMS, ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()) or "plain")
def test_bias_scale_softcap(transform, chunk):
    torch.manual_seed(1)
    transform = dict(transform)
    with_bias = transform.pop("bias", False)
    N, H, V = 19, 12, 29
    hidden, weight, bias, labels, up = make_inputs(N, H, V, seed=11, with_bias=with_bias)
    hidden = hidden * 2.0  # large enough logits that the soft-cap really bends them
    impl, ref = run_both(hidden, weight, bias, labels, up, chunk_size=chunk, **transform)
    # |z| reaches ~60 here (scale=4): fp32 rounding of the logits alone is ~1e-5 absolute on logp / -entropy.
    assert_matches(impl, ref, atol=1e-4)
    if with_bias:
        assert impl[2]["b"] is not None


@pytest.mark.parametrize("ignore_index", [-100, -1, 2])
@pytest.mark.parametrize("chunk", [1, 5, None])
def test_ignored_rows(ignore_index, chunk):
    torch.manual_seed(2)
    N, H, V = 40, 8, 13
    hidden, weight, bias, labels, up = make_inputs(
        N, H, V, seed=3, with_bias=True, ignore_frac=0.4, ignore_index=ignore_index
    )
    if ignore_index == 2:  # an in-vocabulary id can be the ignore value: those rows are simply not scored
        labels[:3] = 2
    ignored = labels == ignore_index
    assert ignored.any() and (~ignored).any()
    impl, ref = run_both(hidden, weight, bias, labels, up, chunk_size=chunk, ignore_index=ignore_index)
    assert_matches(impl, ref)
    logp, ne, grads, _ = impl
    assert (logp[ignored] == 0).all() and (ne[ignored] == 0).all()
    assert (grads["h"][ignored] == 0).all()
    # An ignored row contributes nothing to the weight gradient: its upstream gradient is irrelevant.
    up2 = up.clone()
    up2[ignored] = 1e6
    impl2, _ = run_both(hidden, weight, bias, labels, up2, chunk_size=chunk, ignore_index=ignore_index)
    torch.testing.assert_close(impl2[2]["w"], grads["w"])
    torch.testing.assert_close(impl2[2]["b"], grads["b"])


@pytest.mark.parametrize("ignore_index", [-100, 7])
def test_all_rows_ignored(ignore_index):
    N, H, V = 6, 4, 9
    hidden, weight, bias, _, up = make_inputs(N, H, V, seed=4, with_bias=True)
    labels = torch.full((N,), ignore_index)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    logp, ne = token_logprobs(hidden, weight, labels, bias=bias, ignore_index=ignore_index, chunk_size=2)
    assert logp.shape == (N,) and ne.shape == (N,)
    assert (logp == 0).all() and (ne == 0).all()
    (logp * up).sum().backward()
    for t in (hidden, weight, bias):
        assert t.grad is None or (t.grad == 0).all()


def test_empty_input():
    hidden = torch.randn(0, 4, requires_grad=True)
    weight = torch.randn(9, 4, requires_grad=True)
    logp, ne = token_logprobs(hidden, weight, torch.zeros(0, dtype=torch.long), chunk_size=3)
    assert logp.shape == (0,) and ne.shape == (0,)
    logp.sum().backward()
    assert weight.grad is None or (weight.grad == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("transform", [dict(), dict(softcap=4.0, scale=1.5)], ids=["plain", "softcap-scale"])
def test_low_precision_inputs(dtype, transform):
    """bf16 / fp16 inputs: outputs are fp32, close to an fp64 truth computed from the same rounded values."""
    torch.manual_seed(5)
    N, H, V = 37, 32, 101
    hidden, weight, bias, labels, up = make_inputs(N, H, V, seed=6, dtype=dtype, with_bias=True, ignore_frac=0.2)
    impl, ref = run_both(hidden, weight, bias, labels, up, chunk_size=8, **transform)
    # Logits pass through the input dtype once (the matmul output): ~2^-8 relative for bf16.
    tol = 6e-2 if dtype == torch.bfloat16 else 1e-2
    assert_matches(impl, ref, atol=tol, rtol=tol, gatol=tol, grtol=tol)


@pytest.mark.parametrize("labels_dtype", [torch.int32, torch.int64])
def test_label_dtypes_and_noncontiguous_hidden(labels_dtype):
    N, H, V = 21, 6, 15
    g = torch.Generator().manual_seed(8)
    base = torch.randn(H, N, generator=g)
    hidden = base.t()  # non-contiguous view
    assert not hidden.is_contiguous()
    weight = torch.randn(V, H, generator=g) * 0.5
    labels = torch.randint(0, V, (N,), generator=g).to(labels_dtype)
    labels[::4] = -100
    up = torch.randn(N, generator=g)
    impl, ref = run_both(hidden, weight, None, labels, up, need=("h", "w"), chunk_size=4)
    assert_matches(impl, ref)


# --------------------------------------------------------------------------------------------------
# Autograd plumbing
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("need", [("h",), ("w",), ("b",), ("h", "b"), ("w", "b")])
def test_partial_requires_grad(need):
    """Frozen weight (LoRA), hidden-only, bias-only... each requested gradient is right, the rest untouched."""
    N, H, V = 25, 7, 19
    hidden, weight, bias, labels, up = make_inputs(N, H, V, seed=9, with_bias=True, ignore_frac=0.2)
    impl, ref = run_both(hidden, weight, bias, labels, up, need=need, chunk_size=6)
    assert_matches(impl, ref)
    impl_in = impl[3]
    for k in ("h", "w", "b"):
        if k not in need:
            assert impl_in[k].grad is None


def test_neg_entropy_carries_no_gradient():
    N, H, V = 10, 5, 11
    hidden, weight, bias, labels, _ = make_inputs(N, H, V, seed=10, with_bias=True)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    logp, ne = token_logprobs(hidden, weight, labels, bias=bias, chunk_size=3)
    assert logp.requires_grad
    assert not ne.requires_grad and ne.grad_fn is None
    # Mixing -entropy into the objective changes nothing in the gradient.
    g1 = torch.autograd.grad(logp.sum(), (hidden, weight), retain_graph=True)
    g2 = torch.autograd.grad(logp.sum() + (ne * 3.0).sum(), (hidden, weight))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_no_grad_mode_gives_reference_logprobs():
    N, H, V = 30, 6, 23
    hidden, weight, bias, labels, _ = make_inputs(N, H, V, seed=12, ignore_frac=0.3)
    hidden.requires_grad_(True)
    with torch.no_grad():
        logp, ne = token_logprobs(hidden, weight, labels, chunk_size=4)
    assert not logp.requires_grad
    r_logp, r_ne = naive_token_logprobs(hidden.detach(), weight, labels)
    torch.testing.assert_close(logp.double(), r_logp, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(ne.double(), r_ne, atol=2e-5, rtol=1e-4)


def test_chunk_size_does_not_change_result():
    N, H, V = 50, 9, 31
    hidden, weight, bias, labels, up = make_inputs(N, H, V, seed=13, with_bias=True, ignore_frac=0.1)
    results = []
    for chunk in (1, 7, 16, 50, 1000, None):
        impl, _ = run_both(hidden, weight, bias, labels, up, chunk_size=chunk, softcap=6.0)
        results.append(impl)
    first = results[0]
    for other in results[1:]:
        torch.testing.assert_close(other[0], first[0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(other[1], first[1], atol=1e-6, rtol=1e-5)
        for k in ("h", "w", "b"):
            torch.testing.assert_close(other[2][k], first[2][k], atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# Memory contract: no [N, V] tensor, forward or backward
# --------------------------------------------------------------------------------------------------

class NumelRecorder(TorchDispatchMode):
    """Records the largest numel of any tensor any op returns, and which ops ran, per phase."""

    def __init__(self):
        super().__init__()
        self.phase = "forward"
        self.max_numel = {"forward": 0, "backward": 0}
        self.ops = {"forward": set(), "backward": set()}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "axolotl_bnf":
            # The fused op is one custom op: run its Python implementation under the mode so the ops
            # inside it (one logits block at a time) are recorded too, not just its inputs and outputs.
            impl = {"token_logprobs": chunked._forward, "token_logprobs_backward": chunked._backward}
            with self:
                out = impl[func.overloadpacket.__name__](*args, **(kwargs or {}))
        else:
            out = func(*args, **(kwargs or {}))
        self.ops[self.phase].add(func.overloadpacket.__name__)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.max_numel[self.phase] = max(self.max_numel[self.phase], t.numel())
        return out


def _record(fn, hidden, weight, bias, labels, upstream):
    hidden = hidden.detach().clone().requires_grad_(True)
    weight = weight.detach().clone().requires_grad_(True)
    bias = bias.detach().clone().requires_grad_(True)
    rec = NumelRecorder()
    with rec:
        logp, _ = fn(hidden, weight, labels, bias)
        loss = (logp * upstream).sum()
        rec.phase = "backward"
        loss.backward()
    assert hidden.grad is not None and weight.grad is not None and bias.grad is not None
    return rec


def _naive_fp32(hidden, weight, labels, bias):
    z = torch.nn.functional.linear(hidden, weight, bias)
    log_p = torch.log_softmax(z, dim=-1)
    valid = labels != -100
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    logp = log_p.gather(1, safe[:, None]).squeeze(1) * valid
    return logp, (log_p.exp() * log_p).sum(-1).detach()


@pytest.mark.parametrize("ignore_frac", [0.0, 0.1], ids=["all-scored", "some-ignored"])
@pytest.mark.parametrize("transform", [dict(), dict(softcap=10.0, scale=0.7)], ids=["plain", "softcap-scale"])
def test_no_full_logits_tensor_forward_or_backward(transform, ignore_frac):
    N, V, H, chunk = 512, 1000, 16, 32
    hidden, weight, bias, labels, up = make_inputs(N, H, V, seed=14, with_bias=True, ignore_frac=ignore_frac)
    assert (labels == -100).any() == (ignore_frac > 0)
    bound = max(chunk * V, V * H, N * H)
    assert bound < N * V

    def fused(h, w, y, b):
        return token_logprobs(h, w, y, bias=b, chunk_size=chunk, **transform)

    rec = _record(fused, hidden, weight, bias, labels, up)
    # The backward really ran under the recorder (its chunk recomputation and weight-gradient matmul).
    assert rec.ops["backward"] & {"addmm", "addmm_", "mm", "matmul"}, rec.ops["backward"]
    assert "linear" in rec.ops["backward"] or "addmm" in rec.ops["backward"]  # the block is recomputed
    for phase in ("forward", "backward"):
        assert 0 < rec.max_numel[phase] <= bound, (phase, rec.max_numel[phase], bound)
        assert rec.max_numel[phase] < N * V

    # The check is able to fail: materialising the logits is seen, forward and backward.
    control = _record(_naive_fp32, hidden, weight, bias, labels, up)
    assert control.max_numel["forward"] >= N * V
    assert control.max_numel["backward"] >= N * V


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "bad_labels,ignore_index",
    [([0, 9, 1], -100), ([0, -5, 1], -100), ([0, -100, 1], -1), ([10, 11, 12], -100), ([0, -1, 1], -100)],
)
def test_out_of_vocabulary_labels_raise(bad_labels, ignore_index):
    hidden, weight = torch.randn(3, 4), torch.randn(9, 4)
    with pytest.raises(ValueError):
        token_logprobs(hidden, weight, torch.tensor(bad_labels), ignore_index=ignore_index)


@pytest.mark.parametrize(
    "hidden_shape,weight_shape,labels_shape,bias_shape",
    [
        ((5,), (9, 4), (5,), None),  # hidden not 2-D
        ((2, 5, 4), (9, 4), (10,), None),
        ((5, 4), (36,), (5,), None),  # weight not 2-D
        ((5, 4), (9, 4), (5, 1), None),  # labels not 1-D
        ((5, 4), (9, 3), (5,), None),  # hidden size mismatch
        ((5, 4), (9, 4), (6,), None),  # label count mismatch
        ((5, 4), (9, 4), (4,), None),
        ((5, 4), (9, 4), (5,), (8,)),  # bias size mismatch
        ((5, 4), (9, 4), (5,), (9, 1)),
    ],
)
def test_wrong_shapes_raise(hidden_shape, weight_shape, labels_shape, bias_shape):
    hidden, weight = torch.randn(hidden_shape), torch.randn(weight_shape)
    labels = torch.zeros(labels_shape, dtype=torch.long)
    bias = torch.randn(bias_shape) if bias_shape is not None else None
    with pytest.raises(ValueError):
        token_logprobs(hidden, weight, labels, bias=bias)


@pytest.mark.parametrize("kw", [dict(chunk_size=0), dict(chunk_size=-3), dict(softcap=0.0), dict(softcap=-2.0)])
def test_bad_options_raise(kw):
    with pytest.raises(ValueError):
        token_logprobs(torch.randn(3, 4), torch.randn(9, 4), torch.tensor([0, 1, 2]), **kw)


# --------------------------------------------------------------------------------------------------
# default_chunk_size
# --------------------------------------------------------------------------------------------------

VOCABS = [1, 3, 1000, 32000, 50257, 128256, 262144, 10**7, 10**9]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_default_chunk_size(dtype):
    sizes = [default_chunk_size(V, dtype) for V in VOCABS]
    for V, c in zip(VOCABS, sizes):
        assert isinstance(c, int)
        assert c > 0 and c % 16 == 0, (V, c)
        if c > 16:  # above the floor, one fp32 [chunk, V] logits block fits the workspace
            assert c * V * 4 <= DEFAULT_WORKSPACE_BYTES
    for a, b in itertools.pairwise(sizes):
        assert b <= a  # never grows with V
    assert default_chunk_size(256000, dtype) < default_chunk_size(32000, dtype)
    assert default_chunk_size(10**9, dtype) >= 16


def test_default_chunk_size_is_used_by_default():
    """chunk_size=None gives the same numbers as the explicit default."""
    N, H, V = 40, 8, 50
    hidden, weight, _, labels, _ = make_inputs(N, H, V, seed=15)
    a = token_logprobs(hidden, weight, labels)
    b = token_logprobs(hidden, weight, labels, chunk_size=default_chunk_size(V, hidden.dtype))
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])
