"""The likelihood probe: how a fixed set of pairs' log-likelihoods and logits move during training.

The BNF paper's evidence is about how the likelihoods of preferred and dispreferred responses shift under
DPO-family losses versus BNF. To compare methods on one footing, every run scores the *same* pairs with the
*same* code: the package's collator and fused op (`model_io.response_token_logps`), no gradient, eval mode,
once with the initial policy and again at later steps. This module holds that scoring and the metrics
computed from two scorings (`probe_metrics`); `callback.py` runs it inside any Trainer.

Per scored token t of a response, with z the (transformed) logits of the position:
    log p_t = z_y - log Z,  log Z = logsumexp_v z_v.
The fused op computes log Z anyway (its per-row log-sum-exp), so the logit view costs nothing extra and
never builds the `[tokens, vocab]` logits: z_y = log p + log Z.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.collator import response_rows
from ..initial_policy import eval_mode
from ..model_io import response_token_logps
from ..telemetry import DOWN_TOLERANCE

PROBE_LOG_FILE = "probe_log.jsonl"
PROBE_BASELINE_FILE = "probe_baseline.pt"
PROBE_EXAMPLES_FILE = "probe_examples.jsonl"
PREFIX = "probe/"


@dataclass
class ProbeScores:
    """Per-token scores of every probe response, one row per response (`[R, T]`, scored tokens first).

    `pair` numbers the pairs: a pair's chosen (`sign` +1) and rejected (`sign` -1) rows share it.
    """

    logp: torch.Tensor
    lse: torch.Tensor
    mask: torch.Tensor
    sign: torch.Tensor
    pair: torch.Tensor

    @property
    def label_logit(self) -> torch.Tensor:
        return self.logp + self.lse

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in ("logp", "lse", "mask", "sign", "pair")}


def _pad(tensors: list[torch.Tensor], width: int, value=0) -> torch.Tensor:
    return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value) for t in tensors])


@torch.no_grad()
def score_probe(model, examples: list[dict], collator, batch_size: int, device, chunk_size: int | None = None,
                impl: str = "auto") -> ProbeScores:
    """Score `examples` (the plugin's example rows, pairs only) with `model`: per-token log p and log Z.

    Eval mode (every module's own flag restored afterwards) and no gradient, through the fused op, so the
    scores are those of the model's weights alone, whatever trainer holds them.
    """
    logps, lses, masks, signs, pairs = [], [], [], [], []
    with eval_mode(model):
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            if not all(example["is_pair"] for example in chunk):
                raise ValueError("the probe scores pairs only")
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collator(chunk).items()}
            logp, _, _, lse = response_token_logps(model, batch, chunk_size, impl=impl, with_lse=True)
            mask, logp, lse = response_rows(batch, logp, lse)
            logps.append(logp.float().cpu())
            lses.append(lse.float().cpu())
            masks.append(mask.cpu())
            signs.append(batch["sign"].cpu())
            pairs.append(batch["pair_ids"].cpu() + start)  # the collator numbers a batch's examples from 0
    width = max(t.shape[1] for t in logps)
    return ProbeScores(_pad(logps, width), _pad(lses, width), _pad(masks, width, False), torch.cat(signs),
                       torch.cat(pairs))


def _response_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, values, torch.zeros_like(values)).sum(1) / mask.sum(1).clamp(min=1)


def probe_metrics(now: ProbeScores, start: ProbeScores) -> dict[str, float]:
    """The probe's metrics at `now` against the initial policy's scores `start` (the same responses).

    - `probe/chosen`, `probe/rejected`: mean over responses of the per-token mean change of log p;
    - `probe/chosen_down_frac`, `probe/rejected_down_frac`: fraction of those whose mean log p fell (by more
      than `telemetry.DOWN_TOLERANCE`, float noise of two scorings);
    - `probe/accuracy`: fraction of pairs whose chosen response's summed log-ratio to the initial policy,
      sum_t (log p - log p_0), is strictly larger than the rejected one's (DPO's implicit reward, beta and
      reference = the initial policy, the same definition for every method); `probe/margin` its mean gap;
    - `probe/{chosen,rejected}_logit` and `_logZ`: per-token mean change of the label logit z_y and of the
      log-partition log Z (`_logit - _logZ` equals the log p change);
    - `probe/{chosen,rejected}_logp`: the current mean per-token log p itself.
    """
    if not (torch.equal(now.mask, start.mask) and torch.equal(now.sign, start.sign) and torch.equal(now.pair, start.pair)):
        raise ValueError("probe scores of different responses cannot be compared")
    mask, sign = now.mask, now.sign
    chosen, rejected = (sign > 0) & mask.any(1), (sign < 0) & mask.any(1)
    d_logp = _response_mean(now.logp - start.logp, mask)
    d_logit = _response_mean(now.label_logit - start.label_logit, mask)
    d_lse = _response_mean(now.lse - start.lse, mask)
    logp = _response_mean(now.logp, mask)

    def mean(values: torch.Tensor, rows: torch.Tensor) -> float:
        return float(values[rows].double().mean()) if rows.any() else float("nan")

    # Summed log-ratio per response, signed and added per pair: chosen minus rejected.
    ratio = torch.where(mask, now.logp - start.logp, torch.zeros_like(now.logp)).double().sum(1)
    pair_ids, index = torch.unique(now.pair, return_inverse=True)
    margin = torch.zeros(len(pair_ids), dtype=torch.float64).index_add_(0, index, ratio * sign.double())
    return {
        PREFIX + "chosen": mean(d_logp, chosen),
        PREFIX + "rejected": mean(d_logp, rejected),
        PREFIX + "chosen_down_frac": mean((d_logp < -DOWN_TOLERANCE).float(), chosen),
        PREFIX + "rejected_down_frac": mean((d_logp < -DOWN_TOLERANCE).float(), rejected),
        PREFIX + "accuracy": float((margin > 0).double().mean()),
        PREFIX + "margin": float(margin.mean()),
        PREFIX + "chosen_logit": mean(d_logit, chosen),
        PREFIX + "chosen_logZ": mean(d_lse, chosen),
        PREFIX + "rejected_logit": mean(d_logit, rejected),
        PREFIX + "rejected_logZ": mean(d_lse, rejected),
        PREFIX + "chosen_logp": mean(logp, chosen),
        PREFIX + "rejected_logp": mean(logp, rejected),
    }
