"""Shapes-only (meta) outputs shared by the custom ops' fake kernels.

`torch.compile` and meta-device tracing run an op's fake kernel instead of its loops, so each fake must
return tensors of exactly the shapes and dtypes the real op does. Both ops return per-row fp32 statistics
and, where they build gradients, one tensor per input (an empty one when that gradient is not needed);
these two helpers say that once.
"""
from __future__ import annotations

import torch


def fake_rows(hidden: torch.Tensor, labels: torch.Tensor, count: int) -> tuple[torch.Tensor, ...]:
    """`count` fp32 `[N]` per-row outputs (N = scored rows)."""
    return tuple(hidden.new_empty(labels.shape[0], dtype=torch.float32) for _ in range(count))


def fake_grads(hidden: torch.Tensor, weight: torch.Tensor, need_h: bool, need_w: bool, need_b: bool,
               weight_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d hidden, d weight, d bias) as the ops return them: d weight / d bias in `weight_dtype` (default the
    weight's), and an empty tensor for each gradient not needed."""
    dtype = weight_dtype or weight.dtype
    return (torch.empty_like(hidden) if need_h else hidden.new_empty(0),
            weight.new_empty(weight.shape, dtype=dtype) if need_w else weight.new_empty(0),
            weight.new_empty(weight.shape[0], dtype=dtype) if need_b else weight.new_empty(0))
