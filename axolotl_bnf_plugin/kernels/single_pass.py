"""A loss's gradient computed in the forward pass: one logits block per chunk instead of two.

The two-pass op (`chunked.py`) computes each `[chunk, V]` block in forward for the statistics and again in
backward for d logits: 8*N*H*V flops. When the loss's gradient w.r.t. a row's label log-prob is known as
soon as that log-prob is (a registered `GradRule`, e.g. BNF's `scale_r * w(logp, ref_logp)`, whose w and
scale the loss treats as constants), each block, once reduced to its statistics, is overwritten with
d logits at once (`rule_pass_`) and fed to the two gradient matmuls: 6*N*H*V flops, one fp32 `[V, H]`
accumulator for d weight. The gradients wait for backward, where they are multiplied by the one scalar the
loss's upstream gradient can still apply (a loss scale, an averaging factor).

The op returns the rule's values (`grad_logp`): a loss that uses them as its gradient agrees with the
forward's by construction. Backward still checks that the upstream gradient is the predicted one times a
constant, within what rounding the rule's inputs allows (`grad_rules.rounding_slack`), so that any other
use of `logp` is caught; that check raises a Python error (`misuse.py`), never a device-side assert, and
poisons the step's gradients so the step guard skips it.

Half precision: the two-pass op's d logits carry the upstream gradient, so an fp16 loss scale (2^16)
lifts them out of fp16's underflow range. Here they are built before that scale exists, from a token
gradient that may be of order 1 / (n * N_i) (~3e-5) times probabilities far below 1, and would flush to
zero. So the forward builds them for the rule's gradient times a power of two (`grad_rules.prescale` of
the rule's bound: largest |value| in (1/2, 1], exact in any dtype); d weight / d bias stay in their fp32
accumulators and d hidden holds bounded values, and backward multiplies by (upstream factor / prescale),
in fp32 arithmetic, writing the inputs' dtype.

A rule over segments (ASFT's) has only a loose a priori bound: its slope in a response's mean log-prob is
unknown until the block is reduced, and may be 1e6 times its typical value. In fp16 its blocks therefore
take their own prescale, from the block's actual largest gradient (`block_prescale`), so a response whose
gradients are far smaller than another's keeps its own range, whatever the order of the blocks. The fp32
d weight / d bias accumulators are multiplied by the (power of two, exact) ratio whenever the factor
changes; a block's factor stays within 2^64 of the smallest one of the pass, which bounds what the
rescaled accumulators can hold. Each row's d hidden keeps the factor of its block (the op's row factor).
bf16 and fp32 share fp32's exponent range: one factor is enough.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import misuse
from .chunked import GradBuffers, no_double_backward, on_device, row_ops, scaled_gradient
from .fake import fake_grads, fake_rows
from .grad_rules import block_prescale, get_grad_rule, prescale, rounding_slack
from .logit_transform import LogitTransform
from .segments import SegmentStats
from .workspace import Workspace

# The upstream gradient must match the predicted one times a constant to this fraction of its largest value,
# beyond the rounding slack of each row.
FIT_TOLERANCE = 1e-4


def with_rule_gradient(loss: torch.Tensor, logp: torch.Tensor, rule_grad: torch.Tensor) -> torch.Tensor:
    """`loss`'s value, with d loss / d logp = `rule_grad` exactly: the single pass's third output.

    The rule's loss has that gradient mathematically, but its own evaluation of the rule can round
    differently, and some rules are ill-conditioned (BNF's weight near p = 1). Taking the op's values means
    one evaluation feeds both the gradients built in the forward and the loss's backward.
    """
    linear = (rule_grad.detach() * logp).sum()
    return loss.detach() + (linear - linear.detach())


def _forward(hidden, weight, bias, labels, rule_name, a, b, scale, softcap, chunk_size, impl, need_h, need_w,
             need_b, segment=None, block_bounds=None):
    misuse.raise_pending()
    ops, transform, rule = row_ops(impl), LogitTransform(scale=scale, softcap=softcap), get_grad_rule(rule_name)
    n = labels.shape[0]
    factor = prescale(rule.bound(a, b))  # the factor in use; per block below for a loose bound in fp16
    per_block = rule.over_segments and hidden.dtype == torch.float16
    smallest = factor
    logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
    neg_entropy, grad_logp, row_factor = torch.empty_like(logp), torch.empty_like(logp), torch.empty_like(logp)
    totals, counts = (torch.empty_like(logp), torch.empty_like(logp)) if rule.over_segments else (None, None)
    grads, workspace = GradBuffers(hidden, weight, need_h, need_w, need_b), Workspace()
    # Blocks of whole segments for a rule over segments (`segments.plan_segments`), else fixed-size chunks.
    bounds = (list(zip(block_bounds[0::2], block_bounds[1::2])) if block_bounds is not None else
              [(start, min(start + chunk_size, n)) for start in range(0, n, chunk_size)])
    for k, (start, stop) in enumerate(bounds):
        h_c = hidden[start:stop]
        block = workspace.project(h_c, weight, bias)
        previous = factor

        def row_grad(logp_c, start=start, stop=stop, first=k == 0):
            nonlocal factor, smallest
            stats = None
            if rule.over_segments:  # the block holds its segments whole: their statistics are final here
                stats = SegmentStats.of(logp_c, segment[start:stop])
                totals[start:stop], counts[start:stop] = stats.total, stats.count
            grad_logp[start:stop] = rule.evaluate(logp_c, a[start:stop], b[start:stop], stats)
            if per_block:
                factor = block_prescale(grad_logp[start:stop], None if first else factor, smallest)
                smallest = factor if first else torch.minimum(smallest, factor)
            row_factor[start:stop] = factor
            return grad_logp[start:stop] * factor

        logp[start:stop], neg_entropy[start:stop], _, dlogits = ops.rule_pass_(
            block, labels[start:stop], row_grad, transform, workspace)
        grads.add(dlogits, h_c, start, stop, rescale=factor / previous if per_block and k else None)
    stats = SegmentStats(totals, counts) if rule.over_segments else None
    slack = rounding_slack(rule, logp, a, b, grad_logp, stats)
    return (logp, neg_entropy, grad_logp, slack, row_factor, factor, *grads.result(keep_fp32=True))


def forward(*args):
    with on_device(args[0]):
        return _forward(*args)


@torch.library.custom_op("axolotl_bnf::single_pass", mutates_args=())
def single_pass_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    rule: str,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: Optional[float],
    softcap: Optional[float],
    chunk_size: int,
    impl: str,
    need_h: bool,
    need_w: bool,
    need_b: bool,
    segment: Optional[torch.Tensor] = None,
    block_bounds: Optional[list[int]] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor]:
    """(logp, neg_entropy, predicted d loss / d logp, its rounding slack, row prescale, weight prescale,
    d hidden, d weight, d bias) for all-scored rows, by the registered gradient rule `rule` with per-row
    inputs `a`, `b`; the gradients are for the predicted one times a power of two: each row's d hidden times
    its row prescale `[N]`, d weight / d bias (fp32) times the weight prescale `[]`. For a rule over segments,
    `segment` numbers each row's segment within its block and `block_bounds` (start, stop, start, ...) are
    blocks of whole segments."""
    return forward(hidden, weight, bias, labels, rule, a, b, scale, softcap, chunk_size, impl, need_h, need_w,
                   need_b, segment, block_bounds)


@single_pass_op.register_fake
def _(hidden, weight, bias, labels, rule, a, b, scale, softcap, chunk_size, impl, need_h, need_w, need_b,
      segment=None, block_bounds=None):
    return (*fake_rows(hidden, labels, 5), hidden.new_empty((), dtype=torch.float32),
            *fake_grads(hidden, weight, need_h, need_w, need_b, weight_dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*output[2:])
    ctx.has_bias = inputs[2] is not None
    ctx.weight_dtype = inputs[1].dtype
    ctx.rule = inputs[4]
    ctx.mark_non_differentiable(*output[1:])
    # Only logp takes a gradient: without this, backward would allocate zeros for every other output,
    # an fp32 [V, H] among them.
    ctx.set_materialize_grads(False)


def upstream_factor(grad_logp: torch.Tensor, predicted: torch.Tensor, slack: torch.Tensor, rule: str) -> torch.Tensor:
    """The scalar s with grad_logp = s * predicted; NaN (and a `SinglePassMisuse`) when no such s fits.

    s is the least-squares fit over the rows whose predicted value rounding cannot move by more than the
    tolerance (all rows when there are none); every row must then match to within s times (its rounding
    slack + FIT_TOLERANCE * the largest predicted value). Non-finite inputs give a non-finite s: those reach
    the gradients, where the trainer's step guard skips the step; they are not a misuse.
    """
    g, p = grad_logp.float(), predicted
    if not g.numel():
        return g.new_ones(())
    # In units of the largest predicted value (a power of two: exact), so that no sum below underflows when
    # some rows' values are tiny (a rejected token pushed to p ~ 1e-12) and all the others untrusted.
    unit = torch.exp2(torch.ceil(torch.log2(p.abs().amax().clamp(min=2.0**-126))))
    g, p, slack = g / unit, p / unit, slack / unit
    floor = FIT_TOLERANCE * p.abs().amax()
    trusted = (slack <= floor).float()
    num_t, den_t = (trusted * g * p).sum(), (trusted * p * p).sum()
    num, den = (g * p).sum(), (p * p).sum()
    # The trusted rows' fit, unless they carry too little of the predicted gradient to determine it.
    factor = torch.where(den_t >= 1e-6 * den, num_t / den_t.clamp(min=1e-30), num / den.clamp(min=1e-30))
    excess = ((g - factor * p).abs() - factor.abs() * (slack + floor)).amax()
    fits = (excess <= 1e-30) | ~torch.isfinite(excess)
    misuse.report(
        fits,
        f"the single-pass op built for gradient rule {rule!r} got an upstream gradient that is not its predicted "
        "one times a constant: its log-probs may only feed the loss whose rule it is, and that step's gradients "
        "were made non-finite so it is skipped. Call token_logprobs without grad_rule for any other use, or "
        "give the loss the op's third output (the rule's gradient) as its gradient w.r.t. logp",
    )
    return torch.where(fits, factor, torch.full_like(factor, float("nan")))


def _backward(ctx, grad_logp, *_unused):
    no_double_backward("the single-pass op")
    misuse.raise_pending()
    if grad_logp is None:
        return (None,) * 16
    predicted, slack, row_factor, weight_factor, grad_h, grad_w, grad_b = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    with on_device(predicted):
        # fp32: a 2^16 loss scale is itself out of fp16's range.
        factor = upstream_factor(grad_logp, predicted, slack, ctx.rule)
        return (scaled_gradient(grad_h, (factor / row_factor)[:, None], grad_h.dtype) if need_h else None,
                scaled_gradient(grad_w, factor / weight_factor, ctx.weight_dtype) if need_w else None,
                scaled_gradient(grad_b, factor / weight_factor, ctx.weight_dtype) if need_b and ctx.has_bias else None,
                None, None, None, None, None, None, None, None, None, None, None, None, None)


single_pass_op.register_autograd(_backward, setup_context=_setup_context)
