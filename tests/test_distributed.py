"""Multi-process training through Axolotl's own launcher (torchrun): DDP over NCCL on GPUs, over gloo on CPU.

1 process with micro-batch 4 and 2 processes with micro-batch 2 see the same global batches, so they must
follow the same loss curve and reach the same weights (fp32). On a CPU-only machine this needs the plugin's
`processes.join_cpu_process_group`; without it each process would train alone.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import AXOLOTL_ENV, base_config

from axolotl_bnf_plugin.summary import LOG_HISTORY_FILE

needs_two_devices = pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.device_count() < 2, reason="one GPU: 2 NCCL processes need 2"
)


# Test-only patches of a launch (tests/launch_patches/sitecustomize.py says what and why): an adapter created
# from the same seed in every launch; FSDP2 / DeepSpeed on a machine without GPUs, accelerate taking its GPU
# code paths over gloo and printing what it prepared.
LAUNCH_PATCHES = Path(__file__).with_name("launch_patches")
ENGINES_ON_CPU_ENV = {"BNF_ENGINES_ON_CPU": "1", "BNF_ENGINES_REPORT": "1"}


def run_torchrun(cfg: dict, workdir: Path, processes: int, check: bool = True) -> subprocess.CompletedProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "train.yml"
    path.write_text(yaml.safe_dump(cfg))
    axolotl = Path(sys.executable).with_name("axolotl")
    cmd = [str(axolotl), "train", str(path)]
    if processes > 1:
        cmd += ["--launcher", "torchrun", "--", "--nproc_per_node", str(processes)]
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, **AXOLOTL_ENV}
    patches = {}
    if cfg.get("adapter"):
        patches["BNF_TEST_ADAPTER_SEED"] = str(cfg.get("seed", 0))
    if processes > 1 and not torch.cuda.is_available() and (cfg.get("fsdp_version") or cfg.get("deepspeed")):
        patches.update(ENGINES_ON_CPU_ENV)
    if patches:
        env.update(patches, PYTHONPATH=os.pathsep.join(filter(None, [str(LAUNCH_PATCHES), env.get("PYTHONPATH")])))
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
    (workdir / "launch.log").write_text(proc.stdout + proc.stderr)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def pairs_of_varied_length(tiny_assets: Path, out: Path) -> Path:
    """The tiny pairs with each answer repeated 1-3 times, so that responses in a batch differ in length."""
    rows = [json.loads(line) for line in (tiny_assets / "pairs_intel.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):
        row["chosen"] = " ".join([row["chosen"]] * (1 + i % 3))
        row["rejected"] = " ".join([row["rejected"]] * (1 + (i // 3) % 3))
    path = out / "pairs_varied.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def train(tiny_assets: Path, out: Path, method: str, processes: int, **overrides):
    """Train 4 SGD steps on pairs (of varied length) + unpaired rows; return (step records, final weights)."""
    from safetensors.torch import load_file

    out.mkdir(parents=True, exist_ok=True)
    datasets = [{"path": str(pairs_of_varied_length(tiny_assets, out)), "ds_type": "json"},
                {"path": str(tiny_assets / "unpaired.jsonl"), "ds_type": "json"}]
    cfg = base_config(tiny_assets, out, method, datasets=datasets, max_steps=4, optimizer="sgd",
                      learning_rate=0.05, logging_steps=1, **overrides)
    run_torchrun(cfg, out, processes)
    history = [json.loads(line) for line in (out / "run" / LOG_HISTORY_FILE).read_text().splitlines()]
    weights = next(p for p in (out / "run" / "model.safetensors", out / "run" / "adapter_model.safetensors")
                   if p.exists())
    return [r for r in history if "loss" in r], load_file(str(weights))


def assert_same_run(a, b):
    (steps_a, weights_a), (steps_b, weights_b) = a, b
    assert len(steps_a) == len(steps_b) == 4
    assert [r["loss"] for r in steps_b] == pytest.approx([r["loss"] for r in steps_a], rel=1e-5, abs=1e-5)
    for name in ("rewards/margins", "logps/chosen", "shift/chosen"):
        got = [r.get(name) for r in steps_b]
        assert got == pytest.approx([r.get(name) for r in steps_a], rel=1e-4, abs=1e-4), name
    for key in weights_a:
        torch.testing.assert_close(weights_b[key], weights_a[key], rtol=1e-5, atol=1e-6, msg=key)


@needs_two_devices
@pytest.mark.parametrize("method", ["bnf", "asft"])
def test_two_processes_follow_the_single_process_trajectory(tiny_assets, tmp_path, method):
    """DDP (2 processes x micro-batch 2) = 1 process x micro-batch 4: same global batches, same loss curve
    and same final weights (the step's n and the logged metrics are reduced over both processes)."""
    single = train(tiny_assets, tmp_path / "p1", method, 1, micro_batch_size=4)
    double = train(tiny_assets, tmp_path / "p2", method, 2, micro_batch_size=2)
    assert_same_run(single, double)
    # The run really changed the model and the two runs are not trivially equal.
    assert single[0][0]["loss"] != single[0][-1]["loss"]


@needs_two_devices
def test_batch_min_is_taken_over_each_process_micro_batch(tiny_assets, tmp_path):
    """`bnf_length_norm: batch_min` is the shortest response of each device's micro-batch: 2 processes x
    micro-batch 2 equal 1 process x micro-batch 2 x accumulation 2 (rank r holds the step's r-th
    micro-batch), and differ from 1 process x micro-batch 4, whose minimum spans all four rows."""
    norm = {"bnf_length_norm": "batch_min"}
    double = train(tiny_assets, tmp_path / "p2", "bnf", 2, micro_batch_size=2, **norm)
    accumulated = train(tiny_assets, tmp_path / "ga", "bnf", 1, micro_batch_size=2, gradient_accumulation_steps=2,
                        **norm)
    assert_same_run(accumulated, double)
    whole = train(tiny_assets, tmp_path / "p1", "bnf", 1, micro_batch_size=4, **norm)
    assert [r["loss"] for r in whole[0]] != pytest.approx([r["loss"] for r in double[0]], rel=1e-3)
