"""Capability retention: the mean per-token log-likelihood of a held-out text under the policy.

Preference training moves probability mass; this measures what it costs the model elsewhere. The set is
`bnf_retention_datasets` (any `type:` the plugin reads: an SFT set through `bnf.sft`, or pairs, whose
preferred responses are scored), its first `bnf_retention_size` usable rows in the files' order, prepared as
training would prepare them (never packed). Every preferred response token is scored by the fused op under no_grad in eval mode,
and the metric is their mean log-prob: a token-weighted mean, so it does not depend on the batch size or
on how the rows are split.
"""
from __future__ import annotations

import torch

from ..data.collator import response_rows
from ..initial_policy import eval_mode
from ..model_io import resharded_after_each_forward, response_token_logps


@torch.no_grad()
def retention_logp(model, examples: list[dict], collator, batch_size: int, device, chunk_size: int | None = None,
                   impl: str = "auto") -> tuple[float, int]:
    """(mean log-prob of the preferred responses' tokens, how many tokens) of `examples` under `model`."""
    total, tokens = 0.0, 0
    with eval_mode(model), resharded_after_each_forward(model):
        for start in range(0, len(examples), batch_size):
            batch = {k: v.to(device) if torch.is_tensor(v) else v
                     for k, v in collator(examples[start:start + batch_size]).items()}
            logp, _, _ = response_token_logps(model, batch, chunk_size, impl=impl)
            mask, logp = response_rows(batch, logp)
            scored = mask & (batch["sign"] > 0)[:, None]
            total += float(torch.where(scored, logp.double(), torch.zeros_like(logp, dtype=torch.float64)).sum())
            tokens += int(scored.sum())
    return (total / tokens if tokens else float("nan")), tokens
