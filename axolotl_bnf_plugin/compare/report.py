"""The comparison's outputs, from the runs' probe logs: one table and one figure per view.

Reads `<output_dir>/<method>/probe_log.jsonl` (written by `callback.LikelihoodProbe`) and writes under
`<output_dir>`: `compare_table.md` and `compare_table.json` (one row per method, the values of its last probe
scoring and its run summary), `compare_likelihood.png` (per-token log-prob change of chosen and rejected
responses, and the fraction of chosen responses that went down) and `compare_logits.png` (the label logit
z_y against the log-partition log Z, for chosen and for rejected tokens). Runs with verifiers or a retention
set (`evaluation_log.jsonl`) add their start and end scores and the retention change to the table, and
`compare_evaluation.png` (score and retention against the step, one line per method). Nothing here trains.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from matplotlib.figure import Figure

from ..evaluation.callback import EVALUATION_LOG_FILE, RETENTION, VERIFIER
from .probe import PROBE_LOG_FILE

TABLE_MD, TABLE_JSON = "compare_table.md", "compare_table.json"
LIKELIHOOD_PNG, LOGITS_PNG, EVALUATION_PNG = "compare_likelihood.png", "compare_logits.png", "compare_evaluation.png"
# Verifier metrics that are not a function's own mean score.
_NOT_SCORES = ("completion_tokens", "truncated", "seconds")
_SCORE_SUFFIXES = ("_pass_rate", "_errors", "_unscored", "_sampled", "_pass_at_n")
RETENTION_CHANGE = RETENTION + "change"
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


def read_evaluation_log(run_dir: str | Path) -> list[dict]:
    """The run's verifier / retention records (`evaluation.callback`) by step, later duplicates winning; [] when
    the run had neither."""
    path = Path(run_dir) / EVALUATION_LOG_FILE
    if not path.exists():
        return []
    by_step = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def verifier_scores(records: list[dict]) -> list[str]:
    """The metric names of the verifier functions' mean scores, in order."""
    names = []
    for record in records:
        for key in record:
            name = key[len(VERIFIER):]
            if (key.startswith(VERIFIER) and name not in _NOT_SCORES and not name.endswith(_SCORE_SUFFIXES)
                    and key not in names):
                names.append(key)
    return names


def table_rows(output_dir: str | Path, methods: list[str]) -> list[dict]:
    """One row per method: its last probe record, its summary, the probe's source and size, and with
    verifiers / retention their values at the start and at the last evaluation."""
    rows = []
    for method in methods:
        header, records, summary = read_probe_log(Path(output_dir) / method)
        row = {"method": method, "step": records[-1]["step"], **header, **records[-1],
               **{k: v for k, v in summary.items() if k != "summary"}}
        evaluations = read_evaluation_log(Path(output_dir) / method)
        if evaluations:
            for key in verifier_scores(evaluations):
                row[key + " start"], row[key + " end"] = evaluations[0].get(key), evaluations[-1].get(key)
            row[RETENTION_CHANGE] = evaluations[-1].get(RETENTION_CHANGE)
        rows.append(row)
    return rows


def _columns(rows: list[dict]) -> tuple:
    """COLUMNS, with each verifier's start and end score and the retention change when the runs have them."""
    extra = []
    for key in dict.fromkeys(k[:-len(" end")] for row in rows for k in row if k.startswith(VERIFIER) and k.endswith(" end")):
        name = key[len(VERIFIER):]
        extra += [(f"{name} start", key + " start", "{:.3f}"), (f"{name} end", key + " end", "{:.3f}")]
    if any(RETENTION_CHANGE in row for row in rows):
        extra.append(("retention change", RETENTION_CHANGE, "{:+.4f}"))
    return COLUMNS[:1] + tuple(extra) + COLUMNS[1:]


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(value)


def format_table(rows: list[dict]) -> str:
    """The table as Markdown, with a line saying what the probe was."""
    columns = _columns(rows)
    lines = ["| " + " | ".join(title for title, _, _ in columns) + " |",
             "|" + "|".join(" --- " for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row, key, fmt) for _, key, fmt in columns) + " |")
    first = rows[0] if rows else {}
    memory = first.get("peak_memory_kind", "?")
    note = (f"\nProbe: {first.get('pairs', '?')} pairs from `{first.get('probe_source', '?')}:`, scored at step "
            f"{first.get('step', '?')} against the initial policy. Shifts and dz_y / dlogZ: mean per-token change "
            "(nats); probe reward acc.: fraction of pairs whose chosen response's summed log-ratio to the initial "
            "policy beats the rejected one's; own eval acc.: the trainer's eval_rewards/accuracies (each "
            f"method's own definition; '-' without evaluation). Peak memory: {memory}. s / step: train_runtime "
            "minus the probe's scoring time, over the steps.")
    if len(columns) > len(COLUMNS):
        note += (" Verifier start / end: mean score of the greedy completions of held-out prompts with the initial "
                 "policy and at the last evaluation; retention change: the held-out set's mean per-token log-prob "
                 "then minus at the start (nats).")
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


def plot_evaluation(runs: dict[str, list[dict]], path: Path) -> Path:
    """One panel per verifier function (its mean score) and one for the retention change, against the step."""
    keys = verifier_scores([r for records in runs.values() for r in records])
    retention = any(RETENTION_CHANGE in r for records in runs.values() for r in records)
    fig, axes = _figure(len(keys) + int(retention))
    colors = _colors(runs)
    for ax, key in zip(axes, keys + ([RETENTION_CHANGE] if retention else [])):
        for method, records in runs.items():
            _plot(ax, records, key, method, colors[method], "-")
        if key == RETENTION_CHANGE:
            ax.axhline(0, color="grey", linewidth=0.8)
            ax.set(title="retention: held-out log-likelihood change", xlabel="step", ylabel="mean per-token d log p")
        else:
            ax.set(title=f"verifier {key[len(VERIFIER):]}: held-out greedy completions", xlabel="step",
                   ylabel="mean score")
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=90)
    return path


def write_report(output_dir: str | Path, methods: list[str]) -> tuple[str, list[Path]]:
    """Write the table (Markdown and JSON) and the figures under `output_dir`; return (table, paths)."""
    out = Path(output_dir)
    rows = table_rows(out, methods)
    table = format_table(rows)
    (out / TABLE_MD).write_text(table, encoding="utf-8")
    (out / TABLE_JSON).write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    runs = {method: read_probe_log(out / method)[1] for method in methods}
    paths = [out / TABLE_MD, out / TABLE_JSON, plot_likelihood(runs, out / LIKELIHOOD_PNG),
             plot_logits(runs, out / LOGITS_PNG)]
    evaluations = {method: read_evaluation_log(out / method) for method in methods}
    if any(evaluations.values()):
        paths.append(plot_evaluation(evaluations, out / EVALUATION_PNG))
    return table, paths
