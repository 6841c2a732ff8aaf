"""The kernel benchmark script runs end to end (a tiny shape), so its table is never stale code."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_bench.py"
OURS = {"two-pass op (ours)": 8, "bnf single pass (ours)": 6, "bnf two-pass (ours)": 8, "asft single pass (ours)": 6,
        "asft two-pass (ours)": 8}


def test_kernel_bench_runs_every_method_it_can(tmp_path):
    out, lines = tmp_path / "bench.json", tmp_path / "bench.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--shapes", "96x16x211", "--iters", "1", "--json", str(out),
                           "--jsonl", str(lines)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    listed = json.loads(out.read_text())
    rows = {r["method"]: r for r in listed}
    assert {*OURS, "naive"} <= set(rows)
    for name, row in rows.items():
        assert "error" not in row, row
        assert row["ignored_frac"] == 0  # every row scored by default
        if name == "liger flce" and not torch.cuda.is_available():
            assert row["skipped"] == "needs CUDA"
        elif "skipped" not in row:
            assert row["ms"] > 0 and row["tflops"] > 0, row
            assert row["flops_factor"] == OURS.get(name, row["flops_factor"]) and row["flops_factor"] in (6, 8), row
            # the same time on two flop counts: the method's own and the common 6 * N * H * V
            assert row["tflops_6nhv"] * row["flops_factor"] == pytest.approx(6 * row["tflops"]), row
            assert row["tflops_6nhv"] == pytest.approx(6 * 96 * 16 * 211 / (row["ms"] / 1e3) / 1e12), row
            assert isinstance(row["peak_mib"], float), row
    assert rows["naive"]["flops_factor"] == 6
    assert "| 96 | 16 | 211 | bnf single pass (ours) |" in proc.stdout

    # Each row was appended to the JSON lines as it finished: the same rows, and the same table from them.
    assert [json.loads(line) for line in lines.read_text().splitlines()] == listed
    table = subprocess.run([sys.executable, str(SCRIPT), "--table-from", str(lines)], env=env, capture_output=True,
                           text=True, timeout=600)
    assert table.returncode == 0, table.stderr[-4000:]
    for row in listed:
        line = next(x for x in table.stdout.splitlines() if x.startswith(f"| 96 | 16 | 211 | {row['method']} |"))
        assert line in proc.stdout
    assert "| N | H | V | method | fwd+bwd ms | extra peak MiB | flops | TFLOP/s | of bf16 peak | TFLOP/s at 6NHV |" \
        in table.stdout


def test_kernel_bench_frozen_weight_counts_what_each_method_executes(tmp_path):
    """--frozen-weight backpropagates into hidden only: the two-pass op then runs 4NHV (d hidden built in the
    forward), like naive, and the caption says so."""
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--shapes", "64x16x211", "--iters", "1", "--frozen-weight",
                           "--methods", "two-pass op (ours)", "bnf single pass (ours)", "naive", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = {r["method"]: r for r in json.loads(out.read_text())}
    assert {name: r["flops_factor"] for name, r in rows.items()} == {
        "two-pass op (ours)": 4, "bnf single pass (ours)": 4, "naive": 4}
    assert all(r["frozen_weight"] and r["ms"] > 0 for r in rows.values())
    assert "forward + backward into hidden only (frozen weight)" in proc.stdout
