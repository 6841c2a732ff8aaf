"""What a training method is, as the trainer sees it.

The trainer runs a method without knowing which: it scores the responses with the fused op, lays the
per-token values out one row per response (`methods.common` describes the layout), and asks the method
object for the rest. A method says:
- `name`: what `rl:` selects it by;
- `needs_ref_logps`: whether its loss needs the initial policy's log-prob of every scored token (then
  the trainer holds a reference, or reads the log-probs precomputed with the data);
- `options`: a pydantic model of its config keys (merged into the plugin's `BNFArgs`; declared there once,
  and its hyper-parameters read from them with `option`);
- `loss(...)`: its loss and metrics on per-token tensors, and `metrics`, the names that loss logs;
- optionally `grad_rule` and `grad_scale(...)` / `grad_inputs(...)`: a gradient rule (`kernels.grad_rules`)
  that lets the fused op build the loss's gradient during the forward pass, one logits pass instead of two
  (a rule `over_segments` may read its response's statistics, as ASFT's does);
- `paper`, `formula`, `describe()`: the lines of the method card printed at the start of training.

A method is a frozen dataclass of its hyper-parameters. Adding one is one module in this package that
defines and registers it (`registry.register`), plus its tests; see docs/architecture.md.
"""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from pydantic import BaseModel

from ..kernels.grad_rules import GradRule
from .common import Metrics


def option(options: type[BaseModel], key: str) -> Any:
    """A method's hyper-parameter read from config key `key`, with that key's declared default (so the
    default is written once, in the pydantic field)."""
    return dataclasses.field(default=options.model_fields[key].default, metadata={"key": key})


class Method(ABC):
    """Base of every method; subclasses are frozen dataclasses whose fields are made with `option`."""

    name: ClassVar[str]
    paper: ClassVar[str]
    formula: ClassVar[str]
    needs_ref_logps: ClassVar[bool] = False
    options: ClassVar[type[BaseModel]]
    metrics: ClassVar[tuple[str, ...]]
    grad_rule: ClassVar[GradRule | None] = None

    @classmethod
    def from_config(cls, cfg: Any) -> "Method":
        """The method with its hyper-parameters read by key from a config or the training arguments."""
        return cls(**{f.name: getattr(cfg, f.metadata["key"]) for f in dataclasses.fields(cls) if "key" in f.metadata})

    @abstractmethod
    def loss(self, logp: torch.Tensor, ref_logp: torch.Tensor | None, neg_entropy: torch.Tensor, mask: torch.Tensor,
             sign: torch.Tensor, pair_ids: torch.Tensor | None = None, *,
             normalizer: torch.Tensor | float | None = None) -> tuple[torch.Tensor, Metrics]:
        """(loss, metrics) of `[B, T]` per-token tensors, one row per response; `ref_logp` is None unless the
        method `needs_ref_logps`. Only `logp` carries a gradient."""

    def grad_scale(self, mask: torch.Tensor, sign: torch.Tensor, pair_ids: torch.Tensor | None,
                   normalizer=None) -> torch.Tensor:
        """`[B]` per-response scale, for a method with a `grad_rule`: d loss / d logp of a scored token is then
        `grad_rule.grad(logp, ref_logp, scale of its response)`, which the fused op builds in its forward."""
        raise NotImplementedError(f"{self.name} has no gradient rule")

    def grad_inputs(self, ref_logp, to_positions, mask: torch.Tensor, sign: torch.Tensor,
                    pair_ids: torch.Tensor | None, normalizer=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The gradient rule's two per-position inputs `(a, b)`. `to_positions` lays a `[B]` per-response value
        out per position. By default: the reference log-probs and the per-response `grad_scale`."""
        return ref_logp, to_positions(self.grad_scale(mask, sign, pair_ids, normalizer))

    @abstractmethod
    def describe(self) -> str:
        """The method card's line of hyper-parameters."""
