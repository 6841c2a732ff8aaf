"""The fields the plugin adds to Axolotl's training arguments, derived from `args.BNFArgs`.

The trainer reads its settings from `args`, so every training key of `BNFArgs` becomes a dataclass field
here, with the same type, default and description. Axolotl merges this mixin (which must be a dataclass
with defaults) when `axolotl.core.training_args` is first imported; the plugin's top-level module must
therefore not import that module itself.
"""
from __future__ import annotations

from dataclasses import field, make_dataclass

from .args import TRAINING_KEYS, BNFArgs


def _field(name: str):
    info = BNFArgs.model_fields[name]
    description = (info.json_schema_extra or {}).get("description", "")
    return name, info.annotation, field(default=info.default, metadata={"help": description})


BNFTrainingArgsMixin = make_dataclass("BNFTrainingArgsMixin", [_field(name) for name in TRAINING_KEYS])
BNFTrainingArgsMixin.__module__ = __name__  # importable by name, as Axolotl imports it (and pickling finds it)
