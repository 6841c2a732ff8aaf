"""The loss of one collated batch under any method: score the responses, ask the method, add the router loss.

A step runs the policy once over all responses of the micro-batch, takes the final hidden states (never
the full logits), and feeds them with the output embedding to the fused `token_logprobs` op. A method that
`needs_ref_logps` also gets the initial policy's log-probs of the same tokens (`ref_logp`): precomputed
with the data (the batch's `ref_logps` column), or scored here by a live reference (`initial_policy`: a
frozen copy, the policy with a fresh adapter disabled, or with a frozen snapshot of a continued adapter).
Where the method has a gradient rule, the policy's pass builds the gradient in its forward, and the loss
takes the rule's values that pass used as its gradient (`kernels.with_rule_gradient`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .data.collator import REF_LOGPS, per_position, response_rows
from .initial_policy import eval_mode
from .kernels import with_rule_gradient
from .methods import Method, batch_normalizer, method_class, method_from_config
from .methods.common import Metrics
from .model_io import response_token_logps, router_aux_coef, unwrap
from .telemetry import shift_metrics


@dataclass(frozen=True)
class LossSettings:
    """What `batch_loss` needs: the method (an object, or a registered name for its defaults) and how the
    fused op runs."""

    method: Method | str
    chunk_size: int | None = None
    impl: str = "auto"

    def __post_init__(self):
        if isinstance(self.method, str):
            object.__setattr__(self, "method", method_class(self.method)())

    @classmethod
    def from_config(cls, cfg) -> "LossSettings":
        """From the plugin's settings (`args.plugin_settings`, or anything with the same keys)."""
        return cls(method_from_config(cfg), cfg.bnf_loss_chunk_size, cfg.bnf_kernel_impl)


def batch_loss(model, batch, settings: LossSettings, reference=None, check_head: bool = False, normalizer=None):
    """(loss, metrics) of one collated batch (packed or not) under the configured method.

    `reference` (methods that need the initial policy's log-probs, when the batch does not carry them) is a
    frozen model or one of `initial_policy`'s references; its log-probs of the same tokens come from the same
    fused op under `no_grad`, in eval mode. `normalizer` replaces the batch's own n (pairs + unpaired
    responses), e.g. by the n of a whole optimiser step.

    A mixture-of-experts policy whose config sets `output_router_logits` also returns its router load-balancing
    loss from this forward (never the reference's or any scoring pass's); `router_aux_loss_coef * aux_loss`
    is added to the loss and `aux_loss` (unscaled) to the metrics. See `_add_router_aux`.
    """
    method = settings.method
    # The initial policy's log-probs: precomputed once (bnf_precompute_ref, or a reference-free method's shift
    # baseline), or scored by the live reference. That is scored before the policy: when it is the policy
    # itself with its adapter disabled, a forward after the policy's could reshard (FSDP2) a head the policy's
    # backward uses.
    if REF_LOGPS in batch:
        ref_logp = batch[REF_LOGPS]
    elif method.needs_ref_logps:
        ref_logp = live_reference_logps(model, batch, settings, reference)
    else:
        ref_logp = None
    grad_rule, grad_inputs = method.grad_rule, None
    if grad_rule is not None:
        grad_inputs = method.grad_inputs(ref_logp, lambda values: per_position(batch, values),
                                         response_rows(batch)[0], batch["sign"], batch["pair_ids"], normalizer)
    aux_coef = router_aux_coef(model)
    logp, neg_entropy, _, *rest = response_token_logps(model, batch, settings.chunk_size, check_head=check_head,
                                                       impl=settings.impl, grad_rule=grad_rule,
                                                       grad_inputs=grad_inputs, router_aux=aux_coef is not None)
    rule_grad, aux = (rest[0], rest[1:]) if grad_rule is not None else (None, rest)
    mask, logp, neg_entropy = response_rows(batch, logp, neg_entropy)
    ref_logp = response_rows(batch, ref_logp)[1] if ref_logp is not None else None
    if rule_grad is None:
        loss, metrics = method.loss(logp, ref_logp, neg_entropy, mask, batch["sign"], batch["pair_ids"],
                                    normalizer=normalizer)
    else:
        loss, metrics = method.loss(logp.detach(), ref_logp, neg_entropy, mask, batch["sign"], batch["pair_ids"],
                                    normalizer=normalizer)
        loss = with_rule_gradient(loss, logp, response_rows(batch, rule_grad)[1])
    if ref_logp is not None:
        metrics.merge(shift_metrics(logp, ref_logp, mask, batch["sign"],
                                    compute_dtype=compute_dtype(model, logp.device)))
    if aux_coef is not None:
        loss = _add_router_aux(loss, metrics, aux[0], aux_coef, batch, normalizer)
    return loss, metrics


def _add_router_aux(loss, metrics: Metrics, aux_loss, coef: float, batch, normalizer):
    """`loss + coef * aux_loss` for this micro-batch, and `aux_loss` (unscaled) in the metrics.

    The aux loss is a function of the whole micro-batch's routing (as in TRL's DPO trainer, which adds it per
    micro-batch). Where the method loss is normalised by the n of the whole optimiser step, the aux term is
    weighted by the micro-batch's share of that n: over an optimiser step (and over processes, where the
    trainer's loss scaling then applies alike) it adds `coef *` the n-weighted mean of the micro-batches' aux
    losses, i.e. the mean for micro-batches of equal n, whatever the accumulation. It does not depend on the
    label log-probs, so a single-pass op still receives exactly its predicted upstream gradient.
    The metric is averaged with the same weights (count = the micro-batch's n).
    """
    n_batch = batch_normalizer(batch["pair_ids"], batch["sign"].shape[0]).clamp(min=1)
    aux_loss = aux_loss.to(loss.device)
    weight = 1.0 if normalizer is None else n_batch.to(loss.device) / torch.as_tensor(
        normalizer, dtype=torch.float32, device=loss.device)
    metrics["aux_loss"] = aux_loss.detach()
    metrics.counts["aux_loss"] = n_batch.detach()
    return loss + (coef * weight) * aux_loss


def compute_dtype(model, device: torch.device) -> torch.dtype:
    """The dtype the model's forward on `device` computes in: autocast's where it is on, else its head's."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return unwrap(model).get_output_embeddings().weight.dtype


def live_reference_logps(policy, batch, settings: LossSettings, reference) -> torch.Tensor:
    """The reference's per-position label log-probs `[rows, T]`, from the same fused op, without gradient."""
    if reference is None:
        raise ValueError(f"{settings.method.name} needs a reference (see initial_policy.live_reference)")
    scoring = eval_mode(reference) if isinstance(reference, torch.nn.Module) else reference.scoring(policy)
    with torch.no_grad(), scoring as ref_model:
        return response_token_logps(ref_model, batch, settings.chunk_size, impl=settings.impl)[0]
