"""`benchmarks/gpu_suite.sh` runs end to end in its smoke mode (tiny shapes, CPU), so the one script a GPU
session runs is never broken by the time a GPU is lent: every step reports success in summary.txt, the
benchmark and the frozen-weight benchmark write one row per (shape, method), and the README-ready table
holds both captions."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOKE_SHAPES, SMOKE_FROZEN_SHAPES = 2, 1  # benchmarks/gpu_suite.sh, smoke mode


def test_gpu_suite_smoke_mode_runs_every_step(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "GPU_SUITE_SMOKE": "1", "PYTHON": sys.executable,
           "SUITE_SITE": str(tmp_path / "site")}
    proc = subprocess.run(["bash", "benchmarks/gpu_suite.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1500)
    summary = (out / "summary.txt").read_text()
    assert proc.returncode == 0, summary + proc.stdout[-3000:] + proc.stderr[-3000:]

    lines = summary.splitlines()
    tests = [line for line in lines if line.startswith("tests ")]
    assert len(tests) == 2 and all(": exit 0 --" in line for line in tests), summary
    assert any(line.startswith("benchmark: exit 0;") for line in lines), summary
    assert any(line.startswith("frozen-weight benchmark: exit 0;") for line in lines), summary
    assert any(line.startswith("roofline: exit 0") for line in lines), summary

    rows = [json.loads(x) for x in (out / "kernel_bench.jsonl").read_text().splitlines()]
    frozen = [json.loads(x) for x in (out / "kernel_bench_frozen.jsonl").read_text().splitlines()]
    methods = {r["method"] for r in rows}
    assert {"two-pass op (ours)", "bnf single pass (ours)", "naive"} <= methods
    assert len(rows) == SMOKE_SHAPES * len(methods) and not any("error" in r for r in rows + frozen)
    assert len(frozen) == SMOKE_FROZEN_SHAPES * 4 and all(r["frozen_weight"] for r in frozen)
    ours = next(r for r in frozen if r["method"] == "two-pass op (ours)")
    assert ours["ms"] > 0 and ours["flops_factor"] == 4

    table = (out / "kernel_table.md").read_text()
    assert "into hidden and weight" in table and "into hidden only (frozen weight)" in table
    assert (out / "env.txt").read_text().count("axolotl_bnf_plugin.kernels from") == 1
