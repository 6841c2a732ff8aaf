"""Every key the plugin adds to an Axolotl config, declared once: `BNFArgs`.

`BNFArgs` is the keys every method shares (`PluginArgs`) merged with each registered method's own
(`Method.options`, declared in that method's module). Axolotl validates configs against it
(`BNFPlugin.get_input_args`); the training-arguments mixin (`training_args.py`), the values handed to it
(`training_arg_values`) and the trainer's view of them (`plugin_settings`) are all derived from its fields.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .methods import all_options, method_class, method_names

# Config-only keys: the raw dataset entries the loader reads from the config, not from the training arguments.
CONFIG_ONLY = ("bnf_datasets", "bnf_test_datasets", "bnf_verifiers", "bnf_verifier_datasets", "bnf_verifier_size",
               "bnf_verifier_max_new_tokens", "bnf_verifier_samples", "bnf_verifier_temperature",
               "bnf_retention_datasets", "bnf_retention_size")


class PluginArgs(BaseModel):
    """The keys every method shares."""

    model_config = ConfigDict(extra="ignore")

    bnf_loss_chunk_size: int | None = Field(
        default=None,
        ge=1,
        json_schema_extra={
            "description": "Token rows per logits block in the fused log-prob op. Default: as many as fit a "
            "256 MiB workspace for the model's vocabulary (on CUDA with a trained head, up to 2048 rows in at "
            "most V x H bytes)."
        },
    )
    bnf_kernel_impl: Literal["auto", "torch", "triton"] = Field(
        default="auto",
        json_schema_extra={
            "description": "Implementation of the fused log-prob op: auto (Triton on CUDA, else PyTorch), "
            "torch, or triton."
        },
    )
    bnf_precompute_ref: bool = Field(
        default=False,
        json_schema_extra={
            "description": "BNF: compute the reference log-probs once before training (with the fused op) and "
            "store them with the prepared data, so training holds no reference model."
        },
    )
    bnf_max_bad_steps: int = Field(
        default=10,
        ge=1,
        json_schema_extra={
            "description": "Stop training after this many consecutive optimiser steps with a non-finite loss or "
            "gradient (each such step is skipped and counted)."
        },
    )
    bnf_shift_metrics: bool = Field(
        default=True,
        json_schema_extra={
            "description": "Log shift/chosen, shift/rejected, shift/chosen_down_frac (per-token log-prob change "
            "since the start of training). Free for BNF (it has the reference). For ASFT the initial policy "
            "scores the eval set once before training (cached like bnf_precompute_ref), so the shift is logged "
            "at evaluation; see asft_shift_on_train for the training set."
        },
    )
    asft_shift_on_train: bool = Field(
        default=False,
        json_schema_extra={
            "description": "ASFT: also log shift/* during training, from a baseline scored over the whole training "
            "set before step 1: one forward pass over the training data (about a third of an epoch's compute, "
            "split across processes, cached)."
        },
    )
    bnf_displacement_patience: int = Field(
        default=10,
        ge=1,
        json_schema_extra={
            "description": "Warn (once) when shift/chosen has fallen for this many consecutive logging steps."
        },
    )
    bnf_compare_probe: bool = Field(
        default=False,
        json_schema_extra={
            "description": "Score a fixed probe set of pairs (test_datasets, else the first bnf_compare_probe_size "
            "pairs of datasets) with the initial policy and again at every logging / saving / eval step, with the "
            "fused op under no_grad in eval mode, and write probe/* likelihood- and logit-shift metrics to "
            "OUTPUT_DIR/probe_log.jsonl. Works with any trainer, Axolotl's rl: dpo / ipo / simpo / orpo "
            "included (the plugin line must be in the config); what `python -m axolotl_bnf_plugin.compare` reads."
        },
    )
    bnf_compare_probe_size: int = Field(
        default=64,
        ge=1,
        json_schema_extra={
            "description": "Pairs in the probe set (bnf_compare_probe): the first this many usable pairs of "
            "test_datasets (or of datasets when there is none)."
        },
    )
    bnf_verifiers: list[str] | None = Field(
        default=None,
        json_schema_extra={
            "description": "Verifier functions (`module.function`, called like Axolotl's GRPO reward functions: "
            "prompts, completions and the row's other columns in, one float per completion out). At the start of "
            "training, at every evaluation and at the end, greedy completions of bnf_verifier_size held-out "
            "prompts are scored by each and logged as eval_verifier/*. Works under any rl:."
        },
    )
    bnf_verifier_datasets: list[dict[str, Any]] | None = Field(
        default=None,
        json_schema_extra={"description": "Data set entries (as under datasets:) whose prompts the verifiers "
                           "evaluate; default: test_datasets."},
    )
    bnf_verifier_size: int = Field(default=64, ge=1, json_schema_extra={
        "description": "Held-out prompts the verifier evaluation generates for (the first usable rows)."})
    bnf_verifier_max_new_tokens: int = Field(default=256, ge=1, json_schema_extra={
        "description": "Longest completion generated for the verifier evaluation, in tokens."})
    bnf_verifier_samples: int = Field(default=0, ge=0, json_schema_extra={
        "description": "Also draw this many sampled completions per prompt (eval_verifier/*_sampled, *_pass_at_n)."})
    bnf_verifier_temperature: float = Field(default=1.0, gt=0, json_schema_extra={
        "description": "Sampling temperature of bnf_verifier_samples."})
    bnf_retention_datasets: list[dict[str, Any]] | None = Field(
        default=None,
        json_schema_extra={
            "description": "Held-out data set entries (an SFT set through type: bnf.sft, or pairs: the preferred "
            "responses) whose mean per-token log-prob under the policy is logged at the start, at every evaluation "
            "and at the end, against its start value (eval_retention/*). Works under any rl:."
        },
    )
    bnf_retention_size: int = Field(default=256, ge=1, json_schema_extra={
        "description": "Rows of bnf_retention_datasets scored (the first usable ones)."})
    bnf_datasets: list[dict[str, Any]] | None = Field(
        default=None, json_schema_extra={"description": "Verbatim copy of `datasets:` kept by the plugin."}
    )
    bnf_test_datasets: list[dict[str, Any]] | None = Field(
        default=None, json_schema_extra={"description": "Verbatim copy of `test_datasets:` kept by the plugin."}
    )


class BNFArgs(*all_options(), PluginArgs):
    """Keys the plugin adds to an Axolotl config (merged into Axolotl's own schema)."""

    bnf_rl: Literal[method_names()] | None = Field(
        default=None,
        json_schema_extra={"description": "Set from `rl: <method>` by the plugin; not written by hand."},
    )

    @model_validator(mode="after")
    def _options_apply_to_method(self):
        if self.bnf_rl is None:
            return self
        method = method_class(self.bnf_rl)
        with_reference = ", ".join(name for name in method_names() if method_class(name).needs_ref_logps)
        reference_free = ", ".join(name for name in method_names() if not method_class(name).needs_ref_logps)
        if self.bnf_precompute_ref and not method.needs_ref_logps:
            raise ValueError(f"bnf_precompute_ref applies to rl: {with_reference} only: {method.name.upper()} uses "
                             "no reference model")
        if self.asft_shift_on_train and method.needs_ref_logps:
            raise ValueError(f"asft_shift_on_train applies to rl: {reference_free} only: {method.name.upper()}'s "
                             "shift metrics come with its reference")
        return self


TRAINING_KEYS = tuple(name for name in BNFArgs.model_fields if name not in CONFIG_ONLY)


def training_arg_values(cfg: Any) -> dict[str, Any]:
    """The training arguments' plugin values from a validated config (a key it lacks takes its default)."""
    values = {}
    for name in TRAINING_KEYS:
        value = cfg.get(name)
        values[name] = BNFArgs.model_fields[name].default if value is None else value
    return values


def plugin_settings(args: Any) -> BNFArgs:
    """The plugin's keys read back from the training arguments (or any object with them), validated."""
    return BNFArgs.model_validate({name: getattr(args, name) for name in TRAINING_KEYS if hasattr(args, name)})
