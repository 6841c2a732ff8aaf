"""The comparison over learning rates and seeds: one comparison per (learning rate, seed), then mean and spread.

`python -m axolotl_bnf_plugin.compare config.yml --learning-rates 5e-4 2e-3 --seeds 0 1 2` runs the methods
once per cell, each cell the user's config with only `learning_rate`, `seed` and `output_dir`
(`<output_dir>/lr<lr>_seed<seed>`) changed, and each cell gets its own table and figures (`report`). This
module then writes under `<output_dir>`: `compare_sweep.md` / `compare_sweep.json` (per method and learning
rate: mean and standard deviation over the seeds of each verifier's start and end score and its change, the
retention change, the probe's reward accuracy and chosen shift) and `compare_sweep_evaluation.png` (the
verifier score and the retention change against the step, mean over seeds, one line per method, one column
per learning rate).
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from .report import (RETENTION_CHANGE, _colors, _figure, read_evaluation_log, read_probe_log, table_rows,
                     verifier_scores)

SWEEP_MD, SWEEP_JSON, SWEEP_PNG = "compare_sweep.md", "compare_sweep.json", "compare_sweep_evaluation.png"


def cell_name(learning_rate: float, seed: int) -> str:
    return f"lr{learning_rate:g}_seed{seed}"


def cell_config(cfg: dict, learning_rate: float, seed: int) -> dict:
    """The user's config for one cell: its learning rate, seed and output directory."""
    return {**cfg, "learning_rate": learning_rate, "seed": seed,
            "output_dir": f"{str(cfg['output_dir']).rstrip('/')}/{cell_name(learning_rate, seed)}"}


def _spread(values: list[float]) -> tuple[float, float, int]:
    values = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan"), 0
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def sweep_rows(output_dir: str | Path, methods: list[str], learning_rates: list[float], seeds: list[int]) -> list[dict]:
    """Per method and learning rate: (mean, std, seeds) of each quantity over the seeds' cells."""
    out = Path(output_dir)
    cells = {(lr, seed): {row["method"]: row for row in table_rows(out / cell_name(lr, seed), methods)}
             for lr in learning_rates for seed in seeds}
    rows = []
    for method in methods:
        for lr in learning_rates:
            runs = [cells[(lr, seed)][method] for seed in seeds]
            keys = [k[:-len(" end")] for k in runs[0] if k.endswith(" end")]
            row = {"method": method, "learning_rate": lr, "seeds": len(seeds)}
            for key in keys:
                row[key + " start"] = _spread([r.get(key + " start") for r in runs])
                row[key + " end"] = _spread([r.get(key + " end") for r in runs])
                row[key + " change"] = _spread([r[key + " end"] - r[key + " start"] for r in runs
                                                if r.get(key + " end") is not None and r.get(key + " start") is not None])
            for key in (RETENTION_CHANGE, "probe/accuracy", "probe/chosen", "probe/rejected"):
                row[key] = _spread([r.get(key) for r in runs])
            rows.append(row)
    return rows


def _cell(value: tuple, fmt: str, seeds: int) -> str:
    """mean ± std in one format; `(n=k)` when only k of the seeds' runs had the value."""
    mean, std, count = value
    if not count:
        return "-"
    return f"{fmt.format(mean)} ± {fmt.format(std).lstrip('+')}" + (f" (n={count})" if count < seeds else "")


def format_sweep(rows: list[dict]) -> str:
    keys = [k for k in rows[0] if k.endswith((" start", " end", " change"))] if rows else []
    columns = [(k.split("/", 1)[1], k, "{:.3f}" if not k.endswith("change") else "{:+.3f}") for k in keys] + [
        ("retention change", RETENTION_CHANGE, "{:+.4f}"), ("probe reward acc.", "probe/accuracy", "{:.3f}"),
        ("chosen shift", "probe/chosen", "{:+.4f}"), ("rejected shift", "probe/rejected", "{:+.4f}")]
    lines = ["| method | learning rate | " + " | ".join(title for title, _, _ in columns) + " |",
             "|" + "|".join(" --- " for _ in range(len(columns) + 2)) + "|"]
    for row in rows:
        lines.append(f"| {row['method']} | {row['learning_rate']:g} | "
                     + " | ".join(_cell(row[key], fmt, row["seeds"]) for _, key, fmt in columns) + " |")
    seeds = rows[0]["seeds"] if rows else 0
    return "\n".join(lines) + (
        f"\n\nMean ± standard deviation over {seeds} seeds ((n=k): only k runs had a value). Verifier start / end: mean score of the greedy "
        "completions of the held-out prompts with the initial policy and at the last evaluation, and its change; "
        "retention change: the held-out set's mean per-token log-prob at the end minus at the start (nats); probe: "
        "the held-out pairs' reward accuracy and per-token log-likelihood changes against the initial policy.\n")


def plot_sweep(output_dir: Path, methods: list[str], learning_rates: list[float], seeds: list[int], path: Path) -> Path:
    """Verifier score (first function) and retention change against the step, mean over seeds."""
    runs = {(m, lr): [read_evaluation_log(output_dir / cell_name(lr, s) / m) for s in seeds]
            for m in methods for lr in learning_rates}
    first = verifier_scores([r for per in runs.values() for records in per for r in records])[:1]
    panels = first + [RETENTION_CHANGE]
    fig = _figure(len(learning_rates))[0]
    fig.clear()
    axes = fig.subplots(len(panels), len(learning_rates), squeeze=False)
    colors = _colors(methods)
    for col, lr in enumerate(learning_rates):
        for row, key in enumerate(panels):
            ax = axes[row][col]
            for method in methods:
                by_step: dict[int, list[float]] = {}
                for records in runs[(method, lr)]:
                    for record in records:
                        if isinstance(record.get(key), (int, float)):
                            by_step.setdefault(record["step"], []).append(record[key])
                steps = sorted(by_step)
                ax.plot(steps, [statistics.fmean(by_step[s]) for s in steps], label=method, color=colors[method],
                        marker="o", markersize=3)
            ax.set(title=f"lr {lr:g}: {'retention change' if key == RETENTION_CHANGE else key.split('/', 1)[1]}",
                   xlabel="step")
            ax.legend(fontsize=7)
    fig.set_size_inches(5.2 * len(learning_rates), 3.8 * len(panels))
    fig.savefig(path, dpi=90)
    return path


def write_sweep_report(output_dir: str | Path, methods: list[str], learning_rates: list[float],
                       seeds: list[int]) -> tuple[str, list[Path]]:
    out = Path(output_dir)
    rows = sweep_rows(out, methods, learning_rates, seeds)
    table = format_sweep(rows)
    (out / SWEEP_MD).write_text(table, encoding="utf-8")
    (out / SWEEP_JSON).write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    return table, [out / SWEEP_MD, out / SWEEP_JSON, plot_sweep(out, methods, learning_rates, seeds, out / SWEEP_PNG)]
