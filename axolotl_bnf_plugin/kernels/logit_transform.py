"""How a model turns `hidden @ weight.T + bias` into the logits it samples from.

Some architectures post-process the projection: Cohere multiplies by `logit_scale`, Granite divides by
`logits_scaling`, Gemma 2/3 soft-cap with `cap * tanh(x / cap)`. The fused op must score the same
logits the model would, so both the forward and the chain rule in the backward go through here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LogitTransform:
    """z = softcap * tanh(scale * raw / softcap); either step is skipped when its value is None."""

    scale: float | None = None
    softcap: float | None = None

    def __post_init__(self):
        if self.softcap is not None and not self.softcap > 0:
            raise ValueError(f"softcap must be a positive number, got {self.softcap!r}")
        if self.scale is not None and not self.scale == self.scale:  # NaN
            raise ValueError("scale must be a finite number, got NaN")

    def apply(self, raw: torch.Tensor) -> torch.Tensor:
        """Logits from raw projections, never modifying `raw` (needed again for backprop): `raw` itself
        when there is nothing to apply (no copy of the block), else a new tensor."""
        if self.scale is None and self.softcap is None:
            return raw
        z = raw * self.scale if self.scale is not None else raw.clone()
        if self.softcap is not None:
            z.div_(self.softcap).tanh_().mul_(self.softcap)
        return z

    def backprop(self, dz: torch.Tensor, raw: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Turn dL/dz into dL/draw in place: tanh' = 1 - (z / cap)^2, then the scale."""
        if self.softcap is not None:
            dz.mul_(1.0 - (z / self.softcap).square_())
        if self.scale is not None:
            dz.mul_(self.scale)
        return dz
