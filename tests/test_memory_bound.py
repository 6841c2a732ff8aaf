"""The fused op's peak CPU memory stays within its stated bound (`kernels/schedule.py`).

Beyond its inputs and the gradients it returns, a forward + backward of `token_logprobs` may hold one
logits block at a time (with the implementation's temporaries: `bytes_per_logit` per element) and:
- full fine-tuning, row-chunked backward: one fp32 `[V, H]` accumulator for `d weight`;
- full fine-tuning, vocabulary-sliced backward (`vocab_slice_cols` is not None): one `[N, cols]` block and
  one fp32 `[N, H]` accumulator for `d hidden`, no `[V, H]` one;
- a frozen output embedding (LoRA): the block, and the `[N, H]` d logp / d hidden the forward builds
  (in the inputs' dtype; it is what backward saves instead of the hidden states).

Peaks are exact allocator byte counts (`memory_peak.cpu_memory`), so the bounds hold with a small fixed
slack: 1 MiB plus 16 fp32 vectors of N (per-row statistics, labels, the upstream gradient, and, at the
sizes used here, a few `[N, H]`-sized temporaries).

Sizes: the hidden size is large against the rows per block (H = 256, 16 or 64 rows), so that one more
fp32 `[V, H]` tensor (8 MB) is far larger than both the slack and what a block's bytes-per-logit budget
over-counts; a stray `[V, H]` temporary per chunk (e.g. `acc += dW_chunk`, which materialises the
product first) then breaks the bound. Row-chunked cases use 16 rows per block, vocabulary-sliced ones 64
(all N = 128 rows then fit one block of `vocab_slice_cols` >= 1024 columns).

With an fp32 weight the returned `d weight` can be the accumulator itself, so "returned gradients + one
accumulator" leaves room for a second fp32 `[V, H]`; the bf16 cases catch such a tensor under the stated
bound, and `test_fp32_weight_gradient_is_its_own_accumulator` holds fp32 to the tighter bound.
"""
from __future__ import annotations

import gc
import os

import pytest
import torch
from memory_peak import cpu_memory

from axolotl_bnf_plugin.kernels import token_logprobs
from axolotl_bnf_plugin.kernels.schedule import bytes_per_logit, vocab_slice_cols

MiB = 1 << 20
N, H, V = 128, 256, 8000
ROW_CHUNK, SLICE_CHUNK = 16, 64  # rows per block: row-chunked backward / vocabulary-sliced backward


def slack(n: int) -> int:
    return MiB + 16 * n * 4


def make_inputs(n, h, v, dtype, weight_grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype).requires_grad_()
    weight = (0.05 * torch.randn(v, h, generator=g)).to(dtype).requires_grad_(weight_grad)
    labels = torch.randint(0, v, (n,), generator=g)
    upstream = torch.randn(n, generator=g)
    return hidden, weight, labels, upstream


def grad_bytes(*tensors) -> int:
    return sum(t.grad.nbytes for t in tensors if t.grad is not None)


def measure(step, hidden, weight) -> tuple[int, int]:
    """(peak bytes allocated during `step()` beyond those before it, bytes of the gradients it left).

    No warm-up call: the op's first call allocates exactly what later ones do (same peak), and the bf16
    CPU matmuls are slow enough that a second call would double the file's run time.
    """
    hidden.grad = weight.grad = None
    with cpu_memory() as mem:
        step()
    return mem.peak, grad_bytes(hidden, weight)


def two_pass_step(hidden, weight, labels, upstream, **kwargs):
    def step():
        logp, _ = token_logprobs(hidden, weight, labels, **kwargs)
        (logp * upstream).sum().backward()
    return step


def op_bound(n, h, v, dtype, impl, chunk_size, weight_grad=True) -> tuple[int, str]:
    """Bytes the op may hold beyond its inputs and returned gradients, and which schedule that is."""
    per_logit = bytes_per_logit(impl, dtype, "cpu")
    if not weight_grad:
        return chunk_size * v * per_logit + n * h * dtype.itemsize, "rows, frozen weight"
    cols = vocab_slice_cols(n, v, dtype, impl, "cpu", chunk_size=chunk_size, hidden_size=h)
    if cols is None:
        return chunk_size * v * per_logit + v * h * 4, "rows"
    # Half precision on CPU: the d hidden product also reads an fp32 copy of the [cols, H] weight slice.
    weight_slice = cols * h * 4 if dtype != torch.float32 else 0
    return n * cols * per_logit + weight_slice + n * h * 4, f"vocab slices of {cols}"


