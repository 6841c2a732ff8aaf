"""The Axolotl trainer for `rl: bnf` and `rl: asft`.

A training step runs the policy once over all responses of the micro-batch, takes the final hidden
states (never the full logits), and feeds them with the output embedding to the fused `token_logprobs`
op. BNF also needs the initial policy's log-probs of the same tokens (`initial_policy`: a frozen copy, the
policy with a fresh adapter disabled, or with a frozen snapshot of a continued adapter), or reads them
precomputed from the batch. ASFT is reference-free and holds no second model.

Metrics from every micro-batch are kept as (sum, count) and averaged exactly at each logging step, so
means over pairs, responses or tokens stay correct whatever the batch composition.
"""
from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass

import torch

from axolotl.core.trainers.base import AxolotlTrainer
from axolotl.utils.logging import get_logger

from .bnf_grad_rule import BNF_GRAD_RULE
from .data.collator import ResponseBatchCollator, per_position, response_rows
from .losses import asft_loss, batch_normalizer, bnf_loss, bnf_response_scale
from .initial_policy import DisabledAdapter, eval_mode, live_reference  # noqa: F401 (DisabledAdapter: public)
from .kernels import resolve_impl
from .model_io import response_token_logps, router_aux_coef, unwrap
from .numerics import StepGuard, StepGuardCallback
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


def batch_loss(model, batch, settings: LossSettings, reference=None, check_head: bool = False, normalizer=None):
    """(loss, metrics) of one collated batch (packed or not) under the configured method.

    `reference` (BNF only) is a frozen model or one of `initial_policy`'s references (a frozen copy, the policy
    with its adapter disabled, or with a snapshot of its starting adapter); its log-probs of the same tokens come from the
    same fused op under `no_grad`, in eval mode. `normalizer` replaces the batch's own n
    (pairs + unpaired responses), e.g. by the n of a whole optimiser step.

    A mixture-of-experts policy whose config sets `output_router_logits` also returns its router load-balancing
    loss from this forward (never the reference's or any scoring pass's); `router_aux_loss_coef * aux_loss`
    is added to the loss and `aux_loss` (unscaled) to the metrics. See `_add_router_aux`.
    """
    # The initial policy's log-probs: precomputed once (bnf_precompute_ref, or ASFT's shift metrics), or
    # BNF's live reference. The live reference is scored before the policy: when it is the policy itself with
    # its adapter disabled, a forward after the policy's could reshard (FSDP2) a head the policy's backward uses.
    if "ref_logps" in batch:
        start_token_logp = batch["ref_logps"]
    elif settings.method == "bnf":
        start_token_logp = _live_reference_token_logps(model, batch, settings, reference)
    else:
        start_token_logp = None
    grad_rule = grad_inputs = None
    if settings.method == "bnf" and settings.single_pass:
        mask = response_rows(batch)[0]
        scale = bnf_response_scale(mask, batch["sign"], batch["pair_ids"], settings.length_norm, normalizer)
        grad_rule, grad_inputs = BNF_GRAD_RULE, (start_token_logp, per_position(batch, scale))
    aux_coef = router_aux_coef(model)
    logp, neg_entropy, _, *aux = response_token_logps(model, batch, settings.chunk_size, check_head=check_head,
                                                      impl=settings.impl, grad_rule=grad_rule,
                                                      grad_inputs=grad_inputs, router_aux=aux_coef is not None)
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
    if aux_coef is not None:
        loss = _add_router_aux(loss, metrics, aux[0], aux_coef, batch, normalizer)
    return loss, metrics


