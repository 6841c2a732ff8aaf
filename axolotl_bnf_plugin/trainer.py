"""The Axolotl trainer for the plugin's methods (`rl: bnf`, `rl: asft`, any registered `methods.Method`).

The trainer runs a method without knowing which: the loss of a batch is `step_loss.batch_loss`, which asks
the method object. What is left here is the wiring into the Hugging Face / Axolotl Trainer: the settings
(read back from the training arguments, `args.plugin_settings`), the initial policy's log-probs (a live
reference for a method that `needs_ref_logps`, or scored once before training), the step guard
(`numerics`), the exact metric means (`metric_sums`), the packing sampler, and the memory pre-flight.
"""
from __future__ import annotations

import torch

from axolotl.core.trainers.base import AxolotlTrainer
from axolotl.utils.logging import get_logger

from . import initial_policy, numerics, reference
from .args import plugin_settings
from .callbacks import OnTrainBegin
from .data.collator import NORMALIZER_UNITS, REF_LOGPS, ResponseBatchCollator, leading_examples
from .initial_policy import DisabledAdapter, live_reference  # noqa: F401 (DisabledAdapter: public)
from .kernels import raise_pending, resolve_impl
from .kernels.segments import SPLIT
from .methods import batch_normalizer
from .metric_sums import MetricSums
from .model_io import (head_shape, keep_head_gathered_through_backward, local_bytes, resharded_after_each_forward,
                       router_aux_coef, unwrap)
from .numerics import StepGuard, StepGuardCallback
from .processes import launched_processes
from .step_loss import LossSettings, batch_loss
from .telemetry import DisplacementMonitor, PhaseMemory, method_card, preflight, preflight_text

LOG = get_logger(__name__)
# These modules also run without Axolotl, on standard-library loggers. In an Axolotl run they log through
# Axolotl's logger like the rest of the plugin: their INFO lines shown, from the main process only.
for _module in (initial_policy, numerics, reference):
    _module.LOG = get_logger(_module.__name__)

# Metrics the trainer itself logs at every training log, whatever the method (the method's own come from
# its loss). "examples_seen" is read back from the log history when a run resumes; the name before 0.2 too.
SKIPPED_STEPS, EXAMPLES_SEEN = "skipped_steps", "examples_seen"
# A rule over whole responses (ASFT's): the share of the run's scored rows whose response was longer than a
# block of the fused op and took its two-pass op (logits again in backward).
TWO_PASS_SHARE = "fused/two_pass_share"
_EXAMPLES_SEEN_BEFORE = "bnf/examples_seen"


def output_vocab_size(model) -> int:
    """Rows of the model's output embedding, counted globally: a FSDP2 DTensor's `.shape` is global, and a
    ZeRO-3 partitioned weight is an empty local tensor whose full shape is `ds_shape`."""
    weight = unwrap(model).get_output_embeddings().weight
    return int(getattr(weight, "ds_shape", weight.shape)[0])


