"""Rows -> candidates through Axolotl's own preference `type:` functions (DPO and KTO strategies).

Every DPO `type:` Axolotl ships (chatml.*, llama3.*, chat_template.*, zephyr.*, passthrough, a dict
`type:` for user_defined, and `pkg.func` for a user's own module) is resolved by Axolotl's loader and
called exactly as Axolotl's DPO path calls it, so a config moves from `rl: dpo` to `rl: bnf` unchanged.
A data set with a `label` column is unpaired, so its `type:` is resolved among Axolotl's KTO strategies.
These strategies return formatted text, which is used as it is.

A row a strategy cannot handle (it raises, e.g. a `KeyError` for an absent column, an `IndexError` for a
message list shorter than it expects, a `TypeError` for a None; or it returns no text) costs that row
only: it is dropped with the reason `<type> failed (<exception>: <message>)`, counted in the preparation
report with its row number like every other dropped row. A data set none of whose rows is usable stops
preparation, naming the strategy and its first reasons (a type that fits no row is a configuration error).
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


class StrategyRowError(Skip):
    """An Axolotl `type:` strategy could not turn this row into text: the row is dropped with this reason."""


MESSAGE_CHARS = 160  # an exception's message, as kept in a dropped row's reason


def strategy_name(ds_type: Any) -> str:
    """The name a data set's Axolotl `type:` is reported by (a dict `type:` is Axolotl's user_defined)."""
    return "user_defined.default" if isinstance(ds_type, dict) else str(ds_type)


def failure_prefix(strategy: str) -> str:
    """How every reason a row failed in `strategy` begins (the loader finds them by it)."""
    return f"{strategy} failed ("


def _failure(strategy: str, detail: str) -> StrategyRowError:
    return StrategyRowError(f"{failure_prefix(strategy)}{detail})")


def describe_exception(err: BaseException) -> str:
    """`Type: message` on one line, the message shortened to MESSAGE_CHARS."""
    text = " ".join(str(err).split())
    if len(text) > MESSAGE_CHARS:
        text = text[: MESSAGE_CHARS - 3] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def resolve_axolotl_transform(cfg, raw_datasets: list[dict], dataset_idx: int, tokenizer, unpaired: bool) -> Callable:
    """The row transform for `raw_datasets[dataset_idx]['type']`, bound to the tokenizer if it takes one."""
    ds_cfg = raw_datasets[dataset_idx]
    ds_type = ds_cfg.get("type")
    # The strategies read their dataset's options from cfg["datasets"][idx]: give them the raw entries.
    strategy_cfg = DictDefault({**dict(cfg), "datasets": [DictDefault(d) for d in raw_datasets]})
    loader = load_kto_strategy if unpaired else load_dpo_strategy
    loaded = loader(strategy_name(ds_type), strategy_cfg, dataset_idx=dataset_idx)
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


def _text(out: dict[str, Any], key: str, strategy: str) -> str:
    if key not in out:
        raise _failure(strategy, f"no {key!r} in its output")
    value = out[key]
    if value is None:
        raise Skip("missing value")
    if not isinstance(value, str):
        raise _failure(strategy, f"{key!r} is {type(value).__name__}, not text")
    return value


def axolotl_candidate(transform: Callable, row: dict[str, Any], unpaired: bool, label_key: str = "label",
                      strategy: str = "Axolotl type") -> Candidate:
    """The candidate for one row through `transform`; a row it cannot handle raises StrategyRowError.

    Whatever the strategy raises on a row (KeyError, IndexError, TypeError, ValueError, AttributeError, a
    template error, ...) is about that row: configuration errors show up as the same failure on every
    row, which the loader turns into an error for the whole data set. Only MemoryError passes through.
    """
    try:
        out = transform(dict(row))
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - any exception of a per-row transform is that row's reason
        raise _failure(strategy, describe_exception(err)) from None
    if not isinstance(out, dict):
        raise _failure(strategy, f"returned {type(out).__name__}, not a row")
    if unpaired:
        sign = label_sign(out.get(label_key, row.get(label_key)))
        return Candidate(_text(out, "prompt", strategy), [(_text(out, "completion", strategy), sign)], False,
                         "Axolotl KTO type")
    return Candidate(_text(out, "prompt", strategy),
                     [(_text(out, "chosen", strategy), 1), (_text(out, "rejected", strategy), -1)], True,
                     "Axolotl DPO type")