def _add_router_aux(loss, metrics, aux_loss, coef: float, batch, normalizer):
    """`loss + coef * aux_loss` for this micro-batch, and `aux_loss` (unscaled) in the metrics.

    The aux loss is a function of the whole micro-batch's routing (as in TRL's DPO trainer, which adds it per
    micro-batch). Where the method loss is normalised by the n of the whole optimiser step, the aux term is
    weighted by the micro-batch's share of that n: over an optimiser step (and over processes, where the
    trainer's loss scaling then applies alike) it adds `coef *` the n-weighted mean of the micro-batches' aux
    losses, i.e. the mean for micro-batches of equal n, whatever the accumulation. It does not depend on the
    label log-probs, so BNF's single-pass op still receives exactly its predicted upstream gradient.
    The metric is averaged with the same weights (count = the micro-batch's n).
    """
    n_batch = batch_normalizer(batch["pair_ids"], batch["sign"].shape[0]).clamp(min=1)
    aux_loss = aux_loss.to(loss.device)
    weight = 1.0 if normalizer is None else n_batch.to(loss.device) / torch.as_tensor(
        normalizer, dtype=torch.float32, device=loss.device)
    metrics["aux_loss"] = aux_loss.detach()
    metrics.counts["aux_loss"] = n_batch.detach()
    return loss + (coef * weight) * aux_loss


def _live_reference_token_logps(policy, batch, settings: LossSettings, reference) -> torch.Tensor:
    """The reference's per-position label log-probs `[rows, T]`, from the same fused op, without gradient."""
    if reference is None:
        raise ValueError("BNF needs a reference (see initial_policy.live_reference)")
    scoring = eval_mode(reference) if isinstance(reference, torch.nn.Module) else reference.scoring(policy)
    with torch.no_grad(), scoring as ref_model:
        return response_token_logps(ref_model, batch, settings.chunk_size, impl=settings.impl)[0]


def output_vocab_size(model) -> int:
    """Rows of the model's output embedding, counted globally: a FSDP2 DTensor's `.shape` is global, and a
    ZeRO-3 partitioned weight is an empty local tensor whose full shape is `ds_shape`."""
    weight = unwrap(model).get_output_embeddings().weight
    return int(getattr(weight, "ds_shape", weight.shape)[0])


def leading_examples(batch: dict[str, torch.Tensor], keep: int) -> dict[str, torch.Tensor]:
    """The first `keep` examples of an unpacked collated batch, as the collator would have batched them.

    Rows are responses in example order; a pair's two responses share a pair id, any other example has
    one response. So the examples' responses are a prefix of the rows (trailing padding columns are harmless).
    """
    pair_ids = batch["pair_ids"]
    starts = torch.ones_like(pair_ids, dtype=torch.bool)
    starts[1:] = (pair_ids[1:] < 0) | (pair_ids[1:] != pair_ids[:-1])
    example = starts.cumsum(0) - 1
    if int(example[-1]) + 1 != batch["example_ids"].numel():
        raise RuntimeError("cannot tell which responses belong to which example in this batch")
    rows, width = batch["labels"].shape
    kept_rows = int((example < keep).sum())
    out = {}
    for key, value in batch.items():
        if key == "example_ids":
            out[key] = value[:keep]
        elif key == "scored_index":
            out[key] = value[value < kept_rows * width]
        elif torch.is_tensor(value) and value.dim() and value.shape[0] == rows:
            out[key] = value[:kept_rows]
        else:
            out[key] = value
    return out


