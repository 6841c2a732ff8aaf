"""The training methods: one module each (`bnf.py`, `asft.py`) over a shared base (`base.py`, `common.py`).

Every module of this package other than the shared ones is imported here, so a method registers itself
by being a file in it. `method_from_config(cfg)` gives the method a config selects.
"""
from __future__ import annotations

import importlib
import pkgutil

from .base import Method, option
from .common import Metrics, batch_normalizer
from .registry import all_options, method_class, method_from_config, method_names, register

_SHARED = {"base", "common", "registry"}
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _SHARED:
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Method", "Metrics", "all_options", "batch_normalizer", "method_class", "method_from_config",
           "method_names", "option", "register"]