class BNFTrainer(AxolotlTrainer):
    """AxolotlTrainer whose loss is the configured method's, on fused per-token log-probs."""

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
        self.plugin_config = plugin_settings(self.args)
        self.settings = LossSettings.from_config(self.plugin_config)
        self.method = self.settings.method
        # The loss divides by the n of the whole optimiser step, which `_get_num_items_in_batch` provides:
        # the Trainer must then neither divide by the accumulation steps nor re-weight micro-batches.
        self.model_accepts_loss_kwargs = True
        self.metric_sums = MetricSums()
        self._head_checked = False
        # Training examples processed (all processes), logged as a running total: one pass over the data
        # per epoch is then visible in the logs, whatever the launch.
        self._examples_since_log, self._examples_seen = 0, 0
        self._scored_since_log, self._slots_since_log = None, 0  # Axolotl's tokens/*, reduced at each log
        # A loss scaler (fp16 on an accelerator) skips steps with non-finite gradients itself; fp16 on the CPU
        # has none, so there the guard checks them.
        self.guard = StepGuard(self.plugin_config.bnf_max_bad_steps, check_gradients=self.accelerator.scaler is None)
        self.add_callback(StepGuardCallback(self.guard, on_step_decided=self._report_skipped_step))
        self.add_callback(OnTrainBegin(self._on_train_begin))
        if not self.is_deepspeed_enabled:  # DeepSpeed's norm comes after its step, too late for the guard
            self.accelerator.clip_grad_norm_ = self._note_clipped_norm(self.accelerator.clip_grad_norm_)
        self.reference = None
        self.initial_scores, self._unscored = None, []  # the initial policy's scores (`attach_reference_logps`)
        self.precomputed_reference = self.method.needs_ref_logps and self.plugin_config.bnf_precompute_ref
        if self.method.needs_ref_logps and not self.precomputed_reference:
            fsdp = self.accelerator.state.fsdp_plugin if self.is_fsdp_enabled else None
            self.reference = live_reference(
                self.model, shard=self._shard_like_policy if fsdp is not None else None,
                weights_on_meta=bool(fsdp and fsdp.cpu_ram_efficient_loading and not self.accelerator.is_main_process),
                make_copy=self._partitioned_copy if self._zero3() else None)
        self.displacement = DisplacementMonitor(self.plugin_config.bnf_displacement_patience)
        self.phase_memory = PhaseMemory(self.args.device)
        self._preflight = self._preflight_bytes()
        aux_coef = router_aux_coef(self.model)  # fails here, not at step 1, when the config lacks the coefficient
        if self.is_world_process_zero():
            LOG.info("\n%s\n%s", method_card(self.settings, self._reference_mode(), self._shift_metrics_on(),
                                               bool(self.args.sample_packing)),
                     preflight_text(self._preflight, self.args.per_device_train_batch_size, self.args.max_seq_length))
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
    def _shard_like_policy(self, frozen: torch.nn.Module) -> torch.nn.Module:
        """FSDP2: BNF's frozen reference prepared by the engine that prepared the policy.

        accelerate's FSDP2 prepare (Axolotl's patch of it, where Axolotl installed one) shards every wrapped
        layer and the root with the run's `fsdp_config` (but always resharding after the forward), and with
        `cpu_ram_efficient_loading` broadcasts the first process's weights. Each process then holds a shard of
        the reference, as of the policy, and a reference forward gathers one layer at a time.
        """
        import accelerate.accelerator

        plugin = self.accelerator.state.fsdp_plugin
        if plugin.fsdp_version != 2:
            raise NotImplementedError("BNF's frozen reference is sharded with FSDP2 only (fsdp_version: 2)")
        # Each layer resharded after its forward: the reference has no backward, which is where FSDP2 would
        # otherwise reshard a layer kept gathered (reshard_after_forward: false), leaving a whole replica.
        keep, plugin.reshard_after_forward = plugin.reshard_after_forward, True
        try:
            sharded = accelerate.accelerator.fsdp2_prepare_model(self.accelerator, frozen)
        finally:
            plugin.reshard_after_forward = keep
        mib = [sum(local_bytes(p) for p in m.parameters()) / 2**20 for m in (sharded, self.model)]
        LOG.info("BNF reference: sharded by FSDP2 like the policy; this process holds %.1f MiB of it (of the "
                 "policy: %.1f MiB)", *mib)
        return sharded

    def _zero3(self) -> bool:
        return self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3

    def _partitioned_copy(self, policy: torch.nn.Module) -> torch.nn.Module:
        """ZeRO-3: BNF's frozen reference partitioned like the policy (see `zero3_reference`)."""
        from .zero3_reference import partitioned_copy

        frozen = partitioned_copy(unwrap(policy), self.accelerator.state.deepspeed_plugin.deepspeed_config)
        mib = [sum(local_bytes(p) for p in m.parameters()) / 2**20 for m in (frozen, self.model)]
        LOG.info("BNF reference: partitioned by ZeRO-3 like the policy; this process holds %.1f MiB of it (of the "
                 "policy: %.1f MiB)", *mib)
        return frozen

    def _reference_mode(self) -> str:
        if not self.method.needs_ref_logps:
            return "none"
        if self.precomputed_reference:
            return "precomputed once before training (no reference model held)"
        return self.reference.description

    def _shift_metrics_on(self) -> str:
        if self.method.needs_ref_logps:
            return "on"
        if not self.plugin_config.bnf_shift_metrics:
            return "off"
        if self.plugin_config.asft_shift_on_train:
            return "train and eval (baseline scored once)"
        return "eval only (baseline scored once; asft_shift_on_train adds the training set)"

    def _preflight_bytes(self) -> dict[str, int]:
        # Shape and dtype only, never gathered: ZeRO-3's partition (shape (0,)) and FSDP2's DTensor included.
        weight = unwrap(self.model).get_output_embeddings().weight
        vocab, hidden = head_shape(weight)
        tokens = self.args.per_device_train_batch_size * 2 * self.args.max_seq_length
        device = torch.device(self.args.device)
        return preflight(tokens, vocab, weight.dtype,
                         with_reference=self.reference is not None,
                         chunk_size=self.settings.chunk_size, impl=resolve_impl(self.settings.impl, device),
                         device_type=device.type, hidden_size=hidden if weight.requires_grad else 0)

    def attach_reference_logps(self, cache_dir) -> None:
        """Score the data once with the initial policy, split across all processes, and hand the scores to the
        batch collators (looked up by example id).

        `bnf_precompute_ref` (a method that needs the log-probs): train and eval (the loss needs them
        everywhere). A reference-free method's shift baseline: the eval set by default, the training set too
        only with `asft_shift_on_train` (one forward pass over the training data, about a third of an epoch's
        compute, before step 1).

        The cache keys are taken now, from the weights as loaded. Scores found in the cache are attached now;
        the others are scored now where every process holds the policy's weights, and otherwise (ZeRO-3 loads
        the policy partitioned; FSDP2's `cpu_ram_efficient_loading` loads it on the first process only) once
        the engine has prepared the model, at the start of training, before the first step and the first
        evaluation.
        """
        baseline = not self.method.needs_ref_logps
        splits = []
        if self.precomputed_reference or (baseline and self.plugin_config.asft_shift_on_train):
            splits.append(("train", self.train_dataset))
        if self.precomputed_reference or (baseline and self.plugin_config.bnf_shift_metrics):
            evaluation = self.eval_dataset
            named = evaluation.items() if isinstance(evaluation, dict) else [("", evaluation)]
            splits += [(f"eval/{k}" if k else "eval", v) for k, v in named if v is not None]
        if not splits:
            return
        self.initial_scores = reference.ScoresByExample()
        for collator in (self.data_collator, getattr(self, "eval_data_collator", None)):
            if isinstance(collator, ResponseBatchCollator):
                collator.initial_scores = self.initial_scores
        self._scoring_cache_dir = cache_dir
        keys = self._on_every_process(lambda: [reference.cache_key(data, self.model) for _, data in splits])
        device = self.args.device
        self._unscored = []
        for (split, data), key in zip(splits, keys):
            scores = reference.cached_scores(cache_dir, key, device, split)
            if scores is None:
                self._unscored.append((split, data, key))
            else:
                self.initial_scores.add(self._example_ids(data, split), scores)
        if self._unscored and self._weights_whole_before_prepare():
            self._score_unscored()
        elif self._unscored:
            LOG.info("initial-policy log-probs (%s): scored once the engine has prepared the model (its weights "
                     "are not whole on every process before)", ", ".join(split for split, _, _ in self._unscored))

    def _weights_whole_before_prepare(self) -> bool:
        """False where the policy's weights are not whole on every process until the engine has prepared it."""
        if self._zero3():
            return False
        plugin = self.accelerator.state.fsdp_plugin if self.is_fsdp_enabled else None
        return not (plugin is not None and plugin.cpu_ram_efficient_loading)

    def _score_unscored(self, resumed: bool = False) -> None:
        """Score what `attach_reference_logps` found in no cache (all processes), cache it, hand it over."""
        unscored, self._unscored = self._unscored, []
        if not unscored:
            return
        if resumed:
            raise RuntimeError(
                f"the initial policy's log-probs of {', '.join(split for split, _, _ in unscored)} are not in the cache "
                f"({self._scoring_cache_dir}), and this run resumes from a checkpoint, so the model is no longer the "
                "initial policy that must score them: start the run from step 0 once (it writes the cache), or keep "
                "the cache (dataset_prepared_path) of the run that wrote the checkpoint"
            )
        collator = ResponseBatchCollator(self.processing_class, vocab_size=self.vocab_size)
        with self.compute_loss_context_manager(), resharded_after_each_forward(self.model):
            for split, data, key in unscored:
                scores = reference.score_and_cache(
                    data, self.model, collator, self.args.per_device_eval_batch_size, self.args.device,
                    self._scoring_cache_dir, key, self.settings.chunk_size, self.settings.impl, split)
                self.initial_scores.add(self._example_ids(data, split), scores)

    @staticmethod
    def _example_ids(data, split: str):
        if "example_id" not in data.column_names:
            raise ValueError(f"the {split} data has no example_id column: it was not prepared by the plugin's loader")
        return data.with_format("numpy")["example_id"]

    def _on_every_process(self, compute):
        """`compute()` on the main process, its result on every process (the others may hold `meta` weights).
        An error on the main process is raised on every process, rather than leaving them waiting for it."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return compute()
        result = [None]
        if self.accelerator.is_main_process:
            try:
                result = [(compute(), None)]
            except Exception as error:  # noqa: BLE001 - re-raised below, on every process
                result = [(None, error)]
        torch.distributed.broadcast_object_list(result, src=0)
        value, error = result[0]
        if error is not None:
            raise RuntimeError(f"on the main process: {error}") from error
        return value

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

        docs/methods.md normalises the loss by the batch's n; the batch an update is computed from is the whole
        step, so micro-batch 1 x accumulation 4 and micro-batch 4 x accumulation 1 give the same update.
        """
        if not batch_samples or "pair_ids" not in batch_samples[0]:
            return None
        n = sum(b[NORMALIZER_UNITS] if NORMALIZER_UNITS in b  # the collator's count, on the CPU: no device sync
                else float(batch_normalizer(b["pair_ids"], b["sign"].shape[0])) for b in batch_samples)
        n = torch.as_tensor(n, dtype=torch.float32, device=device).reshape(1)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            n = self.accelerator.gather(n).sum().reshape(1)
        return n[0]

    def _loss_and_metrics(self, model, batch, normalizer=None):
        check_head = not self._head_checked
        self._head_checked = True
        reference = None
        if self.method.needs_ref_logps and REF_LOGPS not in batch:
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
        """The step guard wraps the optimiser's step, except under DeepSpeed (`_guard_deepspeed_step`)."""
        optimizer = super().create_optimizer(*args, **kwargs)
        if not self.is_deepspeed_enabled:
            self.guard.wrap(optimizer, lambda: [p.grad for p in self.model.parameters() if p.grad is not None],
                            distributed_any=self._any_process)
        return optimizer

    def _on_train_begin(self, state) -> None:
        """Once the engine has prepared the model: the DeepSpeed step guard, and the scoring passes that needed
        the prepared model."""
        self._guard_deepspeed_step()
        SPLIT.reset()
        if self.is_fsdp_enabled and keep_head_gathered_through_backward(self.model):
            LOG.info("FSDP2: the root unit and the unit holding the output embedding stay gathered from their "
                     "forward to their backward (the head gathered once per forward, for the model and the fused op)")
        self._score_unscored(resumed=state.global_step > 0)

    def _guard_deepspeed_step(self) -> None:
        """Under DeepSpeed the engine steps inside accelerate's `backward`, through its ZeRO optimiser, which
        calls the inner optimiser once per parameter group: the guard wraps the ZeRO optimiser's step, the
        one that updates every parameter, once the engine exists (the start of training)."""
        zero_optimizer = getattr(self.model_wrapped, "optimizer", None)
        if not self.is_deepspeed_enabled or zero_optimizer is None or getattr(zero_optimizer, "_bnf_guarded", False):
            return
        # Under fp16 DeepSpeed's loss scaler skips overflowing steps and lowers the scale itself (accelerate
        # builds no scaler for DeepSpeed); the guard then checks the loss only, as with accelerate's scaler.
        self.guard.check_gradients = not self.model_wrapped.fp16_enabled()
        self.guard.wrap_zero_optimizer(zero_optimizer, distributed_any=self._any_process)
        zero_optimizer._bnf_guarded = True

    def _report_skipped_step(self, skipped: bool) -> None:
        """Tell accelerate whether the guard skipped this step, so that the Trainer does not advance the
        learning-rate schedule for a step that did not happen (it asks `optimizer_step_was_skipped`, which
        accelerate answers from its loss scaler only). DeepSpeed reports a step skipped through its overflow
        path by itself."""
        if self.is_deepspeed_enabled:
            return
        for optimizer in self.accelerator._optimizers:
            if skipped:
                optimizer._is_overflow = True
            elif self.accelerator.scaler is None:  # without a scaler accelerate never resets it
                optimizer._is_overflow = False

    def _note_clipped_norm(self, clip_grad_norm_):
        """accelerate's `clip_grad_norm_`, also handing the norm it computes to the guard, so that the guard's
        gradient check adds no pass over the gradients (the Trainer clips at every step: with an infinite
        bound where `max_grad_norm` is 0)."""

        def clip_and_note(*args, **kwargs):
            norm = clip_grad_norm_(*args, **kwargs)
            self.guard.note_grad_norm(norm)
            return norm

        return clip_and_note

    def _any_process(self, flag) -> bool:
        """`flag` (a bool or a 0-dim tensor) on any process: one host sync, and one all-reduce when distributed."""
        flag = torch.as_tensor(flag)
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return bool(flag)
        value = flag.to(self.accelerator.device, torch.float32).reshape(1)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return bool(value.item())

    def training_step(self, model, inputs, num_items_in_batch=None):
        example_ids = inputs.get("example_ids")
        if example_ids is not None:
            self._examples_since_log += example_ids.numel()
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.phase_memory.end("backward")
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        normalizer = num_items_in_batch if model.training else None
        if model.training:
            self._count_tokens(inputs)
        loss, metrics = self._loss_and_metrics(model, inputs, normalizer=normalizer)
        if model.training:
            self.phase_memory.end("forward")  # policy (and reference) forward, loss
            self.guard.observe(loss, inputs.get("example_ids"))  # before backward, where DeepSpeed steps
        if normalizer is not None and self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            # n counts every process's units, and DDP averages gradients over processes: undo that mean.
            loss = loss * self.accelerator.num_processes
        self.metric_sums.add(metrics, "train" if model.training else "eval")
        return (loss, {}) if return_outputs else loss

    def _count_tokens(self, inputs) -> None:
        """Axolotl's `tokens/*` metrics (`include_tkps`, on by default): AxolotlTrainer counts a batch's
        trainable (label != -100, here the scored response tokens) and total token slots in its own
        `compute_loss`, which this trainer replaces, and reads the counts in `log`. They are added up on the
        device and reduced over processes at the next log (`_flush_token_counts`), not per micro-batch."""
        if not getattr(self.args, "include_tkps", False):
            return
        labels = inputs["labels"]
        scored = (labels != -100).sum()
        self._scored_since_log = scored if self._scored_since_log is None else self._scored_since_log + scored
        self._slots_since_log += labels.numel()

    def _flush_token_counts(self) -> None:
        if self._scored_since_log is None:
            return
        scored, slots = self._scored_since_log, self._slots_since_log
        self._scored_since_log, self._slots_since_log = None, 0
        counts = torch.stack([scored.long(), torch.tensor(slots, device=scored.device)])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
        counts = counts.cpu()
        tokens = getattr(self.state, "tokens", None) or {"trainable": torch.zeros(1), "total": torch.zeros(1)}
        self.state.tokens = {"trainable": tokens["trainable"] + counts[0], "total": tokens["total"] + counts[1]}

    def _two_pass_share(self) -> dict[str, float]:
        """`fused/two_pass_share` over the run so far, all processes' rows together (nothing before a row)."""
        counts = torch.tensor([SPLIT.single, SPLIT.two_pass], dtype=torch.long, device=self.accelerator.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
        single, two_pass = counts.tolist()
        return {TWO_PASS_SHARE: round(two_pass / (single + two_pass), 6)} if single + two_pass else {}

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
            self.metric_sums.add(metrics, "eval")
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
            logged = [r.get(EXAMPLES_SEEN, r.get(_EXAMPLES_SEEN_BEFORE)) for r in self.state.log_history
                      if EXAMPLES_SEEN in r or _EXAMPLES_SEEN_BEFORE in r]
            self._examples_seen = int(logged[-1]) if logged else 0
        self._examples_seen += int(new.item())
        return self._examples_seen

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # A single pass fed the wrong loss reports it here at the latest (the metrics below sync anyway).
        raise_pending(wait=True)
        split = "train" if "loss" in logs else "eval"
        prefix = "" if split == "train" else "eval_"
        for name, mean in self.metric_sums.means(split, logs, self.accelerator.device).items():
            if name != "loss" or prefix + name in logs:  # an eval_loss replaces the Trainer's
                logs[prefix + name] = round(mean, 6)
        if split == "train" and "loss" in logs:
            self._flush_token_counts()
            logs[SKIPPED_STEPS] = self.guard.skipped
            logs[EXAMPLES_SEEN] = self._count_examples_seen()
            if getattr(self.method.grad_rule, "over_segments", False):  # the same on every process
                logs.update(self._two_pass_share())
            logs.update(self.phase_memory.metrics())
            if self._preflight:
                logs.update(self._preflight)
                self._preflight = {}
            if "shift/chosen" in logs and (warning := self.displacement.update(logs["shift/chosen"])):
                LOG.warning(warning)
        super().log(logs, start_time)
