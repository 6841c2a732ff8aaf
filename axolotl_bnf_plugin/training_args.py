"""Fields the plugin adds to Axolotl's training arguments, so the trainer reads its settings from `args`.

Axolotl merges this mixin when `axolotl.core.training_args` is first imported; the plugin's top-level
module must therefore not import that module itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class BNFTrainingArgsMixin:
    bnf_rl: str | None = field(default=None, metadata={"help": "bnf or asft"})
    bnf_length_norm: str = field(default="sequence", metadata={"help": "sequence or batch_min"})
    asft_lambda: float = field(default=1.0, metadata={"help": "ASFT lambda"})
    asft_beta: float = field(default=1.0, metadata={"help": "ASFT beta"})
    asft_sft_weight: float = field(default=1.0, metadata={"help": "ASFT c_sft"})
    bnf_loss_chunk_size: int | None = field(default=None, metadata={"help": "rows per logits block"})
    bnf_kernel_impl: str = field(default="auto", metadata={"help": "auto, torch or triton"})
    bnf_precompute_ref: bool = field(default=False, metadata={"help": "precomputed BNF reference"})
    bnf_max_bad_steps: int = field(default=10, metadata={"help": "consecutive non-finite steps before stopping"})
    bnf_shift_metrics: bool = field(default=True, metadata={"help": "log likelihood-shift metrics"})
    asft_shift_on_train: bool = field(default=False, metadata={"help": "ASFT: shift baseline on the training set"})
    bnf_displacement_patience: int = field(default=10, metadata={"help": "falling logging steps before a warning"})
