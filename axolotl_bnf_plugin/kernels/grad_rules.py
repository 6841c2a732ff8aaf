"""Per-row gradient rules: how a loss lets the op build its gradient during the forward pass.

The two-pass op computes each logits block twice: in forward for the statistics, in backward for d logits.
A loss whose gradient w.r.t. a row's label log-prob is a known function of that log-prob and of per-row
values fixed before the forward (a reference log-prob, a response weight) needs only one pass: each block,
once reduced to its statistics, is overwritten with d logits at once and fed to the gradient matmuls.

A method describes that function as a `GradRule` and registers it; the op (`single_pass.py`) receives the
rule's name, so the kernel layer knows no loss. A rule gives:
- `grad(logp, a, b)`: d loss / d logp per row, from fp32 `[C]` tensors, in PyTorch;
- `bound(a, b)`: a per-row upper bound on |grad|, known before the pass. The op scales the d logits by
  a power of two that brings the largest bound to (1/2, 1], so half-precision blocks hold them without
  underflow (see `single_pass.py`);
- optionally `triton_grad`: the same function as a `@triton.jit` function of three fp32 scalars, which the
  Triton back-end calls inside its one-pass row kernel. Without it, the Triton path runs the statistics
  kernel, `grad` in PyTorch and the d-logits kernel: the same numbers, one more read of the block.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

Grad = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Bound = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class GradRule:
    """d loss / d logp of each row as `grad(logp, a, b)`, with `|grad| <= bound(a, b)`."""

    name: str
    grad: Grad
    bound: Bound
    triton_grad: Any = None


_RULES: dict[str, GradRule] = {}


def register_grad_rule(rule: GradRule) -> GradRule:
    """Make `rule` reachable by name from the op; registering the same name again must be the same rule."""
    known = _RULES.get(rule.name)
    if known is not None and known is not rule:
        raise ValueError(f"a different gradient rule is already registered as {rule.name!r}")
    _RULES[rule.name] = rule
    return rule


def get_grad_rule(name: str) -> GradRule:
    try:
        return _RULES[name]
    except KeyError:
        raise ValueError(f"no gradient rule registered as {name!r}; registered: {sorted(_RULES)}") from None


def prescale(bound: torch.Tensor) -> torch.Tensor:
    """fp32 2^k with max(bound) * 2^k in (1/2, 1]: every d logit of the pass is then at most 1 in magnitude.

    A device scalar (no host sync); a non-finite bound gives a non-finite factor, hence non-finite
    gradients, which the trainer's step guard skips.
    """
    if not bound.numel():
        return torch.ones((), dtype=torch.float32, device=bound.device)
    largest = bound.float().abs().amax().clamp(min=2.0**-100)
    return torch.exp2(-torch.ceil(torch.log2(largest)))


def _unit_grad(logp: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(logp)


def _unit_bound(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(a)


try:
    import triton
    import triton.language as tl  # noqa: F401  (a @triton.jit function's module must have it)
except ImportError:  # the PyTorch back-end needs no Triton form
    _unit_triton = None
else:
    @triton.jit
    def _unit_triton(logp, a, b):
        return logp * 0.0 + 1.0


# d logp / d logp = 1: a pass with it leaves d logp / d logits (onehot(y) - p) in the block, whose product
# with the weight is d logp / d hidden. With a frozen head that is the whole backward, up to each row's
# upstream gradient, so the forward computes it (`chunked.py`) and no logits are recomputed.
UNIT_GRAD_RULE = register_grad_rule(GradRule("unit", grad=_unit_grad, bound=_unit_bound, triton_grad=_unit_triton))
