"""Fused linear + per-token log-prob: what BNF and ASFT need, without the `[tokens, vocab]` logits.

`token_logprobs(hidden, weight, labels)` returns, for every row, `logp = log softmax(z)[label]`
(differentiable w.r.t. hidden, weight and bias) and `neg_entropy = sum_v p_v log p_v` (value only),
where `z = transform(hidden @ weight.T + bias)`. Rows labelled `ignore_index` are removed before any
matmul, get 0 for both outputs and a zero gradient, so prompt and padding tokens cost nothing.

Two implementations share the chunk loops (`chunked.py`, `single_pass.py`): `torch` (runs everywhere)
and `triton` (CUDA; on CPU only under TRITON_INTERPRET=1, for tests). `impl="auto"` takes Triton on CUDA.
With a `grad_rule` (a loss's per-row gradient, registered by the method that owns it, `grad_rules.py`),
the gradient is built in the forward pass (`single_pass.py`), saving the backward's recomputation of the
logits; so it is, for any loss, when only `hidden` takes a gradient (a frozen head, `chunked.py`). How
large a block is comes from the bytes each implementation allocates (`schedule.py`).
"""
from __future__ import annotations

import os

import torch

from .chunked import IMPLS, token_logprobs_op
from .grad_rules import GradRule, get_grad_rule, register_grad_rule
from .logit_transform import LogitTransform
from .misuse import SinglePassMisuse, raise_pending
from .segments import SPLIT, SegmentStats, host_ints, plan_segments, record_split
from .schedule import DEFAULT_WORKSPACE_BYTES, bytes_per_logit, default_chunk_size
from .single_pass import single_pass_op, with_rule_gradient

__all__ = ["token_logprobs", "default_chunk_size", "resolve_impl", "LogitTransform", "DEFAULT_WORKSPACE_BYTES",
           "GradRule", "register_grad_rule", "bytes_per_logit", "SinglePassMisuse", "raise_pending",
           "with_rule_gradient"]


