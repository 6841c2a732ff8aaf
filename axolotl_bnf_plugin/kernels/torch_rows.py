"""Row operations on one logits block, in plain PyTorch (CPU, reference, any device).

`stats` gives per-row log-sum-exp, label logit and `sum_v p_v z_v`; `dlogits_` overwrites the block with
dL/d(raw logits) for an upstream gradient on the label log-prob. The Triton back-end implements the same
two functions; the chunk loop and the matmuls around them are shared (`chunked.py`).
"""
from __future__ import annotations

import torch

from .logit_transform import LogitTransform


def stats(block: torch.Tensor, labels: torch.Tensor, transform: LogitTransform):
    """(lse, z_y, E_p[z]) per row of a `[C, V]` block of raw logits (any float dtype), all fp32."""
    z = transform.apply(block.float())
    lse = torch.logsumexp(z, dim=-1)
    z_y = z.gather(1, labels[:, None]).squeeze(1)
    expected_z = (z - lse[:, None]).exp_().mul_(z).sum(-1)
    return lse, z_y, expected_z


def dlogits_(block: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor,
             transform: LogitTransform) -> torch.Tensor:
    """Overwrite `block` (raw logits) with grad * (onehot(y) - p), chained through the transform."""
    raw = block.float()
    z = transform.apply(raw)
    dz = (z - lse[:, None]).exp_().neg_()
    dz.scatter_add_(1, labels[:, None], torch.ones_like(lse[:, None]))
    dz.mul_(grad[:, None])
    dz = transform.backprop(dz, raw, z)
    block.copy_(dz)
    return block
