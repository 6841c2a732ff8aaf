"""The comparison over learning rates and seeds, its verifier / retention columns, and the sorting task.

Aggregates are checked against numpy on fabricated run logs; the task's pairs against the task's definition
(a correct and a wrong answer per prompt); the command end to end on a small build of the task.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import AXOLOTL_ENV

from axolotl_bnf_plugin.compare.report import format_table, table_rows, write_report
from axolotl_bnf_plugin.compare.sort_task import build_sort_task, sorted_correctly
from axolotl_bnf_plugin.compare.sweep import cell_name, write_sweep_report

METHODS, RATES, SEEDS = ["dpo", "bnf"], [1e-3, 3e-3], [0, 1, 2]
SCORE, RETENTION = "eval_verifier/sorted_correctly", "eval_retention/change"


def _fake_run(run_dir: Path, rng: random.Random) -> dict:
    """Probe and evaluation logs of one run with random values; returns what the report should take."""
    run_dir.mkdir(parents=True)
    probe = [{"step": s, "probe/accuracy": rng.random(), "probe/chosen": rng.gauss(0, 1),
              "probe/rejected": rng.gauss(0, 1)} for s in (0, 8)]
    evaluations = [{"step": s, SCORE: rng.random(), SCORE + "_pass_rate": 0.5, RETENTION: rng.gauss(0, 1),
                    "eval_verifier/seconds": 1.0} for s in (0, 4, 8)]
    lines = [{"probe_source": "test_datasets", "pairs": 8}, *probe, {"summary": True, "steps": 8}]
    (run_dir / "probe_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (run_dir / "evaluation_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evaluations))
    return {"start": evaluations[0][SCORE], "end": evaluations[-1][SCORE], "retention": evaluations[-1][RETENTION],
            "accuracy": probe[-1]["probe/accuracy"]}


def test_table_shows_verifier_start_and_end_and_the_retention_change(tmp_path):
    truth = {m: _fake_run(tmp_path / m, random.Random(i)) for i, m in enumerate(METHODS)}
    rows = table_rows(tmp_path, METHODS)
    for row in rows:
        want = truth[row["method"]]
        assert (row[SCORE + " start"], row[SCORE + " end"], row[RETENTION]) == (want["start"], want["end"],
                                                                                   want["retention"])
    table = format_table(rows)
    assert "| sorted_correctly start | sorted_correctly end |" in table and "retention change" in table
    assert f"{truth['bnf']['end']:.3f}" in table and f"{truth['dpo']['retention']:+.4f}" in table
    _, paths = write_report(tmp_path, METHODS)
    assert (tmp_path / "compare_evaluation.png") in paths and (tmp_path / "compare_evaluation.png").stat().st_size > 200


def test_sweep_reports_mean_and_spread_over_seeds(tmp_path):
    rng = random.Random(0)
    truth = {(m, lr, s): _fake_run(tmp_path / cell_name(lr, s) / m, rng) for lr in RATES for s in SEEDS for m in METHODS}
    table, paths = write_sweep_report(tmp_path, METHODS, RATES, SEEDS)
    rows = json.loads((tmp_path / "compare_sweep.json").read_text())
    assert [(r["method"], r["learning_rate"]) for r in rows] == [(m, lr) for m in METHODS for lr in RATES]
    for row in rows:
        runs = [truth[(row["method"], row["learning_rate"], s)] for s in SEEDS]
        for key, values in ((SCORE + " start", [r["start"] for r in runs]), (SCORE + " end", [r["end"] for r in runs]),
                            (SCORE + " change", [r["end"] - r["start"] for r in runs]),
                            (RETENTION, [r["retention"] for r in runs]), ("probe/accuracy", [r["accuracy"] for r in runs])):
            mean, std, count = row[key]
            assert (mean, std, count) == pytest.approx((np.mean(values), np.std(values, ddof=1), 3)), key
        assert f"{row[SCORE + ' end'][0]:.3f} ± {row[SCORE + ' end'][1]:.3f}" in table
    assert "over 3 seeds" in table and all(p.stat().st_size > 200 for p in paths)


@pytest.fixture(scope="module")
def sort_task(tmp_path_factory):
    return build_sort_task(tmp_path_factory.mktemp("sort"), n_train=48, n_test=8, warmup_steps=40, samples=2,
                           max_steps=2)


def test_sort_task_pairs_are_a_correct_and_a_wrong_answer(sort_task):
    pairs = [json.loads(line) for line in (sort_task / "pairs_sort.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in (sort_task / "sort_test.jsonl").read_text().splitlines()]
    assert len(pairs) == 48 and len(test) == 8
    assert not {p["question"] for p in pairs} & {t["question"] for t in test}  # held out
    for pair in pairs:
        digits = sorted(int(d) for d in pair["digits"].split())
        assert [int(d) for d in pair["chosen"].split()] == digits
        assert pair["rejected"].split() != [str(d) for d in digits]
    assert sorted_correctly(None, [p["chosen"] for p in pairs], [p["digits"] for p in pairs]) == [1.0] * 48
    assert sorted_correctly(None, [p["rejected"] for p in pairs], [p["digits"] for p in pairs]) == [0.0] * 48
    summary = json.loads((sort_task / "warmup.json").read_text())
    assert 0 <= summary["held_out_greedy_accuracy"] <= 1 and summary["pairs"] == 48


def test_compare_sweep_end_to_end_on_the_sort_task(sort_task, tmp_path):
    cfg = yaml.safe_load((sort_task / "compare_sort.yml").read_text())
    cfg.update(output_dir=str(tmp_path / "out"), dataset_prepared_path=str(tmp_path / "prepared"), logging_steps=1)
    path = tmp_path / "compare.yml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, **AXOLOTL_ENV}
    proc = subprocess.run([sys.executable, "-m", "axolotl_bnf_plugin.compare", str(path), "--methods", "bnf",
                           "--seeds", "0", "1"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = tmp_path / "out"
    rows = json.loads((out / "compare_sweep.json").read_text())
    assert [r["method"] for r in rows] == ["bnf"]
    for row in rows:
        cells = [[json.loads(line) for line in (out / cell_name(cfg["learning_rate"], s) / row["method"] /
                                                 "evaluation_log.jsonl").read_text().splitlines()] for s in (0, 1)]
        assert [[r["step"] for r in c] for c in cells] == [[0, 1, 2]] * 2  # the start, then eval_steps 1 of 2 steps
        ends = [c[-1][SCORE] for c in cells]
        assert row[SCORE + " end"][0] == pytest.approx(np.mean(ends))
        assert all(c[0][RETENTION] == 0.0 for c in cells)
    assert (out / "compare_sweep.md").read_text() in proc.stdout


def test_a_seed_without_a_value_is_shown_not_hidden():
    """A run whose value is missing (NaN or absent) is left out of the mean, and the cell says so."""
    from axolotl_bnf_plugin.compare.sweep import _cell, _spread

    assert _spread([0.4, float("nan"), None]) == (0.4, 0.0, 1)
    assert _cell(_spread([0.4, float("nan"), None]), "{:.3f}", seeds=3) == "0.400 ± 0.000 (n=1)"
    assert _cell(_spread([0.1, 0.3]), "{:+.3f}", seeds=2) == "+0.200 ± 0.141"
