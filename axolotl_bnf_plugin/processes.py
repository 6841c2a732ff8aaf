"""Several training processes on a machine without GPUs: one gloo process group, as DDP has on GPUs.

accelerate only forms a CPU process group when it is told to run on the CPU (`cpu=True`, or the
`ACCELERATE_USE_CPU` flag that `accelerate launch --cpu` sets). Axolotl creates accelerate's state without
it (first for its own barriers, and again, after a reset, for the Trainer), so under `torchrun` on a CPU-only
machine every process would decide it is alone and train on its own. `BNFPlugin.register`, the first hook
Axolotl calls, fixes that before anything else reads the state; `BNFTrainer` still checks the outcome.
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch


def launched_processes() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_cpu_multiprocess_launch() -> bool:
    return launched_processes() > 1 and not torch.cuda.is_available()


def join_cpu_process_group() -> None:
    """Under a CPU-only multi-process launch, set accelerate's CPU flag and form the gloo group now.

    The flag makes every later (re)creation of accelerate's state — the Trainer's included — a MULTI_CPU
    one; forming the group here means Axolotl's own barriers (rank 0 prepares the data set first) hold too.
    Axolotl's `AXOLOTL_NCCL_TIMEOUT` sets the collective timeout, as it does for its NCCL group.
    """
    if not is_cpu_multiprocess_launch():
        return
    from accelerate import PartialState

    from .compat import answer_cuda_peer_query_without_gpus

    answer_cuda_peer_query_without_gpus()

    os.environ["ACCELERATE_USE_CPU"] = "true"
    PartialState(cpu=True, timeout=timedelta(seconds=int(os.environ.get("AXOLOTL_NCCL_TIMEOUT", 1800))))


def place_model_on_cpu(cfg) -> None:
    """Load each CPU process's model on the CPU.

    Axolotl's config normalisation sets `device_map = {"": LOCAL_RANK}` whenever world_size > 1, an
    accelerator index that transformers refuses without one. `load_datasets` is the last plugin hook before
    the model loader reads `device_map`.
    """
    if (cfg.world_size or 1) > 1 and not torch.cuda.is_available() and isinstance(cfg.device_map, dict):
        cfg.device_map = "cpu"
