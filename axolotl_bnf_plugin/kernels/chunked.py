"""The chunked linear + log-prob op, registered as a PyTorch custom op with its own backward.

Forward, per block of `chunk` token rows: one matmul gives the `[chunk, V]` raw logits (in the inputs'
dtype, fp32 accumulation inside the GEMM), which the back-end's row kernel reduces to per-row statistics;
one fp32 log-sum-exp per row is saved.

Backward recomputes the logits and overwrites them with d logits, which feed `dH = dZ @ W` and
`dW = dZ^T @ H`. Two schedules, chosen by what the gradients cost (`schedule.vocab_slice_cols`):
- sliced over the vocabulary, when `d weight` is needed and all rows fit one block of at least
  `MIN_SLICE_COLS` columns: each slice's `d weight` rows are written once, in the weight's dtype, by one
  GEMM over all N rows (fp32 accumulation inside it); `d hidden` accumulates in a small fp32 `[N, H]`.
  No `[V, H]` accumulator exists, and none is read and rewritten per chunk;
- chunked over rows otherwise (a frozen output embedding, as under LoRA, or too many rows): `d hidden` of a
  chunk is written once, and `d weight` / `d bias` accumulate in place in fp32 (`GradBuffers`).
Unneeded gradients are skipped.

A frozen head (LoRA) needs only `d hidden`, and row r's is its upstream gradient times
d logp_r / d hidden_r = (onehot(y_r) - p_r) @ W, which the forward can build while it holds the block
(statistics and d logits for a unit upstream gradient in one row pass, then one matmul). Backward then
scales rows and recomputes nothing: 4*N*H*V flops, what plain PyTorch executes, instead of 6. The saved
`[N, H]` takes the place of the saved hidden states.

As a `torch.library.custom_op`, the whole op is one opaque node to `torch.compile` (no graph break,
no tracing of the chunk loop) and runs no host synchronisation: the row count is a shape.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
from typing import Optional

import torch

from .fake import fake_grads, fake_rows
from .logit_transform import LogitTransform
from .schedule import vocab_slice_cols
from .workspace import Workspace

IMPLS = ("torch", "triton")
LOG = logging.getLogger(__name__)


def row_ops(impl: str):
    """The module providing `stats` / `dlogits_` / `rule_pass_` for an implementation name."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return importlib.import_module(f"{__package__}.{impl}_rows")


SLICE_BYTES = 64 * 1024 * 1024

# Per (device type, dtype): whether this torch has a GEMM that accumulates half-precision products into an
# fp32 output (`addmm(..., out_dtype=float32)`); asked once with a 1x1 product (`accumulating_gemm`).
_ACCUMULATING_GEMM: dict[tuple[str, torch.dtype], bool] = {}


