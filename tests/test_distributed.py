"""Multi-process training through Axolotl's own launcher (torchrun).

With GPUs, 1 process and 2 DDP processes must follow the same trajectory. On a CPU-only machine, Axolotl
0.19 + accelerate settle each process as "not distributed" before the Trainer exists, so the processes
would train independently; the plugin must refuse that run with a clear message instead.
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


def run_torchrun(cfg: dict, workdir: Path, processes: int, check: bool = True) -> subprocess.CompletedProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "train.yml"
    path.write_text(yaml.safe_dump(cfg))
    axolotl = Path(sys.executable).with_name("axolotl")
    cmd = [str(axolotl), "train", str(path)]
    if processes > 1:
        cmd += ["--launcher", "torchrun", "--", "--nproc_per_node", str(processes)]
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, **AXOLOTL_ENV}
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (CPU multi-process is refused, below)")
@pytest.mark.parametrize("method", ["bnf", "asft"])
def test_two_processes_follow_the_single_process_trajectory(tiny_assets, tmp_path, method):
    """DDP (2 processes x micro-batch 2) = 1 process x micro-batch 4: same global batches, same loss
    curve and same final weights (fp32; the step's n is counted over both processes)."""
    from safetensors.torch import load_file

    datasets = [{"path": str(tiny_assets / "pairs_intel.jsonl"), "ds_type": "json"},
                {"path": str(tiny_assets / "unpaired.jsonl"), "ds_type": "json"}]
    results = {}
    for processes, mbs in ((1, 4), (2, 2)):
        out = tmp_path / f"p{processes}"
        cfg = base_config(tiny_assets, out, method, datasets=datasets, micro_batch_size=mbs, max_steps=4,
                          optimizer="sgd", learning_rate=0.05, logging_steps=1)
        run_torchrun(cfg, out, processes)
        history = [json.loads(line) for line in (out / "run" / LOG_HISTORY_FILE).read_text().splitlines()]
        results[processes] = ([r["loss"] for r in history if "loss" in r],
                              load_file(str(out / "run" / "model.safetensors")))
    (loss1, w1), (loss2, w2) = results[1], results[2]
    assert len(loss1) == len(loss2) == 4
    assert loss2 == pytest.approx(loss1, rel=1e-4, abs=1e-5)
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only refusal")
def test_cpu_multiprocess_run_is_refused_not_run_twice(tiny_assets, tmp_path):
    cfg = base_config(tiny_assets, tmp_path, "bnf", max_steps=2)
    proc = run_torchrun(cfg, tmp_path, 2, check=False)
    assert proc.returncode != 0
    assert "2 processes were launched but the Trainer runs as 1" in proc.stdout + proc.stderr
    assert not (tmp_path / "run" / "model.safetensors").exists()