def check(peak, outputs, bound, n, label):
    over = peak - outputs
    detail = (f"{label}: peak {peak / MiB:.2f} MiB - gradients {outputs / MiB:.2f} MiB = {over / MiB:.2f} MiB; "
              f"bound {bound / MiB:.2f} MiB + slack {slack(n) / MiB:.2f} MiB")
    print(detail)  # shown by `pytest -rP`
    assert over <= bound + slack(n), detail


# --- the measurement itself ---------------------------------------------------------------------------


def test_measurement_is_exact_on_known_allocations():
    before = torch.empty(5_000_000, dtype=torch.uint8)  # freed inside: neither counted nor credited
    with cpu_memory() as mem:
        a = torch.empty(10_000_000, dtype=torch.uint8)
        b = torch.empty(20_000_000, dtype=torch.uint8)
        del a, b, before
    assert (mem.peak, mem.end) == (30_000_000, 0)

    x, y = torch.randn(300, 500), torch.randn(500, 700)
    with cpu_memory() as mem:
        z = x @ y
        u = z.exp()  # a second [300, 700], freed
        del u
    assert (mem.peak, mem.end) == (2 * 300 * 700 * 4, 300 * 700 * 4)
    del z


@torch.library.custom_op("memory_bound_test::scratch", mutates_args=())
def _scratch_op(x: torch.Tensor, rows: int) -> torch.Tensor:
    scratch = torch.empty(rows, x.shape[0])  # allocated inside the op's implementation, then freed
    scratch.fill_(1.0)
    return x.clone()


def test_measurement_sees_allocations_inside_custom_ops():
    x = torch.ones(1000)
    with cpu_memory() as mem:
        y = _scratch_op(x, 2500)
    assert mem.peak == 2500 * 1000 * 4 + 1000 * 4
    assert mem.end == 1000 * 4
    del y


