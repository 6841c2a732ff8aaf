"""The comparison's outputs, from the runs' probe logs: one table and one figure per view.

Reads `<output_dir>/<method>/probe_log.jsonl` (written by `callback.LikelihoodProbe`) and writes under
`<output_dir>`: `compare_table.md` and `compare_table.json` (one row per method, the values of its last probe
scoring and its run summary), `compare_likelihood.png` (per-token log-prob change of chosen and rejected
responses, and the fraction of chosen responses that went down) and `compare_logits.png` (the label logit
z_y against the log-partition log Z, for chosen and for rejected tokens). Nothing here trains.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from matplotlib.figure import Figure

from .probe import PROBE_LOG_FILE

TABLE_MD, TABLE_JSON = "compare_table.md", "compare_table.json"
LIKELIHOOD_PNG, LOGITS_PNG = "compare_likelihood.png", "compare_logits.png"
# (column title, key in a table row, format)
COLUMNS = (
    ("method", "method", "{}"),
    ("probe reward acc.", "probe/accuracy", "{:.3f}"),
    ("chosen shift", "probe/chosen", "{:+.4f}"),
    ("rejected shift", "probe/rejected", "{:+.4f}"),
    ("chosen down", "probe/chosen_down_frac", "{:.3f}"),
    ("chosen dz_y", "probe/chosen_logit", "{:+.4f}"),
    ("chosen dlogZ", "probe/chosen_logZ", "{:+.4f}"),
    ("rejected dz_y", "probe/rejected_logit", "{:+.4f}"),
    ("rejected dlogZ", "probe/rejected_logZ", "{:+.4f}"),
    ("own eval acc.", "native_eval_rewards_accuracy", "{:.3f}"),
    ("peak MiB", "peak_memory_MiB", "{:.0f}"),
    ("s / step", "seconds_per_step", "{:.3f}"),
)


def read_probe_log(run_dir: str | Path) -> tuple[dict, list[dict], dict]:
    """(header, probe records sorted by step with later duplicates winning, summary) of one run."""
    path = Path(run_dir) / PROBE_LOG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: did the run train with bnf_compare_probe: true?")
    header, summary, by_step = {}, {}, {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if "probe_source" in record:
            header = record
        elif record.get("summary"):
            summary = record
        elif "step" in record:
            by_step[record["step"]] = record
    if not by_step:
        raise ValueError(f"{path} has no probe scorings")
    return header, [by_step[s] for s in sorted(by_step)], summary


def table_rows(output_dir: str | Path, methods: list[str]) -> list[dict]:
    """One row per method: its last probe record, its summary, the probe's source and size."""
    rows = []
    for method in methods:
        header, records, summary = read_probe_log(Path(output_dir) / method)
        rows.append({"method": method, "step": records[-1]["step"], **header, **records[-1],
                     **{k: v for k, v in summary.items() if k != "summary"}})
    return rows


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(value)


def format_table(rows: list[dict]) -> str:
    """The table as Markdown, with a line saying what the probe was."""
    lines = ["| " + " | ".join(title for title, _, _ in COLUMNS) + " |",
             "|" + "|".join(" --- " for _ in COLUMNS) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row, key, fmt) for _, key, fmt in COLUMNS) + " |")
    first = rows[0] if rows else {}
    memory = first.get("peak_memory_kind", "?")
    note = (f"\nProbe: {first.get('pairs', '?')} pairs from `{first.get('probe_source', '?')}:`, scored at step "
            f"{first.get('step', '?')} against the initial policy. Shifts and dz_y / dlogZ: mean per-token change "
            "(nats); probe reward acc.: fraction of pairs whose chosen response's summed log-ratio to the initial "
            "policy beats the rejected one's; own eval acc.: the trainer's eval_rewards/accuracies (each "
            f"method's own definition; '-' without evaluation). Peak memory: {memory}. s / step: train_runtime "
            "minus the probe's scoring time, over the steps.")
    return "\n".join(lines) + "\n" + note + "\n"


def _figure(ncols: int) -> tuple[Figure, list]:
    fig = Figure(figsize=(5.2 * ncols, 4.2), layout="constrained")
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def _series(records: list[dict], key: str):
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def _plot(ax, records, key, label, color, linestyle):
    steps, values = _series(records, key)
    ax.plot(steps, values, label=label, color=color, linestyle=linestyle, marker="o" if len(steps) <= 25 else None,
            markersize=3)


def _colors(methods):
    return {m: f"C{i % 10}" for i, m in enumerate(methods)}


def plot_likelihood(runs: dict[str, list[dict]], path: Path) -> Path:
    fig, (shift, down) = _figure(2)
    colors = _colors(runs)
    for method, records in runs.items():
        _plot(shift, records, "probe/chosen", f"{method} chosen", colors[method], "-")
        _plot(shift, records, "probe/rejected", f"{method} rejected", colors[method], "--")
        _plot(down, records, "probe/chosen_down_frac", method, colors[method], "-")
    shift.axhline(0, color="grey", linewidth=0.8)
    shift.set(title="log-likelihood change vs the initial policy", xlabel="step", ylabel="mean per-token d log p")
    down.set(title="chosen responses whose likelihood fell", xlabel="step", ylabel="fraction", ylim=(-0.03, 1.03))
    shift.legend(fontsize=7)
    down.legend(fontsize=7)
    fig.savefig(path, dpi=90)
    return path


def plot_logits(runs: dict[str, list[dict]], path: Path) -> Path:
    fig, axes = _figure(2)
    colors = _colors(runs)
    for ax, side in zip(axes, ("chosen", "rejected")):
        for method, records in runs.items():
            _plot(ax, records, f"probe/{side}_logit", f"{method} z_y", colors[method], "-")
            _plot(ax, records, f"probe/{side}_logZ", f"{method} log Z", colors[method], ":")
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set(title=f"{side} tokens: label logit vs log-partition", xlabel="step",
               ylabel="mean per-token change (d log p = d z_y - d log Z)")
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=90)
    return path


def write_report(output_dir: str | Path, methods: list[str]) -> tuple[str, list[Path]]:
    """Write the table (Markdown and JSON) and both figures under `output_dir`; return (table, paths)."""
    out = Path(output_dir)
    rows = table_rows(out, methods)
    table = format_table(rows)
    (out / TABLE_MD).write_text(table, encoding="utf-8")
    (out / TABLE_JSON).write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    runs = {method: read_probe_log(out / method)[1] for method in methods}
    paths = [out / TABLE_MD, out / TABLE_JSON, plot_likelihood(runs, out / LIKELIHOOD_PNG),
             plot_logits(runs, out / LOGITS_PNG)]
    return table, paths