class BNFTrainer(AxolotlTrainer):
    """AxolotlTrainer whose loss is BNF or ASFT on fused per-token log-probs."""

    tag_names = ["axolotl", "bnf"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Token ids are checked against the output embedding's rows on the CPU, in the collators: the fused
        # op does not range-check the labels it indexes the embedding with.
        self.vocab_size = output_vocab_size(self.model)
        for collator in (self.data_collator, getattr(self, "eval_data_collator", None)):
            if isinstance(collator, ResponseBatchCollator):
                collator.vocab_size = self.vocab_size
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
        # Training examples processed (all processes), logged as a running total: one pass over the data
        # per epoch is then visible in the logs, whatever the launch.
        self._examples_since_log, self._examples_seen = 0, 0
        # A loss scaler (fp16 on an accelerator) skips steps with non-finite gradients itself; fp16 on the CPU
        # has none, so there the guard checks them.
        self.guard = StepGuard(self.args.bnf_max_bad_steps, check_gradients=self.accelerator.scaler is None)
        self.add_callback(StepGuardCallback(self.guard))
        self.reference = None
        self.precomputed_reference = bool(getattr(self.args, "bnf_precompute_ref", False))
        if self.method == "bnf" and not self.precomputed_reference:
            self.reference = live_reference(self.model)
        self.displacement = DisplacementMonitor(self.args.bnf_displacement_patience)
        self.phase_memory = PhaseMemory(self.args.device)
        self._preflight = self._preflight_bytes()
        aux_coef = router_aux_coef(self.model)  # fails here, not at step 1, when the config lacks the coefficient
        if self.is_world_process_zero():
            LOG.info("\n%s\n%s", method_card(self.settings, self._reference_mode(), self._shift_metrics_on(),
                                               bool(self.args.sample_packing)), self._preflight_text())
            self._log_router_aux(aux_coef)

    def _log_router_aux(self, aux_coef: float | None) -> None:
        if aux_coef is not None:
            LOG.info("router load-balancing loss: on (output_router_logits), loss += %g * aux_loss of the policy's "
                     "forward, logged as aux_loss", aux_coef)
            return
        config = unwrap(self.model).config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        if getattr(text_config, "output_router_logits", None) is False:
            LOG.info("router load-balancing loss: off (this mixture-of-experts model's config leaves "
                     "output_router_logits unset); `model_config: {output_router_logits: true}` trains it")

    # ----------------------------------------------------------------------------------- reference
    def _reference_mode(self) -> str:
        if self.method == "asft":
            return "none"
        if self.precomputed_reference:
            return "precomputed once before training (no reference model held)"
        return self.reference.description

    def _shift_metrics_on(self) -> str:
        if self.method == "bnf":
            return "on"
        if not self.args.bnf_shift_metrics:
            return "off"
        if self.args.asft_shift_on_train:
            return "train and eval (baseline scored once)"
        return "eval only (baseline scored once; asft_shift_on_train adds the training set)"

    def _preflight_bytes(self) -> dict[str, int]:
        # Shape and dtype only: a sharded (DTensor) weight reports its global shape, and is not gathered.
        weight = unwrap(self.model).get_output_embeddings().weight
        tokens = self.args.per_device_train_batch_size * 2 * self.args.max_seq_length
        device = torch.device(self.args.device)
        return preflight(tokens, weight.shape[0], weight.dtype,
                         with_reference=self.method == "bnf" and not self.precomputed_reference,
                         chunk_size=self.settings.chunk_size, impl=resolve_impl(self.settings.impl, device),
                         device_type=device.type)

    def _preflight_text(self) -> str:
        p = self._preflight
        return (f"memory pre-flight per micro-batch (up to {self.args.per_device_train_batch_size} pairs x "
                f"{self.args.max_seq_length} tokens): full logits would take "
                f"{p['memory/preflight_full_logits_bytes'] / 2**30:.2f} GiB; the fused op holds one block of "
                f"{p['memory/preflight_chunk_rows']} rows, {p['memory/preflight_fused_workspace_bytes'] / 2**20:.0f} MiB")

    def attach_reference_logps(self, cache_dir) -> None:
        """Score the data once with the initial policy, split across all processes.

        BNF with `bnf_precompute_ref`: train and eval (the loss needs the reference everywhere). ASFT's shift
        baseline: the eval set by default, the training set too only with `asft_shift_on_train` (one
        forward pass over the training data, about a third of an epoch's compute, before step 1).
        """
        from .reference import with_reference_logps

        train = self.precomputed_reference or (self.method == "asft" and self.args.asft_shift_on_train)
        evaluate = self.precomputed_reference or (self.method == "asft" and self.args.bnf_shift_metrics)
        collator = ResponseBatchCollator(self.processing_class, vocab_size=self.vocab_size)
        options = dict(batch_size=self.args.per_device_eval_batch_size, device=self.args.device, cache_dir=cache_dir,
                       chunk_size=self.settings.chunk_size, impl=self.settings.impl)
        with self.compute_loss_context_manager():
            if train:
                self.train_dataset = with_reference_logps(self.train_dataset, self.model, collator, split="train",
                                                          **options)
            if not evaluate:
                return
            if isinstance(self.eval_dataset, dict):
                self.eval_dataset = {k: with_reference_logps(v, self.model, collator, split=f"eval/{k}", **options)
                                     for k, v in self.eval_dataset.items()}
            elif self.eval_dataset is not None:
                self.eval_dataset = with_reference_logps(self.eval_dataset, self.model, collator, split="eval",
                                                         **options)

    # ----------------------------------------------------------------------------------- sample packing
    def _packing_sampler(self, dataset, shuffle: bool):
        from .data.packing import EpochBins, packing_shape

        capacity, bins_per_batch = packing_shape(self.args.per_device_train_batch_size, self.args.max_seq_length,
                                                 bool(self.args.multipack_real_batches))
        return EpochBins(dataset["length"], capacity, bins_per_batch, self.args.world_size, seed=self.args.seed,
                         shuffle=shuffle, group_size=self.args.sample_packing_group_size or 100_000,
                         bin_size=self.args.sample_packing_bin_size or 200)

    def _get_train_sampler(self, train_dataset=None):
        """With packing, bins that keep every example every epoch (`data.packing`), not Axolotl's multipack."""
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.sample_packing and dataset is not None and "length" in dataset.column_names:
            return self._packing_sampler(dataset, shuffle=not self.args.curriculum_sampling)
        return super()._get_train_sampler(train_dataset)

    def _get_eval_sampler(self, eval_dataset):
        if (self.args.sample_packing and self.args.eval_sample_packing is not False and eval_dataset is not None
                and "length" in eval_dataset.column_names):
            return self._packing_sampler(eval_dataset, shuffle=False)
        return super()._get_eval_sampler(eval_dataset)

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
            reference = self.reference
        return batch_loss(model, batch, self.settings, reference=reference, check_head=check_head, normalizer=normalizer)

    # ----------------------------------------------------------------------------------- Trainer API
    def autocast_smart_context_manager(self, cache_enabled: bool | None = True):
        """The run's mixed precision over the whole loss, not only the prepared policy's forward.

        accelerate puts autocast around the prepared model's `forward` alone; the frozen reference copy
        is another module, and under bf16 / fp16 Axolotl loads half-precision layers next to fp32
        embeddings, which only run under autocast.
        """
        return self.accelerator.autocast()

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
        if example_ids is not None:
            self._examples_since_log += example_ids.numel()
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.phase_memory.end("backward")
        self.guard.observe(loss, example_ids)
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        normalizer = num_items_in_batch if model.training else None
        if model.training:
            self._count_tokens(inputs)
        loss, metrics = self._loss_and_metrics(model, inputs, normalizer=normalizer)
        if model.training:
            self.phase_memory.end("forward")  # policy (and reference) forward, loss
        if normalizer is not None and self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            # n counts every process's units, and DDP averages gradients over processes: undo that mean.
            loss = loss * self.accelerator.num_processes
        self._accumulate(metrics, "train" if model.training else "eval")
        return (loss, {}) if return_outputs else loss

    def _count_tokens(self, inputs) -> None:
        """Axolotl's `tokens/*` metrics (`include_tkps`, on by default): AxolotlTrainer counts a batch's
        trainable (label != -100, here the scored response tokens) and total token slots in its own
        `compute_loss`, which this trainer replaces, and reads the counts in `log`."""
        if not getattr(self.args, "include_tkps", False):
            return
        labels = inputs["labels"]
        counts = torch.stack([(labels != -100).sum(), torch.tensor(labels.numel(), device=labels.device)])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
        counts = counts.cpu()
        tokens = getattr(self.state, "tokens", None) or {"trainable": torch.zeros(1), "total": torch.zeros(1)}
        self.state.tokens = {"trainable": tokens["trainable"] + counts[0], "total": tokens["total"] + counts[1]}

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Eval loss and metrics of the batch's real examples; `eval_loss` is then logged from the plugin's
        own sums (the loss over the eval set, each batch weighted by its n), like every other eval metric."""
        inputs = self._prepare_inputs(inputs)
        real = self._real_eval_examples(inputs)
        scored = inputs if real is None or real == 0 else leading_examples(inputs, real)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, metrics = self._loss_and_metrics(model, scored)
        if real != 0:  # a batch of repeats only still runs its forward: sharded models need every process there
            metrics["loss"] = loss.detach().float()
            metrics.counts["loss"] = batch_normalizer(scored["pair_ids"], scored["sign"].shape[0]).clamp(min=1)
            self._accumulate(metrics, "eval")
        return loss.detach(), None, None

    def _real_eval_examples(self, inputs) -> int | None:
        """How many leading examples of this eval batch are real (None: all of them).

        With `even_batches` (accelerate's default) the last round of an eval set that does not fill every
        process's batch is completed with the set's first examples again, so that every process runs the
        same number of batches. `gather_for_metrics` drops those repeats by `gradient_state.remainder`, the
        real examples of that round in process order; the same count tells each process which of its own
        examples are real. Only unpacked batches are completed this way (Axolotl turns `even_batches` off
        under sample packing).
        """
        state = self.accelerator.gradient_state
        loader = state.active_dataloader
        sampler = getattr(loader, "batch_sampler", None)
        if (self.accelerator.num_processes == 1 or not state.end_of_dataloader or state.remainder <= 0
                or not getattr(sampler, "even_batches", False) or "attention_mask" not in inputs):
            return None
        per_process = loader.total_batch_size // self.accelerator.num_processes
        examples = inputs["example_ids"].numel()
        real = state.remainder - self.accelerator.process_index * per_process
        return None if real >= examples else max(real, 0)

    def _count_examples_seen(self) -> int:
        new = torch.tensor([self._examples_since_log], dtype=torch.int64, device=self.accelerator.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(new)
        self._examples_since_log = 0
        if not self._examples_seen:  # a resumed run continues the total its checkpoint logged
            logged = [r["bnf/examples_seen"] for r in self.state.log_history if "bnf/examples_seen" in r]
            self._examples_seen = int(logged[-1]) if logged else 0
        self._examples_seen += int(new.item())
        return self._examples_seen

    def _accumulate(self, metrics, split: str):
        """Add a micro-batch's sums and counts (device tensors: no host sync until logging)."""
        for name, mean in metrics.items():
            count = metrics.counts[name].detach().double()
            self._metric_sums[split][name] = self._metric_sums[split][name] + mean.detach().double() * count
            self._metric_counts[split][name] = self._metric_counts[split][name] + count

    @staticmethod
    def _names_on_every_process(names: list[str], logs: dict) -> list[str]:
        """The union of every process's metric names, in one order: the all_reduce in `log` then has the
        same size and layout everywhere, also when a process saw no batch since the last log (no names) or
        batches of another kind. One all_gather_object per log call, not per step (2 CPU processes over gloo
        on a busy 2-core machine: 9 ms, against 3 ms for the all_reduce itself); a fixed list of names would
        save that but silently drop any metric it does not list.

        Only logs that every process makes take part: the Trainer's training logs and evaluations, which
        carry a loss. A log made by the main process alone (some Axolotl callbacks) reduces nothing.
        """
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return names
        if not any(key == "loss" or key.endswith("_loss") for key in logs):
            return []
        gathered: list[list[str] | None] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, names)
        return sorted(set().union(*gathered))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        split = "train" if "loss" in logs else "eval"
        prefix = "" if split == "train" else "eval_"
        sums, counts = self._metric_sums[split], self._metric_counts[split]
        names = self._names_on_every_process(sorted(sums), logs)
        if names:
            device = self.accelerator.device
            totals = torch.stack([torch.as_tensor(x, dtype=torch.float64, device=device)
                                  for x in [sums.get(n, 0.0) for n in names] + [counts.get(n, 0.0) for n in names]]
                                 ).view(2, -1)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(totals)
            totals = totals.cpu()
            for name, total, count in zip(names, totals[0].tolist(), totals[1].tolist()):
                if count > 0 and (name != "loss" or prefix + name in logs):  # an eval_loss replaces the Trainer's
                    logs[prefix + name] = round(total / count, 6)
        sums.clear()
        counts.clear()
        if split == "train" and "loss" in logs:
            logs["bnf/skipped_steps"] = self.guard.skipped
            logs["bnf/examples_seen"] = self._count_examples_seen()
            logs.update(self.phase_memory.metrics())
            if self._preflight:
                logs.update(self._preflight)
                self._preflight = {}
            if "shift/chosen" in logs and (warning := self.displacement.update(logs["shift/chosen"])):
                LOG.warning(warning)
        super().log(logs, start_time)