# --- the fused op ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("chunk_size", [ROW_CHUNK, SLICE_CHUNK], ids=["row-chunked", "vocab-sliced"])
def test_full_fine_tuning_two_pass(dtype, chunk_size):
    hidden, weight, labels, upstream = make_inputs(N, H, V, dtype)
    bound, schedule = op_bound(N, H, V, dtype, "torch", chunk_size)
    assert schedule.startswith("rows" if chunk_size == ROW_CHUNK else "vocab")  # the sizes pick both schedules
    peak, outputs = measure(two_pass_step(hidden, weight, labels, upstream, chunk_size=chunk_size, impl="torch"),
                            hidden, weight)
    check(peak, outputs, bound, N, f"two-pass {dtype}, {schedule}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_frozen_weight_holds_one_block(dtype):
    hidden, weight, labels, upstream = make_inputs(N, H, V, dtype, weight_grad=False)
    bound, schedule = op_bound(N, H, V, dtype, "torch", ROW_CHUNK, weight_grad=False)
    peak, outputs = measure(two_pass_step(hidden, weight, labels, upstream, chunk_size=ROW_CHUNK, impl="torch"),
                            hidden, weight)
    check(peak, outputs, bound, N, f"two-pass {dtype}, {schedule}")


def bnf_single_pass_step(hidden, weight, labels, chunk_size, impl="torch"):
    """BNF's loss (one response, a fixed reference) on the single-pass op, then its backward."""
    from axolotl_bnf_plugin.methods.bnf import BNF_GRAD_RULE, bnf_loss, bnf_response_scale

    mask, sign = (labels != -100)[None], torch.ones(1, dtype=torch.long)
    ref = torch.full(labels.shape, -8.0)
    token_scale = bnf_response_scale(mask, sign)[:, None].expand(mask.shape).reshape(-1)

    def step():
        logp, neg_entropy, _ = token_logprobs(hidden, weight, labels, chunk_size=chunk_size, impl=impl,
                                           grad_rule=BNF_GRAD_RULE, grad_inputs=(ref, token_scale))
        bnf_loss(logp[None], ref[None], neg_entropy[None], mask, sign)[0].backward()
    return step


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_bnf_single_pass(dtype):
    """The single pass builds the gradients in the forward: row chunks, the fp32 `d weight` kept until backward."""
    hidden, weight, labels, _ = make_inputs(N, H, V, dtype)
    bound = ROW_CHUNK * V * bytes_per_logit("torch", dtype, "cpu") + V * H * 4
    peak, outputs = measure(bnf_single_pass_step(hidden, weight, labels, ROW_CHUNK), hidden, weight)
    check(peak, outputs, bound, N, f"BNF single pass {dtype}")


def test_bnf_single_pass_frozen_weight_holds_one_block():
    hidden, weight, labels, _ = make_inputs(N, H, V, torch.bfloat16, weight_grad=False)
    bound = ROW_CHUNK * V * bytes_per_logit("torch", torch.bfloat16, "cpu")
    peak, outputs = measure(bnf_single_pass_step(hidden, weight, labels, ROW_CHUNK), hidden, weight)
    check(peak, outputs, bound, N, "BNF single pass bf16, frozen weight")


@pytest.mark.parametrize("mode", ["two-pass", "bnf"])
def test_fp32_weight_gradient_is_its_own_accumulator(mode):
    """Stricter than the stated bound, for an fp32 weight: the fp32 `d weight` accumulator can be the gradient
    the op returns, so nothing of size `[V, H]` may exist besides it. (Under the stated bound, "returned
    gradients + one accumulator" would leave room for a second fp32 `[V, H]`, e.g. a per-chunk product
    materialised before it is added, or a zero gradient autograd materialises for an output.)"""
    hidden, weight, labels, upstream = make_inputs(N, H, V, torch.float32)
    assert vocab_slice_cols(N, V, torch.float32, "torch", "cpu", chunk_size=ROW_CHUNK) is None
    if mode == "two-pass":
        step = two_pass_step(hidden, weight, labels, upstream, chunk_size=ROW_CHUNK, impl="torch")
    else:
        step = bnf_single_pass_step(hidden, weight, labels, ROW_CHUNK)
    peak, outputs = measure(step, hidden, weight)
    check(peak, outputs, ROW_CHUNK * V * bytes_per_logit("torch", torch.float32, "cpu"), N,
          f"{mode} fp32, rows, d weight is the accumulator")


# Triton (under TRITON_INTERPRET=1 on CPU): tiny, as the interpreter is slow, but still with a `[V, H]` (4 MB)
# well above the slack.
TN, TH, TV, TCHUNK = 32, 256, 4096, 8


@pytest.fixture
def interpreter_frees_promptly(monkeypatch):
    """Collect Python's cyclic garbage after every interpreted Triton launch.

    Triton's interpreter holds each launch's tensor arguments in a reference cycle (a recursive closure over
    a dict of their storages), so a freed logits block stays allocated until the cycle collector happens to
    run. That is the interpreter's doing, not the op's, and does not exist on a GPU; collecting after each
    launch lets the measurement see the op's own memory.
    """
    interpreter = pytest.importorskip("triton.runtime.interpreter")
    gc.collect()
    gc.freeze()  # the collections below then only scan the objects the test creates: cheap
    launch = interpreter.GridExecutor.__call__

    def launch_then_collect(self, *args, **kwargs):
        try:
            return launch(self, *args, **kwargs)
        finally:
            gc.collect()

    monkeypatch.setattr(interpreter.GridExecutor, "__call__", launch_then_collect)
    yield
    gc.unfreeze()


@pytest.mark.usefixtures("interpreter_frees_promptly")
@pytest.mark.parametrize("mode", ["two-pass", "bnf"])
def test_triton_full_fine_tuning(mode):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("measures the CPU op under Triton's interpreter")
    hidden, weight, labels, upstream = make_inputs(TN, TH, TV, torch.float32)
    if mode == "two-pass":
        bound, schedule = op_bound(TN, TH, TV, torch.float32, "triton", TCHUNK)
        step = two_pass_step(hidden, weight, labels, upstream, chunk_size=TCHUNK, impl="triton")
    else:
        bound, schedule = TCHUNK * TV * bytes_per_logit("triton", torch.float32, "cpu") + TV * TH * 4, "rows"
        step = bnf_single_pass_step(hidden, weight, labels, TCHUNK, impl="triton")
    peak, outputs = measure(step, hidden, weight)
    check(peak, outputs, bound, TN, f"triton {mode} fp32, {schedule}")


# --- the measurement bites --------------------------------------------------------------------------------


@pytest.mark.parametrize("weight_grad", [False, True], ids=["frozen", "full"])
def test_materialised_logits_break_the_bound(weight_grad):
    """`log_softmax(hidden @ weight.T)` holds `[N, V]` logits (and their log-softmax and gradient)."""
    n = 512
    hidden, weight, labels, upstream = make_inputs(n, H, V, torch.float32, weight_grad=weight_grad)
    bound, schedule = op_bound(n, H, V, torch.float32, "torch", ROW_CHUNK, weight_grad=weight_grad)

    def step():
        logp = torch.log_softmax(hidden @ weight.t(), -1).gather(1, labels[:, None])[:, 0]
        (logp * upstream).sum().backward()

    peak, outputs = measure(step, hidden, weight)
    with pytest.raises(AssertionError):
        check(peak, outputs, bound, n, f"naive fp32, against {schedule}")
    assert peak - outputs > 2 * (bound + slack(n))
