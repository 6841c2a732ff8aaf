"""Row operations on one logits block, in plain PyTorch (CPU, reference, any device).

- `stats`: per-row log-sum-exp, label logit and `sum_v p_v z_v`;
- `dlogits_`: d loss / d(raw logits) for an upstream gradient on the label log-prob;
- `rule_pass_`: both, with the upstream gradient computed from the statistics in between (the single pass).
The Triton back-end implements the same three functions; the chunk loops and the matmuls around them are
shared (`chunked.py`, `single_pass.py`).

Every block handed to these functions is the caller's to overwrite, and they do: each elementwise step is
a full pass over a block far larger than any cache, so passes are what costs. The fp32 logits are the
block itself when it is fp32 (else one upcast copy), transformed in place; the exponentials go to one fp32
scratch block taken from the caller's `Workspace`, reused by every block of a loop (on a CPU a fresh
block-sized allocation is fresh pages, faulted in on first write). At most the block, the upcast copy and
the scratch are alive: what `schedule.bytes_per_logit` charges. `dlogits_` and `rule_pass_` return the
tensor that holds the d logits: the block, or (fp32 blocks) the scratch, which then saves a copy.
"""
from __future__ import annotations

import torch

from typing import Callable

from .logit_transform import LogitTransform
from .workspace import Workspace


def logits(block: torch.Tensor, transform: LogitTransform) -> torch.Tensor:
    """fp32 logits of a block of raw projections, in the block itself when it is fp32 (else an upcast
    copy); the transform is applied in place."""
    return transform.apply_(block if block.dtype == torch.float32 else block.float())


def _scratch(workspace: Workspace | None, like: torch.Tensor) -> torch.Tensor:
    if workspace is None:
        return torch.empty_like(like)
    return workspace.take("scratch", like.shape, torch.float32, like.device)


def label_logits(z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """z[r, y_r], NaN where y_r is not a column of the block: a label out of the vocabulary (which a caller
    passing `row_index` has not checked) never reads outside its row, and poisons only its own row."""
    inside = (labels >= 0) & (labels < z.shape[1])
    picked = z.gather(1, labels.clamp(0, z.shape[1] - 1)[:, None]).squeeze(1)
    return torch.where(inside, picked, torch.full_like(picked, float("nan")))


def _stats(z: torch.Tensor, labels: torch.Tensor, workspace: Workspace | None, keep_z: bool):
    """(lse, z_y, E_p[z], e, s) with e = exp(z - max) in the scratch and s its row sums. Overwrites `z`
    unless `keep_z` (a soft-capped block's chain rule needs it), which costs a slower row dot product."""
    m = z.amax(1, keepdim=True)
    z_y = label_logits(z, labels)
    e = _scratch(workspace, z)
    if keep_z:
        torch.sub(z, m, out=e).exp_()
        s = e.sum(1)
        t = torch.bmm(e[:, None, :], z[:, :, None]).view(-1) - m.squeeze(1) * s  # sum e * (z - m)
    else:
        torch.exp(z.sub_(m), out=e)
        s = e.sum(1)
        t = z.mul_(e).sum(1)  # sum e * (z - m)
    m = m.squeeze(1)
    return m + s.log(), z_y, m + t / s, e, s


def stats(block: torch.Tensor, labels: torch.Tensor, transform: LogitTransform, workspace: Workspace | None = None):
    """(lse, z_y, E_p[z]) per row of a `[C, V]` block of raw logits (any float dtype), all fp32."""
    lse, z_y, expected_z, _, _ = _stats(logits(block, transform), labels, workspace, keep_z=False)
    return lse, z_y, expected_z


def _add_label_term(dz: torch.Tensor, labels: torch.Tensor, grad: torch.Tensor, col_offset: int) -> None:
    """dz[r, y_r] += grad_r for labels inside the vocabulary slice starting at `col_offset`."""
    local = labels - col_offset
    inside = (local >= 0) & (local < dz.shape[1])
    dz.scatter_add_(1, local.clamp(0, dz.shape[1] - 1)[:, None], (grad * inside)[:, None])


def _finish(block: torch.Tensor, dz: torch.Tensor, z: torch.Tensor, transform: LogitTransform) -> torch.Tensor:
    """Chain d loss / dz through the transform and return the tensor the gradient matmuls read: `dz` itself
    when it has the block's dtype, else the block, overwritten."""
    transform.backprop_(dz, z)
    return dz if dz.dtype == block.dtype else block.copy_(dz)


def dlogits_(block: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor,
             transform: LogitTransform, col_offset: int = 0, workspace: Workspace | None = None) -> torch.Tensor:
    """d logits of a block of raw logits (vocabulary columns `col_offset:`): grad * (onehot(y) - p)."""
    z, grad = logits(block, transform), grad.float()
    # In place, unless the soft-cap's chain rule still needs z.
    if transform.softcap is not None:
        dz = torch.sub(z, lse[:, None], out=_scratch(workspace, z))
    else:
        dz = z.sub_(lse[:, None])
    dz.exp_().mul_(-grad[:, None])
    _add_label_term(dz, labels, grad, col_offset)
    return _finish(block, dz, z, transform)


def rule_pass_(block: torch.Tensor, labels: torch.Tensor, row_grad: Callable[[torch.Tensor], torch.Tensor],
               transform: LogitTransform, workspace: Workspace | None = None):
    """Statistics of the block, then `row_grad(logp)` (each row's upstream gradient, fp32), then the d logits
    for it. Returns fp32 (logp, neg_entropy, lse) per row and the tensor holding the d logits."""
    z = logits(block, transform)
    lse, z_y, expected_z, e, s = _stats(z, labels, workspace, keep_z=transform.softcap is not None)
    logp = z_y - lse
    grad = row_grad(logp).float()
    dz = e.mul_((-grad / s)[:, None])  # -grad * p
    _add_label_term(dz, labels, grad, 0)
    return logp, expected_z - lse, lse, _finish(block, dz, z, transform)
