"""BNF's gradient computed in the forward pass: one logits block per chunk instead of two.

The two-pass op (`chunked.py`) computes each `[chunk, V]` block in forward for the statistics and again in
backward for d logits: 8*N*H*V flops. BNF's gradient w.r.t. a token's label log-prob is known as soon as
that log-prob is: `scale_r * w(logp, ref_logp)` (`losses.bnf_token_weight`, `losses.bnf_response_scale`),
with w and the response's scale treated as constants by the loss. So each block, once reduced to its
statistics, is overwritten with d logits at once and fed to the two gradient matmuls: 6*N*H*V flops, and
the gradients wait for backward, where they are multiplied by the one scalar the loss's upstream
gradient can still apply (a loss scale, an averaging factor). That upstream gradient must be proportional
to the predicted one; backward checks it (without a host sync) so any other use fails loudly.

Half precision: the two-pass op's d logits carry the upstream gradient, so an fp16 loss scale (2^16)
lifts them out of fp16's underflow range. Here they are built before that scale exists, from a token
gradient of order 1 / (n * N_i) (~3e-5) times probabilities far below 1, and would flush to zero. So the
forward builds them for the token gradient times a power of two `_prescale` (largest |value| in (1/2, 1],
exact in any dtype); d weight / d bias stay in their fp32 accumulators and d hidden holds bounded values,
and backward multiplies by (upstream factor / prescale) in fp32 before casting to the inputs' dtype.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..losses import bnf_token_weight
from .chunked import GradBuffers, row_ops
from .logit_transform import LogitTransform


def _prescale(token_scale: torch.Tensor) -> torch.Tensor:
    """fp32 2^k with max |token_scale| * 2^k in (1/2, 1] (|w| <= 1, so every d logit is <= 1 after it).

    A device scalar (no host sync); non-finite scales give a non-finite factor, hence non-finite gradients.
    """
    if not token_scale.numel():
        return torch.ones((), dtype=torch.float32, device=token_scale.device)
    largest = token_scale.float().abs().amax().clamp(min=2.0**-100)
    return torch.exp2(-torch.ceil(torch.log2(largest)))


def _forward(hidden, weight, bias, labels, ref_logp, token_scale, scale, softcap, chunk_size, impl,
             need_h, need_w, need_b):
    ops, transform = row_ops(impl), LogitTransform(scale=scale, softcap=softcap)
    prescale = _prescale(token_scale)
    n = labels.shape[0]
    logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
    neg_entropy, grad_logp = torch.empty_like(logp), torch.empty_like(logp)
    grads = GradBuffers(hidden, weight, need_h, need_w, need_b)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        h_c = hidden[start:stop]
        block = torch.nn.functional.linear(h_c, weight, bias)
        lse, z_y, expected_z = ops.stats(block, labels[start:stop], transform)
        logp_c = z_y - lse
        logp[start:stop] = logp_c
        neg_entropy[start:stop] = expected_z - lse
        g = token_scale[start:stop].float() * bnf_token_weight(logp_c, ref_logp[start:stop].float())[2]
        grad_logp[start:stop] = g
        ops.dlogits_(block, labels[start:stop], lse, g * prescale, transform)
        grads.add(block, h_c, start, stop)
        del block
    return (logp, neg_entropy, grad_logp, *grads.result(keep_fp32=True))


@torch.library.custom_op("axolotl_bnf::bnf_single_pass", mutates_args=())
def bnf_single_pass_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    ref_logp: torch.Tensor,
    token_scale: torch.Tensor,
    scale: Optional[float],
    softcap: Optional[float],
    chunk_size: int,
    impl: str,
    need_h: bool,
    need_w: bool,
    need_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, neg_entropy, predicted d loss / d logp, d hidden, d weight, d bias) for all-scored rows; the
    gradients are for the predicted one times `_prescale(token_scale)`, d weight / d bias in fp32."""
    return _forward(hidden, weight, bias, labels, ref_logp, token_scale, scale, softcap, chunk_size, impl,
                    need_h, need_w, need_b)


@bnf_single_pass_op.register_fake
def _(hidden, weight, bias, labels, ref_logp, token_scale, scale, softcap, chunk_size, impl, need_h, need_w, need_b):
    out = hidden.new_empty(labels.shape[0], dtype=torch.float32)
    return (out, torch.empty_like(out), torch.empty_like(out),
            torch.empty_like(hidden) if need_h else hidden.new_empty(0),
            weight.new_empty(weight.shape, dtype=torch.float32) if need_w else weight.new_empty(0),
            weight.new_empty(weight.shape[0], dtype=torch.float32) if need_b else weight.new_empty(0))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[2], output[3], output[4], output[5], inputs[5])
    ctx.has_bias = inputs[2] is not None
    ctx.weight_dtype = inputs[1].dtype
    ctx.mark_non_differentiable(*output[1:])


def upstream_factor(grad_logp: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    """The scalar s with grad_logp = s * predicted (least squares); asserts, asynchronously, that it fits.

    Non-finite inputs give a non-finite s, so the gradients are non-finite too and the step is skipped.
    """
    grad_logp = grad_logp.float()
    factor = (grad_logp * predicted).sum() / (predicted * predicted).sum().clamp(min=1e-30)
    residual = (grad_logp - factor * predicted).abs().max() if grad_logp.numel() else grad_logp.new_zeros(())
    bound = 1e-4 * grad_logp.abs().max() + 1e-30 if grad_logp.numel() else grad_logp.new_ones(())
    # Non-finite values are not a misuse: they reach the gradients, where the trainer's step guard skips the step.
    fits = (residual <= bound) | ~torch.isfinite(residual) | ~torch.isfinite(bound)
    torch._assert_async(
        fits,
        "the BNF single-pass op got an upstream gradient that is not its predicted one times a constant: it "
        "may only feed the BNF loss it was built for (use token_logprobs without bnf_grad otherwise)",
    )
    return factor


def _backward(ctx, grad_logp, *_unused):
    predicted, grad_h, grad_w, grad_b, token_scale = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    # fp32: a 2^16 loss scale is itself out of fp16's range.
    factor = upstream_factor(grad_logp, predicted) / _prescale(token_scale)
    # In place: the saved gradients are used once, and a scaled fp32 copy of `d weight` would be a second [V, H].
    return (grad_h.float().mul_(factor).to(grad_h.dtype) if need_h else None,
            grad_w.mul_(factor).to(ctx.weight_dtype) if need_w else None,
            grad_b.mul_(factor).to(ctx.weight_dtype) if need_b and ctx.has_bias else None,
            None, None, None, None, None, None, None, None, None, None)


bnf_single_pass_op.register_autograd(_backward, setup_context=_setup_context)
