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
import os
from collections import defaultdict
from dataclasses import dataclass

import torch

from axolotl.core.trainers.base import AxolotlTrainer
from axolotl.utils.logging import get_logger

from .data.collator import ResponseBatchCollator, per_position, response_rows
from .losses import asft_loss, batch_normalizer, bnf_loss, bnf_response_scale
from .model_io import response_token_logps, unwrap, unwrap_peft
from .numerics import StepGuard
from .processes import launched_processes
from .telemetry import DisplacementMonitor, PhaseMemory, method_card, preflight, shift_metrics

LOG = get_logger(__name__)


@dataclass(frozen=True)
class LossSettings:
    """What `batch_loss` needs to know about the method (read from the training arguments)."""

    method: str
    length_norm: str = "sequence"
    lam: float = 1.0
    beta: float = 1.0
    sft_weight: float = 1.0
    chunk_size: int | None = None
    impl: str = "auto"
    # BNF: build the gradient in the forward pass (one logits pass, `kernels/single_pass.py`); False = the
    # two-pass op, recomputing the logits in backward. Same loss and gradient either way (tested).
    single_pass: bool = True

    def __post_init__(self):
        if self.method not in ("bnf", "asft"):
            raise ValueError(f"method must be 'bnf' or 'asft', got {self.method!r}")

    @classmethod
    def from_args(cls, args) -> "LossSettings":
        return cls(args.bnf_rl, args.bnf_length_norm, args.asft_lambda, args.asft_beta, args.asft_sft_weight,
                   args.bnf_loss_chunk_size, args.bnf_kernel_impl)


class DisabledAdapter:
    """The BNF reference under an adapter: the policy itself with its adapter switched off."""

    def __init__(self, model):
        self.model = model

    def context(self):
        return unwrap_peft(self.model).disable_adapter()


def batch_loss(model, batch, settings: LossSettings, reference=None, check_head: bool = False, normalizer=None):
    """(loss, metrics) of one collated batch (packed or not) under the configured method.

    `reference` (BNF only) is a frozen model, or a `DisabledAdapter` of the policy; its log-probs of the
    same tokens come from the same fused op under `no_grad`. `normalizer` replaces the batch's own n
    (pairs + unpaired responses), e.g. by the n of a whole optimiser step.
    """
    # The initial policy's log-probs: precomputed once (bnf_precompute_ref, or ASFT's shift metrics), or
    # BNF's live reference. The live reference is scored before the policy: when it is the policy itself with
    # its adapter disabled, a forward after the policy's could reshard (FSDP2) a head the policy's backward uses.
    if "ref_logps" in batch:
        start_token_logp = batch["ref_logps"]
    elif settings.method == "bnf":
        start_token_logp = _live_reference_token_logps(batch, settings, reference)
    else:
        start_token_logp = None
    bnf_grad = None
    if settings.method == "bnf" and settings.single_pass:
        mask = response_rows(batch)[0]
        scale = bnf_response_scale(mask, batch["sign"], batch["pair_ids"], settings.length_norm, normalizer)
        bnf_grad = (start_token_logp, per_position(batch, scale))
    logp, neg_entropy, _ = response_token_logps(model, batch, settings.chunk_size, check_head=check_head,
                                                impl=settings.impl, bnf_grad=bnf_grad)
    mask, logp, neg_entropy = response_rows(batch, logp, neg_entropy)
    start_logp = response_rows(batch, start_token_logp)[1] if start_token_logp is not None else None
    if settings.method == "asft":
        loss, metrics = asft_loss(logp, mask, batch["sign"], batch["pair_ids"], lam=settings.lam, beta=settings.beta,
                                  sft_weight=settings.sft_weight, normalizer=normalizer)
    else:
        loss, metrics = bnf_loss(logp, start_logp, neg_entropy, mask, batch["sign"], batch["pair_ids"],
                                 length_norm=settings.length_norm, normalizer=normalizer)
    if start_logp is not None:
        metrics.merge(shift_metrics(logp, start_logp, mask, batch["sign"]))
    return loss, metrics


def _live_reference_token_logps(batch, settings: LossSettings, reference) -> torch.Tensor:
    """The reference's per-position label log-probs `[rows, T]`, from the same fused op, without gradient."""
    if reference is None:
        raise ValueError("BNF needs a reference model (or an adapter to disable)")
    if isinstance(reference, DisabledAdapter):
        ref_model, ctx = reference.model, reference.context()
    else:
        ref_model, ctx = reference, contextlib.nullcontext()
    with torch.no_grad(), ctx:
        return response_token_logps(ref_model, batch, settings.chunk_size, impl=settings.impl)[0]


