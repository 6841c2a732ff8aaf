"""The user's verifier functions: loaded by name, called with Axolotl's GRPO reward-function convention.

A verifier is `module.function` (the module importable from the working directory, as for `trl.reward_funcs`)
called as TRL's GRPO trainer calls reward functions: `function(prompts=[...], completions=[...],
completion_ids=[...], trainer_state=..., **columns)`. `prompts` are the rows' own `prompt` column when they
have one (text, or a message list for conversational data, whose completions then come as
`[{"role": "assistant", "content": text}]`), else the rendered prompt the model saw; completions are the
generated text (special tokens removed); every other column of the rows comes as a list of the same length.
It returns one float per completion; `None` (or NaN) means the verifier does not apply to that completion
(left out of its mean, counted as unscored).

A verifier that raises, or returns something else than one number (or None) per completion, costs the
completions it was called on, never the run: the batch is retried one completion at a time, and each
completion whose call still fails is counted in `errors` (and left out of the mean).
"""
from __future__ import annotations

import importlib
import inspect
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Callable

LOG = logging.getLogger(__name__)


class VerifierConfigError(ValueError):
    """A `bnf_verifiers` entry that cannot be used, found before training starts."""


def load_verifier(name: str) -> Callable:
    """The function `name` (`package.module.function`); the working directory is importable, as it is for the
    reward functions of Axolotl's GRPO."""
    module_name, _, function_name = str(name).rpartition(".")
    if not module_name:
        raise VerifierConfigError(f"bnf_verifiers: {name!r} is not `module.function`")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise VerifierConfigError(f"bnf_verifiers: {name!r}: cannot import module {module_name!r}: {err}") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise VerifierConfigError(f"bnf_verifiers: {name!r}: module {module_name!r} has no function {function_name!r}")
    try:
        params = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return function
    names = {p.name for p in params}
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params)
    if not takes_kwargs and not {"prompts", "completions"} <= names:
        raise VerifierConfigError(f"bnf_verifiers: {name!r} must accept `prompts` and `completions` keyword "
                                  "arguments (and **kwargs for the data set's other columns)")
    return function


@dataclass
class Scores:
    """One verifier's scores of a list of completions: a float, or None where it did not score that one."""

    values: list[float | None]
    errors: int = 0
    error_messages: list[str] = field(default_factory=list)


def _checked(result, count: int) -> list[float | None]:
    if isinstance(result, (str, bytes)) or not hasattr(result, "__len__") or len(result) != count:
        raise TypeError(f"returned {type(result).__name__}, not a list of {count} scores")
    out = []
    for value in result:
        if value is None:
            out.append(None)
            continue
        number = float(value)  # a tensor or numpy scalar too; anything else raises
        out.append(None if math.isnan(number) else number)  # NaN: not applicable, as TRL reads it
    return out


def call_verifier(function: Callable, prompts: list[str], completions: list[str], columns: dict[str, list]) -> Scores:
    """`function`'s scores of `completions`; a failing call is retried per completion (module docstring)."""
    extra = {k: v for k, v in columns.items() if k not in ("prompts", "completions")}

    def call(rows: slice) -> list[float | None]:
        part = {k: v[rows] if isinstance(v, list) else v for k, v in extra.items()}  # columns; trainer_state as is
        return _checked(function(prompts=prompts[rows], completions=completions[rows], **part),
                        len(completions[rows]))

    try:
        return Scores(call(slice(None)))
    except Exception:  # noqa: BLE001 - a user's function: find the completions it fails on
        pass
    scores = Scores([])
    for i in range(len(completions)):
        try:
            scores.values += call(slice(i, i + 1))
        except Exception as err:  # noqa: BLE001
            scores.values.append(None)
            scores.errors += 1
            scores.error_messages.append(f"{type(err).__name__}: {err}")
    return scores
