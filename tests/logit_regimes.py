"""BNF inputs in the value regimes real models produce, built on exact logits (no Axolotl needed).

At step 1 of BNF the policy is its reference up to rounding, and many tokens (chat-template tokens, easy
continuations) have p > 1 - 1e-6, where BNF's token weight w = q - c p with c = (1 - q + 1e-6) /
(1 - p + 1e-6) is ill-conditioned in p. `regime_inputs` puts rows of each regime in one batch: hidden
states are solved for target logits through the head (H > V makes any logits reachable), so the
regimes are exactly what they say. Used by the CPU tests (Triton in its interpreter) and the GPU tests
(compiled Triton, bf16).
"""
from __future__ import annotations

import torch

from axolotl_bnf_plugin.kernels import token_logprobs, with_rule_gradient
from axolotl_bnf_plugin.methods.bnf import BNF_GRAD_RULE, bnf_loss, bnf_response_scale

V, H = 40, 48
REGIMES = ("confident, q = 1", "confident, q < 1", "step 1 (p = p_ref)", "near p_ref", "low p")
TRANSFORMS = {"plain": {}, "softcap-scale": {"softcap": 30.0, "scale": 0.8}}


def _raw_for(z: torch.Tensor, transform: dict) -> torch.Tensor:
    """Raw projections whose transform (scale, then soft-cap) gives the logits z."""
    raw = z.double()
    if "softcap" in transform:
        raw = transform["softcap"] * torch.atanh(raw / transform["softcap"])
    return raw / transform.get("scale", 1.0)


def regime_inputs(transform: dict, dtype: torch.dtype, device="cpu", rows_per_regime: int = 6, seed: int = 0):
    """(hidden, weight, labels, ref_logp, regime index per row, p per row) on `device`; hidden and weight in
    `dtype`, p and ref_logp from the rounded inputs in fp64 (ref_logp fp32)."""
    g = torch.Generator().manual_seed(seed)
    n = rows_per_regime * len(REGIMES)
    labels = torch.randint(0, V, (n,), generator=g)
    regime = torch.arange(n) // rows_per_regime
    # Label margins: p = 1 - ~1e-7 .. 1e-9 for the confident rows, moderate p elsewhere, p ~ 1e-5 for low p.
    margin = torch.tensor([20.0, 21.0, 19.5, 2.0, -8.0], dtype=torch.float64)[regime]
    z = 0.3 * torch.randn(n, V, generator=g, dtype=torch.float64)
    z[torch.arange(n), labels] += margin + torch.linspace(0, 1.5, n, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5
    hidden = torch.linalg.lstsq(weight, _raw_for(z, transform).T).solution.T
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    raw = hidden.double() @ weight.double().T * transform.get("scale", 1.0)
    if "softcap" in transform:
        raw = transform["softcap"] * torch.tanh(raw / transform["softcap"])
    logp = torch.log_softmax(raw, -1).gather(1, labels[:, None])[:, 0]
    ref = logp.clone()
    ref[regime == 0] -= 1e-5  # the policy above its reference: q = 1
    ref[regime == 1] += 3e-6  # below: q < 1
    ref[regime == 3] += 0.05 * torch.randn(int((regime == 3).sum()), generator=g, dtype=torch.float64)
    ref[regime == 4] -= 0.5
    return (hidden.to(device), weight.to(device), labels.to(device), ref.float().to(device), regime, logp.exp())


def bnf_grads(hidden, weight, labels, ref, impl, transform, single_pass, loss_uses_op_gradient=True):
    """d hidden, d weight (fp64) of BNF's loss over the rows as one response each (signs alternating).

    Single pass: the loss takes the op's rule values as its gradient (as the trainer does), or, with
    `loss_uses_op_gradient=False`, recomputes them itself (as a hand-written loop might)."""
    n = labels.shape[0]
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight)]
    mask = torch.ones(n, 1, dtype=torch.bool, device=labels.device)
    sign = torch.tensor([1, -1] * (n // 2), device=labels.device)
    scale = bnf_response_scale(mask, sign)
    kw = dict(grad_rule=BNF_GRAD_RULE, grad_inputs=(ref, scale)) if single_pass else {}
    logp, neg, *rule_grad = token_logprobs(*leaves, labels, impl=impl, chunk_size=7, **transform, **kw)
    if single_pass and loss_uses_op_gradient:
        loss, _ = bnf_loss(logp.detach()[:, None], ref[:, None], neg[:, None], mask, sign)
        loss = with_rule_gradient(loss, logp, rule_grad[0])
    else:
        loss, _ = bnf_loss(logp[:, None], ref[:, None], neg[:, None], mask, sign)
    return [g.double() for g in torch.autograd.grad(2.5 * loss, leaves)]


def max_rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())