class BNFTrainer(AxolotlTrainer):
    """AxolotlTrainer whose loss is BNF or ASFT on fused per-token log-probs."""

    tag_names = ["axolotl", "bnf"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        launched = launched_processes()
        if launched > 1 and self.args.world_size != launched:
            # The processes would each train alone on the same data; `processes.join_cpu_process_group`
            # exists to prevent this on CPU, so reaching here means the launch escaped it.
            raise RuntimeError(
                f"{launched} processes were launched but the Trainer runs as {self.args.world_size}: they would "
                f"train independently and silently (accelerate state: {self.accelerator.distributed_type}). "
                "Launch through `axolotl train --launcher torchrun` or `accelerate launch` (with `--cpu` on a "
                "machine without GPUs), or train with one process."
            )
        self.settings = LossSettings.from_args(self.args)
        self.method = self.settings.method
        # The loss divides by the n of the whole optimiser step, which `_get_num_items_in_batch` provides:
        # the Trainer must then neither divide by the accumulation steps nor re-weight micro-batches.
        self.model_accepts_loss_kwargs = True
        self._metric_sums = {"train": defaultdict(float), "eval": defaultdict(float)}
        self._metric_counts = {"train": defaultdict(float), "eval": defaultdict(float)}
        self._head_checked = False
        self.guard = StepGuard(self.args.bnf_max_bad_steps, check_gradients=not self.args.fp16)
        self.ref_model = None
        self.precomputed_reference = bool(getattr(self.args, "bnf_precompute_ref", False))
        if self.method == "bnf" and not self.precomputed_reference:
            self.ref_model = self._make_reference()
        self.displacement = DisplacementMonitor(self.args.bnf_displacement_patience)
        self.phase_memory = PhaseMemory(self.args.device)
        self._preflight = self._preflight_bytes()
        if self.is_world_process_zero():
            LOG.info("\n%s\n%s", method_card(self.settings, self._reference_mode(), self._shift_metrics_on(),
                                               bool(self.args.sample_packing)), self._preflight_text())

    # ----------------------------------------------------------------------------------- reference
    def _make_reference(self):
        if hasattr(unwrap_peft(self.model), "disable_adapter"):
            LOG.info("BNF reference: the base model with the adapter disabled (no second copy in memory)")
            return None
        LOG.info("BNF reference: a frozen copy of the initial policy")
        ref = copy.deepcopy(self.model).eval()
        ref.requires_grad_(False)
        return ref

    def _reference_mode(self) -> str:
        if self.method == "asft":
            return "none"
        if self.precomputed_reference:
            return "precomputed once before training (no reference model held)"
        if self.ref_model is None:
            return "the base model with the adapter disabled"
        return "a frozen copy of the initial policy"

    def _shift_metrics_on(self) -> bool:
        return self.method == "bnf" or bool(self.args.bnf_shift_metrics)

    def _preflight_bytes(self) -> dict[str, int]:
        # Shape and dtype only: a sharded (DTensor) weight reports its global shape, and is not gathered.
        weight = unwrap(self.model).get_output_embeddings().weight
        tokens = self.args.per_device_train_batch_size * 2 * self.args.max_seq_length
        return preflight(tokens, weight.shape[0], weight.dtype,
                         with_reference=self.method == "bnf" and not self.precomputed_reference,
                         chunk_size=self.settings.chunk_size)

    def _preflight_text(self) -> str:
        p = self._preflight
        return (f"memory pre-flight per micro-batch (up to {self.args.per_device_train_batch_size} pairs x "
                f"{self.args.max_seq_length} tokens): full logits would take "
                f"{p['memory/preflight_full_logits_bytes'] / 2**30:.2f} GiB; the fused op holds one block of "
                f"{p['memory/preflight_chunk_rows']} rows, {p['memory/preflight_fused_workspace_bytes'] / 2**20:.0f} MiB")

    def attach_reference_logps(self, cache_dir) -> None:
        """Score every train / eval response once with the initial policy (BNF's precomputed reference, or
        ASFT's shift-metric baseline)."""
        from .reference import with_reference_logps

        collator = ResponseBatchCollator(self.processing_class)
        options = dict(batch_size=self.args.per_device_eval_batch_size, device=self.args.device, cache_dir=cache_dir,
                       chunk_size=self.settings.chunk_size, impl=self.settings.impl)
        # One process per node scores and writes the cache; the others wait for it and load it (no duplicate
        # work, no two processes writing one directory).
        with self.args.main_process_first(local=True, desc="scoring the data with the initial policy"):
            self.train_dataset = with_reference_logps(self.train_dataset, self.model, collator, split="train",
                                                      **options)
            if isinstance(self.eval_dataset, dict):
                self.eval_dataset = {k: with_reference_logps(v, self.model, collator, split=f"eval/{k}", **options)
                                     for k, v in self.eval_dataset.items()}
            elif self.eval_dataset is not None:
                self.eval_dataset = with_reference_logps(self.eval_dataset, self.model, collator, split="eval",
                                                         **options)

    def _get_num_items_in_batch(self, batch_samples, device):
        """n of the optimiser step: pairs + unpaired responses over all its micro-batches (and processes).

        METHODS.md normalises the loss by the batch's n; the batch an update is computed from is the whole
        step, so micro-batch 1 x accumulation 4 and micro-batch 4 x accumulation 1 give the same update.
        """
        if not batch_samples or "pair_ids" not in batch_samples[0]:
            return None
        n = sum(batch_normalizer(b["pair_ids"], b["sign"].shape[0]).float().cpu() for b in batch_samples)
        n = torch.as_tensor(n, dtype=torch.float32, device=device).reshape(1)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            n = self.accelerator.gather(n).sum().reshape(1)
        return n[0]

    def _loss_and_metrics(self, model, batch, normalizer=None):
        check_head = not self._head_checked
        self._head_checked = True
        reference = None
        if self.method == "bnf" and "ref_logps" not in batch:
            if self.precomputed_reference:
                raise RuntimeError("bnf_precompute_ref is set but the batch has no reference log-probs")
            reference = self.ref_model if self.ref_model is not None else DisabledAdapter(model)
        return batch_loss(model, batch, self.settings, reference=reference, check_head=check_head, normalizer=normalizer)

    # ----------------------------------------------------------------------------------- Trainer API
    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        self.guard.wrap(optimizer, self.model.parameters, distributed_any=self._any_process)
        return optimizer

    def _any_process(self, flag: bool) -> bool:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return flag
        value = torch.tensor([float(flag)], device=self.accelerator.device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return bool(value.item())

    def training_step(self, model, inputs, num_items_in_batch=None):
        example_ids = inputs.get("example_ids")
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.phase_memory.end("backward")
        self.guard.observe(loss, example_ids)
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        normalizer = num_items_in_batch if model.training else None
        if model.training:
            self.phase_memory.start()
        loss, metrics = self._loss_and_metrics(model, inputs, normalizer=normalizer)
        if model.training:
            self.phase_memory.end("forward")  # policy (and reference) forward, loss
            self.phase_memory.start()
        if normalizer is not None and self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            # n counts every process's units, and DDP averages gradients over processes: undo that mean.
            loss = loss * self.accelerator.num_processes
        self._accumulate(metrics, "train" if model.training else "eval")
        return (loss, {}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, metrics = self._loss_and_metrics(model, inputs)
        self._accumulate(metrics, "eval")
        return loss.detach(), None, None

    def _accumulate(self, metrics, split: str):
        """Add a micro-batch's sums and counts (device tensors: no host sync until logging)."""
        for name, mean in metrics.items():
            count = metrics.counts[name].detach().double()
            self._metric_sums[split][name] = self._metric_sums[split][name] + mean.detach().double() * count
            self._metric_counts[split][name] = self._metric_counts[split][name] + count

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        split = "train" if "loss" in logs else "eval"
        prefix = "" if split == "train" else "eval_"
        sums, counts = self._metric_sums[split], self._metric_counts[split]
        names = sorted(sums)
        if names:
            device = self.accelerator.device
            totals = torch.stack([torch.as_tensor(x, dtype=torch.float64, device=device)
                                  for x in [sums[n] for n in names] + [counts[n] for n in names]]).view(2, -1)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(totals)
            totals = totals.cpu()
            for name, total, count in zip(names, totals[0].tolist(), totals[1].tolist()):
                if count > 0:
                    logs[prefix + name] = round(total / count, 6)
        sums.clear()
        counts.clear()
        if split == "train" and "loss" in logs:
            logs["bnf/skipped_steps"] = self.guard.skipped
            logs.update(self.phase_memory.metrics())
            if self._preflight:
                logs.update(self._preflight)
                self._preflight = {}
            if "shift/chosen" in logs and (warning := self.displacement.update(logs["shift/chosen"])):
                LOG.warning(warning)
        super().log(logs, start_time)

