"""The Axolotl trainer for `rl: bnf` and `rl: asft`.

A training step runs the policy once over all responses of the micro-batch, takes the final hidden
states (never the full logits), and feeds them with the output embedding to the fused `token_logprobs`
op. BNF also needs the reference model's log-probs of the same tokens: with an adapter that is the base
model with the adapter disabled; in full fine-tuning a frozen copy of the initial policy made once at
start-up. ASFT is reference-free and holds no second model.

Metrics from every micro-batch are kept as (sum, count) and averaged exactly at each logging step, so
means over pairs, responses or tokens stay correct whatever the batch composition.
"""
from __future__ import annotations

import contextlib
import copy
from collections import defaultdict

import torch

from axolotl.core.trainers.base import AxolotlTrainer
from axolotl.utils.logging import get_logger

from .losses import asft_loss, bnf_loss
from .model_io import response_token_logps, unwrap_peft

LOG = get_logger(__name__)


class BNFTrainer(AxolotlTrainer):
    """AxolotlTrainer whose loss is BNF or ASFT on fused per-token log-probs."""

    tag_names = ["axolotl", "bnf"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.method = self.args.bnf_rl
        if self.method not in ("bnf", "asft"):
            raise ValueError(f"BNFTrainer needs bnf_rl to be 'bnf' or 'asft', got {self.method!r}")
        # The loss is already a per-micro-batch mean; the Trainer must average micro-batches, not re-weight.
        self.model_accepts_loss_kwargs = False
        self._metric_sums = {"train": defaultdict(float), "eval": defaultdict(float)}
        self._metric_counts = {"train": defaultdict(float), "eval": defaultdict(float)}
        self._head_checked = False
        self.ref_model = None
        if self.method == "bnf":
            self.ref_model = self._make_reference()

    # ----------------------------------------------------------------------------------- reference
    def _make_reference(self):
        if hasattr(unwrap_peft(self.model), "disable_adapter"):
            LOG.info("BNF reference: the base model with the adapter disabled (no second copy in memory)")
            return None
        LOG.info("BNF reference: a frozen copy of the initial policy")
        ref = copy.deepcopy(self.model).eval()
        ref.requires_grad_(False)
        return ref

    def _reference_context(self, model):
        if self.ref_model is not None:
            return self.ref_model, contextlib.nullcontext()
        return model, unwrap_peft(model).disable_adapter()

    # ----------------------------------------------------------------------------------- forward
    def _token_logps(self, model, batch, check_head: bool = False):
        self._head_checked = self._head_checked or check_head
        return response_token_logps(model, batch, self.args.bnf_loss_chunk_size, check_head=check_head)

    def _loss_and_metrics(self, model, batch):
        logp, neg_entropy, mask = self._token_logps(model, batch, check_head=not self._head_checked)
        if self.method == "asft":
            return asft_loss(
                logp,
                mask,
                batch["sign"],
                batch["pair_ids"],
                lam=self.args.asft_lambda,
                beta=self.args.asft_beta,
                sft_weight=self.args.asft_sft_weight,
            )
        ref_model, ctx = self._reference_context(model)
        with torch.no_grad(), ctx:
            ref_logp, _, _ = self._token_logps(ref_model, batch)
        return bnf_loss(
            logp, ref_logp, neg_entropy, mask, batch["sign"], batch["pair_ids"], length_norm=self.args.bnf_length_norm
        )

    # ----------------------------------------------------------------------------------- Trainer API
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, metrics = self._loss_and_metrics(model, inputs)
        self._accumulate(metrics, "train" if model.training else "eval")
        return (loss, {}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, metrics = self._loss_and_metrics(model, inputs)
        self._accumulate(metrics, "eval")
        return loss.detach(), None, None

    def _accumulate(self, metrics, split: str):
        for name, mean in metrics.items():
            count = metrics.counts[name]
            self._metric_sums[split][name] += float(mean * count)
            self._metric_counts[split][name] += float(count)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        split = "train" if "loss" in logs else "eval"
        prefix = "" if split == "train" else "eval_"
        sums, counts = self._metric_sums[split], self._metric_counts[split]
        names = sorted(sums)
        if names:
            totals = torch.tensor([[sums[n] for n in names], [counts[n] for n in names]], dtype=torch.float64)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                totals = totals.to(self.accelerator.device)
                torch.distributed.all_reduce(totals)
                totals = totals.cpu()
            for name, total, count in zip(names, totals[0].tolist(), totals[1].tolist()):
                if count > 0:
                    logs[prefix + name] = round(total / count, 6)
        sums.clear()
        counts.clear()
        super().log(logs, start_time)

