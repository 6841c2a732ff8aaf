"""Row operations on one logits block, in plain PyTorch (CPU, reference, any device).

- `stats`: per-row log-sum-exp, label logit and `sum_v p_v z_v`;
- `dlogits_`: overwrite the block with dL/d(raw logits) for an upstream gradient on the label log-prob;
- `rule_pass_`: both, with the upstream gradient given by a `GradRule` in between (the single pass).
The Triton back-end implements the same three functions; the chunk loops and the matmuls around them are
shared (`chunked.py`, `single_pass.py`). At most two fp32 `[C, V]` temporaries are alive at once (the
upcast logits and the exponentials), which `schedule.bytes_per_logit` charges; an fp32 block without a
soft-cap is turned into its d logits in place.
"""
from __future__ import annotations

import torch

from .grad_rules import GradRule
from .logit_transform import LogitTransform


def logits(block: torch.Tensor, transform: LogitTransform) -> torch.Tensor:
    """fp32 logits of a block of raw projections: the block itself when it is fp32 and nothing is applied,
    else a new tensor (an upcast copy, transformed in place)."""
    z = block.float()
    return transform.apply(z) if z is block else transform.apply_(z)


def _stats(z: torch.Tensor, labels: torch.Tensor):
    m = z.amax(1)
    e = (z - m[:, None]).exp_()
    s = e.sum(1)
    t = e.mul_(z).sum(1)
    lse = m + s.log()
    return lse, z.gather(1, labels[:, None]).squeeze(1), t / s


def stats(block: torch.Tensor, labels: torch.Tensor, transform: LogitTransform):
    """(lse, z_y, E_p[z]) per row of a `[C, V]` block of raw logits (any float dtype), all fp32."""
    return _stats(logits(block, transform), labels)


def _write_dlogits(block, z, labels, lse, grad, transform, col_offset=0):
    """block <- grad * (onehot(y) - p), chained through the transform; the block may be a slice of the
    vocabulary starting at `col_offset` (a label outside it contributes no one-hot term). `z` (the block's
    logits, possibly the block itself) is consumed: d logits are built in it unless the soft-cap's chain
    rule still needs it."""
    dz = z - lse[:, None] if transform.softcap is not None else z.sub_(lse[:, None])
    dz.exp_().mul_(-grad[:, None])
    local = labels - col_offset
    inside = (local >= 0) & (local < block.shape[1])
    dz.scatter_add_(1, local.clamp(0, block.shape[1] - 1)[:, None], (grad * inside)[:, None])
    transform.backprop_(dz, z)
    if dz is not block:
        block.copy_(dz)
    return block


def dlogits_(block: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor,
             transform: LogitTransform, col_offset: int = 0) -> torch.Tensor:
    """Overwrite `block` (raw logits of vocabulary columns `col_offset:`) with its d logits."""
    return _write_dlogits(block, logits(block, transform), labels, lse, grad.float(), transform, col_offset)


def rule_pass_(block: torch.Tensor, labels: torch.Tensor, rule: GradRule, a: torch.Tensor, b: torch.Tensor,
               prescale: torch.Tensor, transform: LogitTransform):
    """Statistics of the block, the rule's gradient, and the block overwritten with d logits for that
    gradient times `prescale`. Returns fp32 (logp, neg_entropy, grad) per row."""
    z = logits(block, transform)
    lse, z_y, expected_z = _stats(z, labels)
    logp = z_y - lse
    grad = rule.grad(logp, a, b).float()
    _write_dlogits(block, z, labels, lse, grad * prescale, transform)
    return logp, expected_z - lse, grad
