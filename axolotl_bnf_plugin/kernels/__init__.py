"""Fused linear + per-token log-prob: what BNF and ASFT need, without the `[tokens, vocab]` logits.

`token_logprobs(hidden, weight, labels)` returns, for every row, `logp = log softmax(z)[label]`
(differentiable w.r.t. hidden, weight and bias) and `neg_entropy = sum_v p_v log p_v` (value only),
where `z = transform(hidden @ weight.T + bias)`. Rows labelled `ignore_index` are removed before any
matmul, get 0 for both outputs and a zero gradient, so prompt and padding tokens cost nothing.
"""
from __future__ import annotations

import torch

from .logit_transform import LogitTransform
from .torch_chunked import token_logprobs_torch

__all__ = ["token_logprobs", "default_chunk_size", "LogitTransform", "DEFAULT_WORKSPACE_BYTES"]

# Bytes one `[chunk, V]` block may take (fp32 logits plus the matmul's own output in the input dtype).
DEFAULT_WORKSPACE_BYTES = 256 * 1024 * 1024


def default_chunk_size(vocab_size: int, dtype: torch.dtype, workspace_bytes: int = DEFAULT_WORKSPACE_BYTES) -> int:
    """Largest row count whose logits block fits the workspace, rounded down to a multiple of 16."""
    bytes_per_row = vocab_size * (4 + 4 + torch.finfo(dtype).bits // 8)
    rows = max(workspace_bytes // bytes_per_row, 16)
    return int(rows // 16 * 16)


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row label log-prob and negative entropy of `softcap(scale * (hidden @ weight.T + bias))`.

    Args:
        hidden: `[N, H]` final hidden states (any float dtype).
        weight: `[V, H]` output embedding (the `lm_head` weight, tied or not).
        labels: `[N]` integer label per row; `ignore_index` rows are not scored.
        bias: optional `[V]` output bias.
        chunk_size: rows per logits block; default from `default_chunk_size`.
        softcap: Gemma-style final logit soft-capping value.
        scale: multiplier on the projection (Cohere `logit_scale`, `1 / logits_scaling` for Granite).

    Returns:
        `(logp, neg_entropy)`, both fp32 `[N]`; `neg_entropy` carries no gradient.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or labels.dim() != 1:
        raise ValueError(
            f"token_logprobs expects hidden [N, H], weight [V, H], labels [N]; got {tuple(hidden.shape)}, "
            f"{tuple(weight.shape)}, {tuple(labels.shape)}"
        )
    n, h = hidden.shape
    v = weight.shape[0]
    if weight.shape[1] != h or labels.shape[0] != n:
        raise ValueError(f"shape mismatch: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, labels {tuple(labels.shape)}")
    if bias is not None and bias.shape != (v,):
        raise ValueError(f"bias must have shape ({v},), got {tuple(bias.shape)}")
    if chunk_size is None:
        chunk_size = default_chunk_size(v, hidden.dtype)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    transform = LogitTransform(scale=scale, softcap=softcap)

    labels = labels.long()
    rows = (labels != ignore_index).nonzero().squeeze(1)
    scored = labels.index_select(0, rows)
    if scored.numel() and (int(scored.min()) < 0 or int(scored.max()) >= v):
        bad = scored[(scored < 0) | (scored >= v)][0].item()
        raise ValueError(f"label {bad} is outside the vocabulary [0, {v}) and is not ignore_index={ignore_index}")
    if rows.numel() == n:
        return token_logprobs_torch(hidden, weight, labels, bias, transform, chunk_size)
    logp_s, neg_entropy_s = token_logprobs_torch(hidden.index_select(0, rows), weight, scored, bias, transform, chunk_size)
    logp = torch.zeros(n, dtype=torch.float32, device=hidden.device).index_copy(0, rows, logp_s)
    neg_entropy = torch.zeros(n, dtype=torch.float32, device=hidden.device).index_copy(0, rows, neg_entropy_s)
    return logp, neg_entropy
