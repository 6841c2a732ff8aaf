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
        """Logits from raw projections, never modifying `raw`: `raw` itself when there is nothing to apply
        (no copy of the block), else a new tensor."""
        if self.scale is None and self.softcap is None:
            return raw
        return self.apply_(raw.clone())

    def apply_(self, raw: torch.Tensor) -> torch.Tensor:
        """`apply` in place, for a tensor the caller owns (an upcast copy of the block)."""
        if self.scale is not None:
            raw.mul_(self.scale)
        if self.softcap is not None:
            raw.div_(self.softcap).tanh_().mul_(self.softcap)
        return raw

    def backprop_(self, dz: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Turn dL/dz into dL/draw in place (tanh' = 1 - (z / cap)^2, then the scale); overwrites `z` when
        there is a soft-cap (it is then never the block itself, see `torch_rows.logits`)."""
        if self.softcap is not None:
            dz.mul_(z.div_(self.softcap).square_().neg_().add_(1.0))
        if self.scale is not None:
            dz.mul_(self.scale)
        return dz