def accumulating_gemm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `addmm(acc_fp32, a, b, out_dtype=float32)` runs for `dtype` inputs on this device type.

    Only the errors that mean "no such kernel" (`NotImplementedError`, from the dispatcher) or "no such
    keyword" (`TypeError`, an older torch) answer no; anything else propagates. The answer and the path it
    selects are logged once.
    """
    key = (device.type, dtype)
    if key not in _ACCUMULATING_GEMM:
        one = torch.ones(1, 1, dtype=dtype, device=device)
        acc = torch.zeros(1, 1, dtype=torch.float32, device=device)
        try:
            torch.addmm(acc, one, one, out_dtype=torch.float32, out=acc)
            _ACCUMULATING_GEMM[key] = True
            LOG.info("fp32 accumulation of %s products on %s: one GEMM with an fp32 output (addmm out_dtype)",
                     dtype, device.type)
        except (NotImplementedError, TypeError) as exc:
            _ACCUMULATING_GEMM[key] = False
            path = f"fp32 slices of at most {SLICE_BYTES // 2**20} MiB" if device.type == "cuda" else "fp32 copies"
            LOG.info("fp32 accumulation of %s products on %s: torch %s has no accumulating GEMM (%s); using %s",
                     dtype, device.type, torch.__version__, str(exc).split("\n")[0][:120], path)
    return _ACCUMULATING_GEMM[key]


def _add_product_in_slices(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b through fp32 products of at most SLICE_BYTES (acc's rows in slices): bounded memory
    where the accumulating GEMM is not available."""
    rows, b32 = max(1, SLICE_BYTES // (acc.shape[1] * 4)), b.float()  # b: a chunk's rows or a weight slice
    for start in range(0, acc.shape[0], rows):
        acc[start:start + rows].addmm_(a[start:start + rows].float(), b32)


def add_product_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, `acc` fp32, in place.

    fp32 inputs: one `addmm_`. Half inputs: one GEMM that reads and writes the fp32 accumulator
    (`accumulating_gemm`: cuBLAS on CUDA); where torch has none, bounded fp32 slices on CUDA, and on the CPU
    fp32 copies of `a` (a logits block) and `b` (`h_c` or a weight slice), which the schedule charges
    (`schedule.bytes_per_logit`, `vocab_slice_cols`).
    """
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif accumulating_gemm(acc.device, a.dtype):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    elif acc.is_cuda:
        _add_product_in_slices(acc, a, b)
    else:
        acc.addmm_(a.float(), b.float())


def on_device(tensor: torch.Tensor):
    """Make the tensor's CUDA device current for the body: a Triton launch (and a new CUDA stream or event)
    goes to the current device, which need not be the one a model's head lives on (`cuda:1`)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def no_double_backward(what: str) -> None:
    """Refuse `create_graph=True`: these backwards are built from saved values and custom ops, so a gradient
    they returned would carry no graph and a second derivative would silently come out as zero."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{what} does not support double backward (create_graph=True); compute higher "
                           "derivatives with materialised logits instead")


def _graph_is_freed() -> bool:
    """True inside a backward that frees the graph afterwards (no `retain_graph`): saved tensors may then be
    overwritten. Unknown (an older torch, or outside a backward) counts as kept."""
    keep = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    try:
        return keep is not None and not keep()
    except RuntimeError:
        return False


def scaled_gradient(saved: torch.Tensor, factor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`saved * factor` in `dtype`, in fp32 arithmetic, leaving `saved` as it was when the graph is kept (a
    second backward with `retain_graph=True` finds it unchanged), and without an fp32 temporary of `saved`'s
    size: on CUDA one kernel reads `saved` and writes the result in `dtype`; on the CPU, whose kernels would
    cast through an fp32 temporary, an fp32 `saved` is scaled in place when the graph is freed."""
    # A 1-element tensor (or a per-row [N, 1] one) takes part in type promotion: fp32 arithmetic.
    factor = factor.reshape(1) if factor.dim() == 0 else factor
    if not saved.is_cuda and saved.dtype == torch.float32 and _graph_is_freed():
        return saved.mul_(factor).to(dtype)
    return torch.mul(saved, factor, out=torch.empty(saved.shape, dtype=dtype, device=saved.device))


def _forward(hidden, weight, bias, labels, scale, softcap, chunk_size, impl, hidden_grad_only):
    ops, transform, workspace = row_ops(impl), LogitTransform(scale=scale, softcap=softcap), Workspace()
    n = labels.shape[0]
    logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
    neg_entropy, lse = torch.empty_like(logp), torch.empty_like(logp)
    dlogp_dhidden = torch.empty_like(hidden) if hidden_grad_only else hidden.new_empty(0)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        block = workspace.project(hidden[start:stop], weight, bias)
        if hidden_grad_only:  # d logp / d logits = onehot(y) - p: the d logits of a unit upstream gradient
            logp[start:stop], neg_entropy[start:stop], lse[start:stop], dlogits = ops.rule_pass_(
                block, labels[start:stop], torch.ones_like, transform, workspace)
            torch.mm(dlogits, weight, out=dlogp_dhidden[start:stop])
            continue
        lse_c, z_y, expected_z = ops.stats(block, labels[start:stop], transform, workspace)
        lse[start:stop] = lse_c
        logp[start:stop] = z_y - lse_c
        neg_entropy[start:stop] = expected_z - lse_c
    return logp, neg_entropy, lse, dlogp_dhidden


class GradBuffers:
    """d hidden, d weight and d bias of a loop over row chunks: each chunk's d-logits block feeds two matmuls.

    `d hidden` of a chunk is written once into its rows; `d weight` / `d bias` accumulate in place in fp32
    (`add_product_`) and are not allocated when not needed (a frozen head). An unneeded gradient is returned
    as a distinct empty tensor (a custom op's outputs may not alias).
    """

    def __init__(self, hidden, weight, need_h, need_w, need_b):
        self.hidden, self.weight = hidden, weight
        self.h = torch.empty_like(hidden) if need_h else None
        self.w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        self.b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None

    def add(self, dlogits: torch.Tensor, h_c: torch.Tensor, start: int, stop: int,
            rescale: torch.Tensor | None = None) -> None:
        """Write the chunk's d hidden and add its d weight / d bias; `rescale` (a device scalar) first
        multiplies what the accumulators hold, when this chunk's d logits carry another factor."""
        if rescale is not None:
            for acc in (self.w, self.b):
                if acc is not None:
                    acc.mul_(rescale)
        if self.h is not None:
            torch.mm(dlogits, self.weight, out=self.h[start:stop])
        if self.w is not None:
            add_product_(self.w, dlogits.t(), h_c)
        if self.b is not None:
            self.b += dlogits.sum(0, dtype=torch.float32)

    def result(self, keep_fp32: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(d hidden, d weight, d bias); d weight / d bias in the weight's dtype, or fp32 with `keep_fp32`."""
        dtype = torch.float32 if keep_fp32 else self.weight.dtype
        return (self.h if self.h is not None else self.hidden.new_empty(0),
                self.w.to(dtype) if self.w is not None else self.weight.new_empty(0),
                self.b.to(dtype) if self.b is not None else self.weight.new_empty(0))


def _backward_by_rows(grad_logp, hidden, weight, bias, labels, lse, transform, ops, chunk_size, need_h, need_w,
                      need_b):
    grads, workspace = GradBuffers(hidden, weight, need_h, need_w, need_b), Workspace()
    for start in range(0, labels.shape[0], chunk_size):
        stop = min(start + chunk_size, labels.shape[0])
        h_c = hidden[start:stop]
        block = workspace.project(h_c, weight, bias)
        dlogits = ops.dlogits_(block, labels[start:stop], lse[start:stop], grad_logp[start:stop], transform,
                               workspace=workspace)
        grads.add(dlogits, h_c, start, stop)
    return grads.result()


def _backward_by_vocab(grad_logp, hidden, weight, bias, labels, lse, transform, ops, cols, need_h, need_b):
    """All rows at once, `cols` vocabulary columns at a time: each slice's d weight is written once."""
    grad_w = torch.empty_like(weight)
    grad_b = torch.empty(weight.shape[0], dtype=weight.dtype, device=weight.device) if need_b else weight.new_empty(0)
    # d hidden accumulates in fp32; an fp32 hidden's output is its own accumulator.
    acc_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
    grad_h = hidden.new_empty(0) if not need_h else acc_h if hidden.dtype == torch.float32 else torch.empty_like(hidden)
    workspace = Workspace()
    for v0 in range(0, weight.shape[0], cols):
        v1 = min(v0 + cols, weight.shape[0])
        w_s = weight[v0:v1]
        block = workspace.project(hidden, w_s, bias[v0:v1] if bias is not None else None)
        dlogits = ops.dlogits_(block, labels, lse, grad_logp, transform, col_offset=v0, workspace=workspace)
        torch.mm(dlogits.t(), hidden, out=grad_w[v0:v1])
        if need_b:
            grad_b[v0:v1] = dlogits.sum(0, dtype=torch.float32)
        if need_h:
            add_product_(acc_h, dlogits, w_s)
    if need_h and acc_h is not grad_h:
        grad_h.copy_(acc_h)
        del acc_h
    return grad_h, grad_w, grad_b


def _backward(grad_logp, hidden, weight, bias, labels, lse, scale, softcap, chunk_size, impl, need_h, need_w, need_b):
    ops, transform = row_ops(impl), LogitTransform(scale=scale, softcap=softcap)
    grad_logp = grad_logp.float()
    cols = vocab_slice_cols(labels.shape[0], weight.shape[0], hidden.dtype, impl, hidden.device.type,
                            chunk_size=chunk_size, hidden_size=hidden.shape[1]) if need_w else None
    if cols is None:
        return _backward_by_rows(grad_logp, hidden, weight, bias, labels, lse, transform, ops, chunk_size,
                                 need_h, need_w, need_b)
    return _backward_by_vocab(grad_logp, hidden, weight, bias, labels, lse, transform, ops, cols, need_h, need_b)


@torch.library.custom_op("axolotl_bnf::token_logprobs", mutates_args=())
def token_logprobs_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    scale: Optional[float],
    softcap: Optional[float],
    chunk_size: int,
    impl: str,
    hidden_grad_only: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, neg_entropy, lse, d logp / d hidden) for rows that are all scored; see `kernels.token_logprobs`.
    The last is built only with `hidden_grad_only` (the caller trains hidden and nothing else), else empty."""
    with on_device(hidden):
        return _forward(hidden, weight, bias, labels, scale, softcap, chunk_size, impl, hidden_grad_only)


@token_logprobs_op.register_fake
def _(hidden, weight, bias, labels, scale, softcap, chunk_size, impl, hidden_grad_only):
    return (*fake_rows(hidden, labels, 3), torch.empty_like(hidden) if hidden_grad_only else hidden.new_empty(0))


@torch.library.custom_op("axolotl_bnf::token_logprobs_backward", mutates_args=())
def token_logprobs_backward_op(
    grad_logp: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    lse: torch.Tensor,
    scale: Optional[float],
    softcap: Optional[float],
    chunk_size: int,
    impl: str,
    need_h: bool,
    need_w: bool,
    need_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients w.r.t. (hidden, weight, bias); an unneeded one is an empty tensor."""
    with on_device(hidden):
        return _backward(grad_logp, hidden, weight, bias, labels, lse, scale, softcap, chunk_size, impl,
                         need_h, need_w, need_b)


@token_logprobs_backward_op.register_fake
def _(grad_logp, hidden, weight, bias, labels, lse, scale, softcap, chunk_size, impl, need_h, need_w, need_b):
    return fake_grads(hidden, weight, need_h, need_w, need_b)


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, scale, softcap, chunk_size, impl, hidden_grad_only = inputs
    ctx.hidden_grad_only = hidden_grad_only
    if hidden_grad_only:
        ctx.save_for_backward(output[3])
    else:
        ctx.save_for_backward(hidden, weight, bias, labels, output[2])
    ctx.options = (scale, softcap, chunk_size, impl)
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


def _autograd_backward(ctx, grad_logp, *_unused):
    no_double_backward("the fused log-prob op")
    if grad_logp is None:
        return (None,) * 9
    if ctx.hidden_grad_only:
        (dlogp_dhidden,) = ctx.saved_tensors
        # fp32 arithmetic written straight into the input's dtype: no fp32 [N, H] temporary.
        grad_h = torch.mul(dlogp_dhidden, grad_logp.float()[:, None], out=torch.empty_like(dlogp_dhidden))
        return (grad_h,) + (None,) * 8
    hidden, weight, bias, labels, lse = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    grad_h, grad_w, grad_b = token_logprobs_backward_op(
        grad_logp, hidden, weight, bias, labels, lse, *ctx.options, need_h, need_w, bool(need_b and bias is not None)
    )
    return (grad_h if need_h else None, grad_w if need_w else None, grad_b if need_b else None,
            None, None, None, None, None, None)


token_logprobs_op.register_autograd(_autograd_backward, setup_context=_setup_context)
