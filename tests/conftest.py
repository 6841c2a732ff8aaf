"""Shared fixtures: a tiny local model + toy preference data, and a runner for the real `axolotl` CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

AXOLOTL_ENV = {
    "AXOLOTL_DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
    # The suite's models are tiny: one thread per process is faster than a pool's hand-offs (about 13% off
    # an `axolotl train` run on 2 cores), and a process's numbers match torchrun's one-thread workers.
    "OMP_NUM_THREADS": "1",
}
for _key, _value in AXOLOTL_ENV.items():
    os.environ.setdefault(_key, _value)

# Without a GPU, Triton kernels can only run in its interpreter (set before any kernel is defined).
try:
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass
try:
    import triton_interpreter_index

    triton_interpreter_index.patch()  # Triton < 3.7's interpreter with NumPy >= 2.4
except ImportError:  # no Triton (or no NumPy): no interpreter to patch
    pass



def _two_pass_bnf():
    """BNF without its gradient rule: `batch_loss` then runs the two-pass op (the logits recomputed in
    backward), the reference the single-pass op is checked against."""
    from dataclasses import dataclass

    from axolotl_bnf_plugin.methods.bnf import BNF

    @dataclass(frozen=True)
    class TwoPassBNF(BNF):
        grad_rule = None

    return TwoPassBNF


def __getattr__(name):  # `from conftest import TwoPassBNF`, without importing the plugin for every test
    if name == "TwoPassBNF":
        return _two_pass_bnf()
    raise AttributeError(name)


CPU_KEYS = {"fp16": False, "bf16": False, "tf32": False}
LORA_KEYS = {
    "adapter": "lora",
    "lora_r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.0,
    "lora_target_linear": True,
    "lora_mlp_kernel": False,
    "lora_qkv_kernel": False,
    "lora_o_kernel": False,
}


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> Path:
    from axolotl_bnf_plugin.tiny import build_assets

    return build_assets(tmp_path_factory.mktemp("tiny"), n_rows=64, seed=0)


def base_config(assets: Path, out: Path, method: str, **overrides) -> dict:
    cfg = {
        "base_model": str(assets / "model"),
        "plugins": ["axolotl_bnf_plugin.BNFPlugin"],
        "rl": method,
        "datasets": [{"path": str(assets / "pairs_intel.jsonl"), "ds_type": "json", "type": "chatml.intel"}],
        "dataset_prepared_path": str(out / "prepared"),
        "output_dir": str(out / "run"),
        "sequence_len": 128,
        "micro_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "num_epochs": 1,
        "max_steps": 8,
        "learning_rate": 1e-3,
        "optimizer": "adamw_torch",
        "lr_scheduler": "constant",
        "logging_steps": 1,
        "save_strategy": "no",
        "seed": 0,
        **CPU_KEYS,
    }
    cfg.update(overrides)
    return cfg


def run_axolotl(command: str, cfg: dict, workdir: Path, check: bool = True) -> subprocess.CompletedProcess:
    """`axolotl COMMAND config.yml` in a subprocess, exactly as a user runs it."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"{command}.yml"
    path.write_text(yaml.safe_dump(cfg))
    axolotl = Path(sys.executable).with_name("axolotl")
    proc = subprocess.run(
        [str(axolotl), command, str(path)],
        cwd=workdir,
        env={**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, **AXOLOTL_ENV},
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"axolotl {command} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def run_two_process_worker(worker: Path, out: Path, **env) -> list[dict]:
    """Run a `tests/*_worker.py` script under `torchrun --nproc_per_node 2`; return the records it wrote."""
    full_env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, **env}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(worker), str(out)]
    proc = subprocess.run(cmd, cwd=worker.parent, env=full_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(out.read_text())
