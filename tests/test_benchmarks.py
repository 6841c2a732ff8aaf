"""The kernel benchmark script runs end to end (a tiny shape), so its table is never stale code."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_bench.py"


def test_kernel_bench_runs_every_method_it_can(tmp_path):
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--shapes", "96x16x211", "--iters", "1", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = {r["method"]: r for r in json.loads(out.read_text())}
    assert {"fused (ours)", "naive", "bnf two-pass (ours)", "bnf single-pass (ours)"} <= set(rows)
    for name, row in rows.items():
        if name == "liger flce" and not torch.cuda.is_available():
            assert row["skipped"] == "needs CUDA"
        elif "skipped" not in row:
            assert row["ms"] > 0 and row["tflops"] > 0, row
    assert "| 96 | 16 | 211 | bnf single-pass (ours) |" in proc.stdout
