"""`axolotl_bnf_plugin.BNFPlugin`: wires BNF / ASFT into Axolotl through its plugin hooks.

Every hook checks the plugin's own switch (`bnf_rl`, set from `rl: bnf` / `rl: asft`), so a config
that loads the plugin without using one of its methods trains exactly as Axolotl alone would.
"""
from __future__ import annotations

import torch
from axolotl.integrations.base import BasePlugin

from .args import training_arg_values
from .config import translate_raw_config
from .processes import join_cpu_process_group, place_model_on_cpu


def _cpu_bf16_args(cfg) -> dict:
    """`use_cpu` for `bf16: true` on a machine with no accelerator.

    transformers refuses bf16 without a bf16 GPU unless the run is declared a CPU run; accelerate then
    trains under CPU bf16 autocast, on the bf16 weights Axolotl loaded. Nothing else changes on such a
    machine: the device is the CPU either way. (`check_available`: a CUDA build of torch names CUDA as its
    accelerator even where no GPU is present, which is how PyPI's torch for Python 3.12 runs on a CPU.)
    """
    if (cfg.bf16 or cfg.bfloat16) and torch.accelerator.current_accelerator(check_available=True) is None:
        return {"use_cpu": True}
    return {}


class BNFPlugin(BasePlugin):
    """BNF (arXiv 2410.04834) and ASFT (arXiv 2409.10571) for Axolotl, on a fused log-prob kernel."""

    def register(self, cfg: dict):
        translate_raw_config(cfg)
        if cfg.get("bnf_rl"):
            join_cpu_process_group()

    def get_input_args(self) -> str:
        return "axolotl_bnf_plugin.args.BNFArgs"

    def get_training_args_mixin(self) -> str:
        return "axolotl_bnf_plugin.training_args.BNFTrainingArgsMixin"

    def get_training_args(self, cfg):
        if not cfg.bnf_rl:
            return None
        return {
            **training_arg_values(cfg),
            # The collator needs the example columns (signs, pairs), not just the model's inputs.
            "remove_unused_columns": False,
            **_cpu_bf16_args(cfg),
        }

    def load_datasets(self, cfg, preprocess: bool = False):
        if not cfg.bnf_rl:
            return None
        from .data.loader import load_bnf_datasets

        place_model_on_cpu(cfg)
        return load_bnf_datasets(cfg, preprocess=preprocess)

    def pre_model_load(self, cfg):
        if not cfg.bnf_rl:
            return
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        model_type = cfg.model_config_type
        if model_type and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not cfg.trust_remote_code:
            raise ValueError(
                f"rl: {cfg.bnf_rl} needs a causal language model, but base_model {cfg.base_model!r} is a "
                f"{model_type!r} model, which has no causal-LM head in transformers"
            )

    def get_trainer_cls(self, cfg):
        if not cfg.bnf_rl:
            return None
        from .trainer import BNFTrainer

        return BNFTrainer

    def get_collator_cls_and_kwargs(self, cfg, is_eval: bool = False):
        if not cfg.bnf_rl:
            return None
        from .data.collator import ResponseBatchCollator

        return ResponseBatchCollator, {}

    def post_trainer_create(self, cfg, trainer):
        # The initial policy scores the data once: a precomputed reference, or a reference-free method's shift
        # baseline.
        if not cfg.bnf_rl:
            return
        from .methods import method_class

        if cfg.bnf_precompute_ref if method_class(cfg.bnf_rl).needs_ref_logps else cfg.bnf_shift_metrics:
            from axolotl.common.const import DEFAULT_DATASET_PREPARED_PATH

            trainer.attach_reference_logps(cfg.dataset_prepared_path or DEFAULT_DATASET_PREPARED_PATH)

    def add_callbacks_post_trainer(self, cfg, trainer):
        callbacks = []
        if cfg.bnf_rl:
            from .callbacks import LogHistoryWriter, PlotOnTrainEnd

            callbacks += [LogHistoryWriter(), PlotOnTrainEnd()]
        if cfg.bnf_compare_probe:  # any trainer: the same probe for Axolotl's DPO family and the plugin's methods
            from .compare.callback import LikelihoodProbe

            callbacks.append(LikelihoodProbe(cfg, trainer))
        if cfg.bnf_verifiers or cfg.bnf_retention_datasets:  # any trainer, as the probe
            from .evaluation.callback import ModelEvaluation

            callbacks.append(ModelEvaluation(cfg, trainer))
        return callbacks

