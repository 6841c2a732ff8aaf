"""Turn a raw pairwise row into (prompt, chosen, rejected) text with Axolotl's own DPO `type:` functions.

Every DPO `type:` Axolotl ships (chatml.*, llama3.*, chat_template.*, zephyr.*, passthrough, a dict
`type:` for user_defined, and `pkg.func` for a user's own module) is resolved by Axolotl's loader and
called exactly as Axolotl's DPO path calls it, so a config moves from `rl: dpo` to `rl: bnf` unchanged.
"""
from __future__ import annotations

import inspect
from functools import partial
from typing import Any, Callable

from axolotl.prompt_strategies.dpo import load as load_dpo_strategy
from axolotl.utils.dict import DictDefault


class DatasetFormatError(ValueError):
    """A data set row or configuration that cannot be turned into training examples."""


def resolve_pairwise_transform(cfg, raw_datasets: list[dict], dataset_idx: int, tokenizer) -> Callable[[dict], dict]:
    """The row transform for `raw_datasets[dataset_idx]['type']`, bound to the tokenizer if it takes one."""
    ds_cfg = raw_datasets[dataset_idx]
    ds_type = ds_cfg.get("type")
    strategy_name = "user_defined.default" if isinstance(ds_type, dict) else str(ds_type)
    # The strategies read their dataset's options from cfg["datasets"][idx]: give them the raw entries.
    strategy_cfg = DictDefault({**dict(cfg), "datasets": [DictDefault(d) for d in raw_datasets]})
    loaded = load_dpo_strategy(strategy_name, strategy_cfg, dataset_idx=dataset_idx)
    if loaded is None:
        raise DatasetFormatError(
            f"datasets[{dataset_idx}] (path {ds_cfg.get('path')!r}): cannot load preference type {ds_type!r}. "
            "Use one of Axolotl's DPO types (chatml.*, llama3.*, chat_template.*, zephyr.nectar, passthrough, "
            "a user_defined dict) or `pkg.func`; the warning above has the underlying error."
        )
    transform = loaded[0] if isinstance(loaded, tuple) else loaded
    if "tokenizer" in inspect.signature(transform).parameters:
        transform = partial(transform, tokenizer=tokenizer)
    return transform


def pairwise_texts(transform: Callable[[dict], dict] | None, row: dict[str, Any]) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) strings of one row; `transform=None` means the row already has them."""
    out = transform(dict(row)) if transform is not None else row
    texts = []
    for key in ("prompt", "chosen", "rejected"):
        if key not in out:
            raise KeyError(key)
        value = out[key]
        if not isinstance(value, str):
            raise DatasetFormatError(
                f"column {key!r} holds {type(value).__name__}, not text; give the data set a `type:` that "
                "formats it (e.g. chat_template.default for message lists)"
            )
        texts.append(value)
    return texts[0], texts[1], texts[2]