def triton_available(device: torch.device) -> bool:
    """Triton kernels can run here: on CUDA, or anywhere under TRITON_INTERPRET=1."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def resolve_impl(impl: str, device: torch.device) -> str:
    """`auto` -> `triton` on CUDA when Triton is installed, else `torch`; an explicit choice is checked."""
    if impl == "auto":
        return "triton" if device.type == "cuda" and triton_available(device) else "torch"
    if impl not in IMPLS:
        raise ValueError(f"impl must be 'auto' or one of {IMPLS}, got {impl!r}")
    if impl == "triton" and not triton_available(device):
        raise ValueError(f"impl='triton' needs CUDA (or TRITON_INTERPRET=1 for tests); inputs are on {device}")
    return impl


def _over_segments(hidden, weight, bias, labels, rule, a, b, scale, softcap, chunk_size, impl, need, plan):
    """(logp, neg_entropy, rule gradient) of a rule over segments: the segments that fit a block in the
    single pass, each block holding whole segments; those longer than a block in the two-pass op, their
    rule gradient from their whole rows' statistics (they get it in backward, as any upstream gradient)."""
    record_split(plan, chunk_size)
    device = hidden.device
    parts = []  # (rows or None for all, logp, neg_entropy, rule gradient)
    if plan.blocks:
        rows = None if plan.single_rows is None else host_ints(plan.single_rows, device)
        pick = (lambda t: t) if rows is None else (lambda t: t.index_select(0, rows))
        local = host_ints(plan.local, device)
        bounds = [x for block in plan.blocks for x in block]
        logp, neg_entropy, grad, *_ = single_pass_op(
            pick(hidden), weight, bias, pick(labels), rule.name, pick(a), pick(b), scale, softcap, chunk_size, impl,
            *need, local, bounds)
        parts.append((rows, logp, neg_entropy, grad))
    if plan.long_rows:
        rows = host_ints(plan.long_rows, device)
        pick = lambda t: t.index_select(0, rows)  # noqa: E731
        logp, neg_entropy, _, _ = token_logprobs_op(pick(hidden), weight, bias, pick(labels), scale, softcap,
                                                    chunk_size, impl, need == (True, False, False))
        stats = SegmentStats.of(logp.detach(), host_ints(plan.long_segment, device))
        parts.append((rows, logp, neg_entropy, rule.evaluate(logp.detach(), pick(a), pick(b), stats).float()))
    if len(parts) == 1 and parts[0][0] is None:
        return parts[0][1:]
    n = labels.shape[0]
    out = [torch.zeros(n, dtype=torch.float32, device=device) for _ in range(3)]
    for rows, *values in parts:
        out = [o.index_copy(0, rows, v) for o, v in zip(out, values)]
    return out[0], out[1].detach(), out[2].detach()


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    impl: str = "auto",
    row_index: torch.Tensor | None = None,
    grad_rule: GradRule | str | None = None,
    grad_inputs: tuple[torch.Tensor, torch.Tensor] | None = None,
    return_lse: bool = False,
    segment_lengths: list[int] | None = None,
) -> tuple[torch.Tensor, ...]:
    """Per-row label log-prob and negative entropy of `softcap(scale * (hidden @ weight.T + bias))`.

    Args:
        hidden: `[N, H]` final hidden states (any float dtype).
        weight: `[V, H]` output embedding (the `lm_head` weight, tied or not).
        labels: `[N]` integer label per row; `ignore_index` rows are not scored.
        bias: optional `[V]` output bias.
        chunk_size: rows per logits block; default from `default_chunk_size` for the implementation (the
            vocabulary-sliced backward then holds as many logits, `schedule.vocab_slice_cols`).
        softcap: Gemma-style final logit soft-capping value.
        scale: multiplier on the projection (Cohere `logit_scale`, `1 / logits_scaling` for Granite).
        impl: "auto", "torch" or "triton".
        row_index: the indices of the scored rows, when the caller knows them (e.g. computed on the CPU
            by a data collator). The op then needs no device-to-host synchronisation at all; otherwise it
            finds them with `nonzero` (one sync) and checks the labels are in the vocabulary. With
            `row_index`, a label outside the vocabulary is never read: its row's `logp` is NaN (which the
            trainer's step guard skips). When every row is scored (`row_index` has N entries), the rows are
            used in place, without a copy.
        grad_rule, grad_inputs: a registered `GradRule` (or its name) and its two per-row inputs `(a [N],
            b [N])` when `logp` feeds that rule's loss and nothing else: the gradient, `rule.grad(logp, a,
            b)` per row, is then built during the forward (one logits pass instead of two), and returned as a
            third output, which the loss should use as its gradient w.r.t. `logp` (`with_rule_gradient(loss,
            logp, rule_grad)`, as the trainer does). Backward
            checks that the upstream gradient is that one up to a constant factor, within the rounding of
            the rule's inputs; anything else raises `SinglePassMisuse` (on CUDA at the next call: no host
            sync) and makes that backward's gradients NaN. Without a gradient (no_grad, or no input that
            needs one) the plain op runs and the third output is the rule evaluated on its `logp`.
        segment_lengths: for a rule over segments (a response-level rule, such as ASFT's), how many
            consecutive scored rows each segment has, in row order, as host integers (a response with no
            scored row: 0). The single pass then cuts its blocks at segment boundaries, so each segment's
            statistics are complete before its d logits are formed; the rows of a segment longer than a
            block take the two-pass op instead (logged once per process, with their share).
        return_lse: also return each row's log-partition `log Z = logsumexp_v z_v` (of the transformed
            logits), which the op computes anyway: the label's logit is then `z_y = logp + log Z`. Value
            only, and only without a gradient rule's pass (it is for scoring, not for training).

    Inputs are brought to one compute dtype as `nn.Linear` under autocast would: autocast's dtype when it is
    on, else the weight's (an fp32 bias or fp32 hidden states beside a bf16 head are cast; their gradients
    come back in their own dtype). CUDA inputs run on their own device, whichever is current.

    Returns:
        `(logp, neg_entropy)`, both fp32 `[N]`; `neg_entropy` carries no gradient. With a `grad_rule`, a third
        fp32 `[N]`: the rule's d loss / d logp (no gradient). With `return_lse`, a third fp32 `[N]`: log Z.
        Unscored rows hold 0 in every output.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or labels.dim() != 1:
        raise ValueError(
            f"token_logprobs expects hidden [N, H], weight [V, H], labels [N]; got {tuple(hidden.shape)}, "
            f"{tuple(weight.shape)}, {tuple(labels.shape)}"
        )
    n, h = hidden.shape
    v = weight.shape[0]
    if weight.shape[1] != h or labels.shape[0] != n:
        raise ValueError(f"shape mismatch: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, labels {tuple(labels.shape)}")
    if bias is not None and bias.shape != (v,):
        raise ValueError(f"bias must have shape ({v},), got {tuple(bias.shape)}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if (grad_rule is None) != (grad_inputs is None):
        raise ValueError("grad_rule and grad_inputs go together: pass both or neither")
    if return_lse and grad_rule is not None:
        raise ValueError("return_lse is for scoring: it cannot be combined with a grad_rule")
    rule = get_grad_rule(grad_rule if isinstance(grad_rule, str) else grad_rule.name) if grad_rule is not None else None
    if rule is not None and rule.over_segments and segment_lengths is None:
        raise ValueError(f"gradient rule {rule.name!r} is over segments: pass segment_lengths")
    LogitTransform(scale=scale, softcap=softcap)  # validates the values
    impl = resolve_impl(impl, hidden.device)

    labels = labels.long()
    if row_index is None:
        row_index = (labels != ignore_index).nonzero().squeeze(1)
        scored = labels.index_select(0, row_index)
        if scored.numel() and (int(scored.min()) < 0 or int(scored.max()) >= v):
            bad = scored[(scored < 0) | (scored >= v)][0].item()
            raise ValueError(f"label {bad} is outside the vocabulary [0, {v}) and is not ignore_index={ignore_index}")
    else:
        scored = labels.index_select(0, row_index)

    # One compute dtype, as the model's own lm_head would use: autocast's, else the weight's.
    dtype = (torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type)
             else weight.dtype)
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    bias = bias.to(dtype) if bias is not None else None
    need = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    if chunk_size is None:
        chunk_size = default_chunk_size(v, hidden.dtype, impl=impl, device_type=hidden.device.type,
                                        hidden_size=h if need[1] else 0)
    every_row = row_index.shape[0] == n  # a shape, not a value: no sync
    if rule is not None and rule.over_segments and sum(int(x) for x in segment_lengths) != row_index.shape[0]:
        raise ValueError(f"segment_lengths add up to {sum(int(x) for x in segment_lengths)} rows; "
                         f"{row_index.shape[0]} rows are scored")

    def rows(t: torch.Tensor) -> torch.Tensor:
        return t if every_row else t.index_select(0, row_index)

    with torch.autocast(hidden.device.type, enabled=False):
        if rule is not None:
            a, b = (rows(t.reshape(-1)).float().detach() for t in grad_inputs)
        # (no scored row: the plain op, whose empty output still connects the loss to the inputs)
        single = rule is not None and torch.is_grad_enabled() and any(need) and row_index.shape[0] > 0
        if single and rule.over_segments:
            logp_s, neg_entropy_s, rule_grad_s = _over_segments(
                rows(hidden), weight, bias, scored, rule, a, b, scale, softcap, chunk_size, impl, need,
                plan_segments(segment_lengths, chunk_size))
        elif single:
            logp_s, neg_entropy_s, rule_grad_s, *_ = single_pass_op(
                rows(hidden), weight, bias, scored, rule.name, a, b, scale, softcap, chunk_size, impl, *need
            )
        else:
            hidden_grad_only = torch.is_grad_enabled() and need == (True, False, False)
            logp_s, neg_entropy_s, lse_s, _ = token_logprobs_op(
                rows(hidden), weight, bias, scored, scale, softcap, chunk_size, impl, hidden_grad_only
            )
            if rule is not None:
                stats = None
                if rule.over_segments:
                    segment = host_ints(plan_segments(segment_lengths, chunk_size).segment_of_row, logp_s.device)
                    stats = SegmentStats.of(logp_s.detach(), segment)
                rule_grad_s = rule.evaluate(logp_s.detach(), a, b, stats).float()
    extra = (rule_grad_s.detach(),) if rule is not None else (lse_s.detach(),) if return_lse else ()
    if every_row:
        return (logp_s, neg_entropy_s.detach(), *extra)
    logp = torch.zeros(n, dtype=torch.float32, device=hidden.device).index_copy(0, row_index, logp_s)
    neg_entropy, *extra = (torch.zeros(n, dtype=torch.float32, device=hidden.device).index_copy(0, row_index, t)
                           for t in (neg_entropy_s.detach(), *extra))
    return (logp, neg_entropy, *extra)
