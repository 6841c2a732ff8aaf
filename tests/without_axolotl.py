"""Run Python in a fresh interpreter where Axolotl, TRL and datasets cannot be imported.

The core of the package (fused op, methods, batch loss, reference, collator) must run in an environment
that has only torch, transformers and pydantic. This environment has Axolotl installed, so its absence is
simulated: a `sys.meta_path` finder placed first refuses these packages and every submodule of them with
the `ModuleNotFoundError` of a missing package. An import of any of them anywhere, however indirect, then
fails, as it would where they are not installed.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
UNAVAILABLE = ("axolotl", "trl", "datasets")

PRELUDE = f"""
import importlib.abc
import sys


class _Unavailable(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {UNAVAILABLE!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (unavailable here)", name=name)
        return None


sys.meta_path.insert(0, _Unavailable())
"""


def run_without_axolotl(code: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `code` after the prelude, from the repository root; returns the finished process (text output)."""
    return subprocess.run([sys.executable, "-c", PRELUDE + code], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def run_script_without_axolotl(script: str | Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a script as `__main__` with `args` as its command line, after the prelude."""
    code = (f"import runpy\nsys.argv = {[str(script), *args]!r}\n"
            f"runpy.run_path({str(script)!r}, run_name='__main__')\n")
    return run_without_axolotl(code, timeout)
