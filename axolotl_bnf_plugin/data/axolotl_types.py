"""Rows -> candidates through Axolotl's own preference `type:` functions (DPO and KTO strategies).

Every DPO `type:` Axolotl ships (chatml.*, llama3.*, chat_template.*, zephyr.*, passthrough, a dict
`type:` for user_defined, and `pkg.func` for a user's own module) is resolved by Axolotl's loader and
called exactly as Axolotl's DPO path calls it, so a config moves from `rl: dpo` to `rl: bnf` unchanged.
A data set with a `label` column is unpaired, so its `type:` is resolved among Axolotl's KTO strategies.
These strategies return formatted text, which is used as it is.
"""
from __future__ import annotations

import inspect
from functools import partial
from typing import Any, Callable

from axolotl.prompt_strategies.dpo import load as load_dpo_strategy
from axolotl.prompt_strategies.kto import load as load_kto_strategy
from axolotl.utils.dict import DictDefault

from .adapters import Candidate, Skip, label_sign


class DatasetFormatError(ValueError):
    """A data set row or configuration that cannot be turned into training examples."""


def resolve_axolotl_transform(cfg, raw_datasets: list[dict], dataset_idx: int, tokenizer, unpaired: bool) -> Callable:
    """The row transform for `raw_datasets[dataset_idx]['type']`, bound to the tokenizer if it takes one."""
    ds_cfg = raw_datasets[dataset_idx]
    ds_type = ds_cfg.get("type")
    strategy_name = "user_defined.default" if isinstance(ds_type, dict) else str(ds_type)
    # The strategies read their dataset's options from cfg["datasets"][idx]: give them the raw entries.
    strategy_cfg = DictDefault({**dict(cfg), "datasets": [DictDefault(d) for d in raw_datasets]})
    loader = load_kto_strategy if unpaired else load_dpo_strategy
    loaded = loader(strategy_name, strategy_cfg, dataset_idx=dataset_idx)
    if loaded is None:
        kind = "KTO (the data set has a label column)" if unpaired else "DPO"
        raise DatasetFormatError(
            f"datasets[{dataset_idx}] (path {ds_cfg.get('path')!r}): cannot load {kind} type {ds_type!r}. Use one "
            "of Axolotl's preference types, `pkg.func`, or the plugin's own bnf.pairs / bnf.hh / bnf.ranked / "
            "bnf.unpaired / bnf.sft; the warning above has the underlying error."
        )
    transform = loaded[0] if isinstance(loaded, tuple) else loaded
    if "tokenizer" in inspect.signature(transform).parameters:
        transform = partial(transform, tokenizer=tokenizer)
    return transform


def _text(out: dict[str, Any], key: str) -> str:
    if key not in out:
        raise KeyError(key)
    value = out[key]
    if value is None:
        raise Skip("missing value")
    if not isinstance(value, str):
        raise DatasetFormatError(
            f"column {key!r} holds {type(value).__name__}, not text; give the data set a `type:` that formats it "
            "(e.g. chat_template.default or bnf.pairs for message lists)"
        )
    return value


def axolotl_candidate(transform: Callable, row: dict[str, Any], unpaired: bool, label_key: str = "label") -> Candidate:
    out = transform(dict(row))
    if unpaired:
        sign = label_sign(out.get(label_key, row.get(label_key)))
        return Candidate(_text(out, "prompt"), [(_text(out, "completion"), sign)], False, "Axolotl KTO type")
    return Candidate(_text(out, "prompt"), [(_text(out, "chosen"), 1), (_text(out, "rejected"), -1)], True,
                     "Axolotl DPO type")
