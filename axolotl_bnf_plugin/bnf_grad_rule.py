"""BNF's per-token gradient as a rule the fused op can apply during the forward pass.

BNF's loss is a weighted cross-entropy whose weights the loss treats as constants, so its gradient w.r.t. a
token's label log-prob is `token_scale * w(logp, ref_logp)` (`losses.bnf_token_weight`,
`losses.bnf_response_scale`), with |w| <= 1. Registered under the name "bnf", with
`grad_inputs = (ref_logp, token_scale)`:

    token_logprobs(hidden, weight, labels, grad_rule=BNF_GRAD_RULE, grad_inputs=(ref_logp, token_scale))
"""
from __future__ import annotations

import torch

from .kernels.grad_rules import GradRule, register_grad_rule
from .losses import bnf_token_weight


def _grad(logp: torch.Tensor, ref_logp: torch.Tensor, token_scale: torch.Tensor) -> torch.Tensor:
    return token_scale * bnf_token_weight(logp, ref_logp)[2]


def _bound(ref_logp: torch.Tensor, token_scale: torch.Tensor) -> torch.Tensor:
    return token_scale.abs()  # |w| <= 1: q and c * p_y both lie in [0, 1]


try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:
    @triton.jit
    def _triton_grad(logp, ref_logp, token_scale):
        """`_grad` on fp32 scalars, for the fused row kernel (`kernels/triton_rows.py`) to inline."""
        p_y = tl.exp(logp)
        q = tl.minimum(p_y / (tl.exp(ref_logp) + 1e-6), 1.0)
        c = (1.0 - q + 1e-6) / (1.0 - p_y + 1e-6)
        return token_scale * (q - c * p_y)
else:
    _triton_grad = None


BNF_GRAD_RULE = register_grad_rule(GradRule("bnf", grad=_grad, bound=_bound, triton_grad=_triton_grad))
