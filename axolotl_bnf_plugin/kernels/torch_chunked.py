"""Pure-PyTorch chunked linear + log-prob op (runs everywhere; the reference implementation).

Only one `[chunk, V]` block of logits exists at a time, in the forward and in the backward (which
recomputes the block instead of saving it). The saved state is the inputs plus one fp32 log-sum-exp
per scored row, so memory beyond inputs and gradients is O(chunk * V), independent of N.
"""
from __future__ import annotations

import torch

from .logit_transform import LogitTransform


def _block_logits(hidden_c, weight, bias, transform: LogitTransform):
    """Logits of one row block in fp32 (the matmul itself accumulates in fp32 on every backend)."""
    raw = torch.nn.functional.linear(hidden_c, weight, bias).float()
    return transform.apply(raw)


class _ChunkedTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, transform: LogitTransform, chunk_size: int):
        n = hidden.shape[0]
        logp = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        neg_entropy = torch.zeros_like(logp)
        lse = torch.empty(labels.shape[0], dtype=torch.float32, device=hidden.device)
        for start in range(0, labels.shape[0], chunk_size):
            stop = min(start + chunk_size, labels.shape[0])
            z = _block_logits(hidden[start:stop], weight, bias, transform)
            lse_c = torch.logsumexp(z, dim=-1)
            z_y = z.gather(1, labels[start:stop, None]).squeeze(1)
            # sum_v p_v * z_v, computed in place on the block to keep one [chunk, V] buffer alive.
            expected_z = (z - lse_c[:, None]).exp_().mul_(z).sum(-1)
            lse[start:stop] = lse_c
            logp[start:stop] = z_y - lse_c
            neg_entropy[start:stop] = expected_z - lse_c
            del z
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.transform = transform
        ctx.chunk_size = chunk_size
        ctx.mark_non_differentiable(neg_entropy)
        return logp, neg_entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_neg_entropy):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        transform: LogitTransform = ctx.transform
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        grad_logp = grad_logp.float()
        for start in range(0, labels.shape[0], ctx.chunk_size):
            stop = min(start + ctx.chunk_size, labels.shape[0])
            h_c = hidden[start:stop]
            raw = torch.nn.functional.linear(h_c, weight, bias).float()
            z = transform.apply(raw)
            # dlogp/dz = onehot(y) - p, scaled by the upstream gradient; written over the block in place.
            dz = (z - lse[start:stop, None]).exp_().neg_()
            dz.scatter_add_(1, labels[start:stop, None], torch.ones_like(lse[start:stop, None]))
            dz.mul_(grad_logp[start:stop, None])
            dz = transform.backprop(dz, raw, z)
            del z, raw
            if need_h:
                grad_h[start:stop] = (dz.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_w:
                grad_w.addmm_(dz.t(), h_c.float())
            if need_b:
                grad_b += dz.sum(0)
        return (
            grad_h,
            grad_w.to(weight.dtype) if need_w else None,
            grad_b.to(bias.dtype) if need_b else None,
            None,
            None,
            None,
        )


def token_logprobs_torch(hidden, weight, labels, bias, transform: LogitTransform, chunk_size: int):
    """Per-row (logp, neg_entropy) over rows whose labels are all valid (filtering happens upstream)."""
    return _ChunkedTokenLogprobs.apply(hidden, weight, bias, labels, transform, chunk_size)
