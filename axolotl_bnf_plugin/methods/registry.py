"""Methods by name: what `rl:` may select, and the method object a config describes."""
from __future__ import annotations

from typing import Any

from .base import Method

_METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make `cls` selectable as `rl: <cls.name>`; a name is registered once."""
    known = _METHODS.get(cls.name)
    if known is not None and known is not cls:
        raise ValueError(f"a different method is already registered as {cls.name!r}")
    _METHODS[cls.name] = cls
    return cls


def method_names() -> tuple[str, ...]:
    return tuple(_METHODS)


def method_class(name: str) -> type[Method]:
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; registered: {', '.join(_METHODS)}") from None


def method_from_config(cfg: Any) -> Method:
    """The method `cfg.bnf_rl` names, with its hyper-parameters read from `cfg` (a config or training args)."""
    return method_class(cfg.bnf_rl).from_config(cfg)


def all_options() -> tuple[type, ...]:
    """Every registered method's pydantic model of config keys, to merge into the plugin's arguments."""
    return tuple(cls.options for cls in _METHODS.values())
