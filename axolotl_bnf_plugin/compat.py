"""What differs between the Axolotl releases (0.19 - 0.21) and torch builds the plugin runs on, in one place.

Nothing here imports Axolotl at module level: the installed versions are read from package metadata, so
`axolotl_bnf_plugin.config` (imported by Axolotl while it builds its config schema) stays cheap.

- Axolotl >= 0.21 registers every installed package that declares an `axolotl.plugins` entry point (this
  one does: `bnf = axolotl_bnf_plugin:BNFPlugin`), with or without a `plugins:` line, and calls its
  `register` for every config. Each hook of `BNFPlugin` therefore checks the plugin's own switch
  (`bnf_rl`) and leaves other configs alone, and `rl: bnf` trains from a config that never names the
  plugin. The same release loads its own `ContextParallelPlugin` (`context_parallel: {size: N}`, synced
  into `context_parallel_size`) and `ExpertParallelPlugin` (`expert_parallel_size`) this way: both do
  nothing at size 1 and are refused by name above 1 (`parallelism_settings`).
- A CUDA build of torch on a machine without a GPU (what PyPI serves for Python 3.12, so what the 0.21
  environment has) raises from `torch.cuda.can_device_access_peer`, which Axolotl's `prepare_optim_env` calls
  whenever WORLD_SIZE > 1; the CPU build raises an AssertionError there, which Axolotl catches.
"""
from __future__ import annotations

from functools import lru_cache
from importlib.metadata import PackageNotFoundError, entry_points, version
from typing import Any

from packaging.version import Version

# The releases this plugin is tested with (setup.py admits the same range).
SUPPORTED_AXOLOTL = (Version("0.19"), Version("0.22"))  # lower bound included, upper excluded
ENTRY_POINT_GROUP = "axolotl.plugins"
PLUGIN_TARGET = "axolotl_bnf_plugin:BNFPlugin"


@lru_cache(maxsize=None)
def axolotl_version() -> Version | None:
    """The installed Axolotl release (None when Axolotl is not installed: the losses and kernels run without)."""
    try:
        return Version(version("axolotl"))
    except PackageNotFoundError:
        return None


def axolotl_at_least(release: str) -> bool:
    installed = axolotl_version()
    return installed is not None and installed.release >= Version(release).release


def loads_installed_plugins() -> bool:
    """Whether Axolotl registers installed `axolotl.plugins` entry points without a `plugins:` line (>= 0.21)."""
    return axolotl_at_least("0.21")


def plugin_entry_point_declared() -> bool:
    """Whether this installation declares the plugin's `axolotl.plugins` entry point."""
    return any(point.value == PLUGIN_TARGET for point in entry_points(group=ENTRY_POINT_GROUP))


def _degree(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def parallelism_settings(cfg: dict) -> list[tuple[str, Any, str]]:
    """Settings of Axolotl >= 0.21's own parallelism plugins that a raw config turns on.

    Returns (the key as written, its value, what it asks for) for each one above 1 (or unreadable). Read on
    every release: on older ones the keys mean nothing, so refusing them there only flags a config that
    would silently not do what it says.
    """
    found = []
    block = cfg.get("context_parallel")
    if isinstance(block, dict) and block.get("size") is not None:
        size = block.get("size")
        if _degree(size) is None or _degree(size) > 1:
            found.append(("context_parallel.size", size, "context parallelism (Axolotl's ContextParallelPlugin)"))
    size = cfg.get("expert_parallel_size")
    if size is not None and (_degree(size) is None or _degree(size) > 1):
        found.append(("expert_parallel_size", size, "expert parallelism (Axolotl's ExpertParallelPlugin)"))
    return found


def answer_cuda_peer_query_without_gpus() -> None:
    """Let Axolotl's NCCL peer-to-peer probe answer on a machine with no GPU under a CUDA build of torch.

    Axolotl (0.19 - 0.21) asks `torch.cuda.can_device_access_peer` for every multi-process launch, to decide
    whether to set NCCL_P2P_DISABLE. There are no CUDA devices (and no NCCL) in a CPU process group, so the
    answer cannot matter; but a CUDA build of torch without a driver raises instead of answering. The probe
    is replaced by "supported" (Axolotl then changes nothing) only when no GPU is visible.
    """
    import torch

    if torch.cuda.is_available():
        return
    try:
        from axolotl.utils import environment
    except ImportError:
        return
    if getattr(environment.check_cuda_p2p_support, "_bnf_no_gpu", False):
        return

    def check_cuda_p2p_support() -> bool:
        return True

    check_cuda_p2p_support._bnf_no_gpu = True  # type: ignore[attr-defined]
    environment.check_cuda_p2p_support = check_cuda_p2p_support
