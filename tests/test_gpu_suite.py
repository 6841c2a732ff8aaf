"""`benchmarks/gpu_suite.sh` runs end to end in its smoke mode (tiny shapes, CPU), so that the script a GPU
machine runs is known to work before a GPU runs it: every step reports success in summary.txt, the
kernel benchmark and the frozen-weight benchmark write one row per (shape, method), the training step one
measured row per (model, full / LoRA, unpacked / packed, method), `axolotl preprocess` and `axolotl train`
run for rl: bnf (full fine-tuning) and rl: asft (LoRA) with the carried Axolotl wheels and train every step,
BNF raising its chosen-over-rejected margin, at most 8 files come back, and the README-ready tables.md holds
every table.

In CI's device environment (scripts/test.sh sets SUITE_WHEELS to the cached download and build of the suite's
wheel lists) the suite installs every carried wheel itself, the Axolotl ones into a folder of their own, as
on a GPU machine."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOKE_SHAPES, SMOKE_FROZEN_SHAPES = 2, 1  # benchmarks/gpu_suite.sh, smoke mode
OUT_FILES = {"summary.txt", "gpu_tests.log", "kernel_bench.jsonl", "kernel_bench_frozen.jsonl", "kernel_bench.log",
             "train_step.jsonl", "train_step.log", "tables.md"}  # at most 8 files come back from a GPU machine
TRAIN_MODELS = {"llama3-8b": "Llama-3-8B", "qwen2.5-7b": "Qwen2.5-7B"}  # benchmarks/train_step_bench.py
AXOLOTL_STEPS = 12  # benchmarks/gpu_suite.sh: max_steps of each `axolotl train` run
TRAIN_METHODS = {"bnf": "BNF single pass", "bnf-two-pass": "BNF two-pass",
                 "bnf-precomputed": "BNF, precomputed reference", "asft": "ASFT", "dpo-naive": "naive DPO (full logits)"}


def test_gpu_suite_smoke_mode_runs_every_step(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "GPU_SUITE_SMOKE": "1", "PYTHON": sys.executable,
           "SUITE_SITE": str(tmp_path / "site")}
    if env.get("SUITE_WHEELS"):  # CI's device environment: the suite installs the carried wheels itself
        env["PYTHONPATH"] = ""
    proc = subprocess.run(["bash", "benchmarks/gpu_suite.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1700)
    summary = (out / "summary.txt").read_text()
    assert proc.returncode == 0, summary + proc.stdout[-3000:] + proc.stderr[-3000:]
    assert set(os.listdir(out)) == OUT_FILES

    lines = summary.splitlines()
    tests = [line for line in lines if line.startswith("tests ")]
    # The suite's test files, and without CUDA the confident-token regimes in Triton's interpreter as well.
    files = ["tests/test_gpu_kernels.py", "tests/test_triton_kernel.py", "tests/test_device_map.py",
             "tests/test_fsdp2_mixed_precision.py", "tests/test_confident_tokens.py"]
    assert [line.split(":")[0] for line in tests] == [f"tests {f}" for f in files], summary
    assert all(": exit 0 --" in line for line in tests), summary
    assert any(line.startswith("tests tests/test_confident_tokens.py: exit 0 --") and " passed" in line
               for line in tests), summary
    assert any(line.startswith("benchmark: exit 0;") for line in lines), summary
    assert any(line.startswith("frozen-weight benchmark: exit 0;") for line in lines), summary
    assert any(line.startswith("roofline: exit 0") for line in lines), summary
    cases = len(TRAIN_MODELS) * 2 * 2 * len(TRAIN_METHODS)
    assert f"train step: exit 0; {cases} of {cases} rows measured in train_step.jsonl" in lines, summary
    assert "train step table: exit 0 -> tables.md" in lines, summary
    # The machine, in the same file: the plugin from the working tree, and the modules the steps import.
    assert summary.count("axolotl_bnf_plugin.kernels from") == 1
    assert "import axolotl_bnf_plugin.methods ok" in lines and "import axolotl_bnf_plugin.step_loss ok" in lines

    rows = [json.loads(x) for x in (out / "kernel_bench.jsonl").read_text().splitlines()]
    frozen = [json.loads(x) for x in (out / "kernel_bench_frozen.jsonl").read_text().splitlines()]
    methods = {r["method"] for r in rows}
    assert {"two-pass op (ours)", "bnf single pass (ours)", "naive"} <= methods
    assert len(rows) == SMOKE_SHAPES * len(methods) and not any("error" in r for r in rows + frozen)
    assert len(frozen) == SMOKE_FROZEN_SHAPES * 4 and all(r["frozen_weight"] for r in frozen)
    ours = next(r for r in frozen if r["method"] == "two-pass op (ours)")
    assert ours["ms"] > 0 and ours["flops_factor"] == 4

    # `axolotl train`, both methods: every command exits 0, every step is trained, and BNF raises the margin of
    # chosen over rejected (first to last logged, train and held-out eval: 0.77 -> 13.9 and 0 -> 17.0 here).
    assert "axolotl train step: ok" in lines, summary
    assert "axolotl assets: exit 0 (" in summary, summary
    margins = {}
    for method in ("bnf", "asft"):
        assert any(line.startswith(f"axolotl {method} preprocess: exit 0 (") for line in lines), summary
        (train,) = [line for line in lines if line.startswith(f"axolotl {method} train: ")]
        match = re.fullmatch(rf"axolotl {method} train: exit 0 \(\d+s\); (\d+) of {AXOLOTL_STEPS} steps; "
                             r"loss (\S+) -> (\S+); margin (\S+) -> (\S+); eval margin (\S+) -> (\S+)", train)
        assert match, train
        assert int(match.group(1)) == AXOLOTL_STEPS, train
        values = [float(x) for x in match.groups()[1:]]
        assert all(math.isfinite(x) for x in values), train
        margins[method] = values[2:]
    first, last, eval_first, eval_last = margins["bnf"]
    assert last > first and eval_last > eval_first, margins
    log = (out / "train_step.log").read_text()
    assert "===== axolotl bnf train" in log and "===== axolotl asft train" in log

    steps = [json.loads(x) for x in (out / "train_step.jsonl").read_text().splitlines()]
    cased = {(r["model"], r["tuning"], r["layout"], r["method"]) for r in steps}
    assert len(steps) == cases and cased == {(m, t, layout, k) for m in TRAIN_MODELS for t in ("full", "lora")
                                             for layout in ("unpacked", "packed") for k in TRAIN_METHODS}
    for r in steps:
        assert "error" not in r and "skipped" not in r, r
        assert math.isfinite(r["s_per_step"]) and r["s_per_step"] > 0, r
        assert math.isfinite(r["peak_mib"]) and r["peak_mib"] > 0 and r["tokens_per_s"] > 0, r
        assert all(math.isfinite(x) for x in r["losses"]), r
        assert r["rows"] == (1 if r["layout"] == "packed" else 2 * r["pairs"]), r

    table = (out / "tables.md").read_text()
    assert "into hidden and weight" in table and "into hidden only (frozen weight)" in table
    assert "Roofline model" in table  # benchmarks/roofline.py's own heading
    training = table[table.index("# Training step"):]
    assert training.count("Training step, CPU") == len(TRAIN_MODELS)
    for label in TRAIN_MODELS.values():
        assert f"{label} layer shapes" in training
    for label in TRAIN_METHODS.values():
        assert training.count(f"| {label} |") == len(TRAIN_MODELS) * 4, label
