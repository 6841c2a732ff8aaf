"""Plot the training curves of finished (or running) BNF / ASFT runs.

`python -m axolotl_bnf_plugin.plot OUTPUT_DIR [OUTPUT_DIR ...] [--out DIR]` reads each run's
`bnf_log_history.jsonl` and writes PNGs into `OUTPUT_DIR/plots/` (or `--out`):

- `loss.png`         train loss, and eval loss when evaluation ran
- `rewards.png`      implicit rewards of chosen / rejected responses and their margin
- `shift.png`        how far the log-probs of chosen / rejected responses moved since the start; the
                     plot that shows the failure preference losses are known for: both going down
- `bnf_weights.png`  BNF only: the per-token gradient weights and the fraction of tokens below the reference
- `asft_terms.png`   ASFT only: the NLL and alignment terms of the loss, and the log-odds of chosen

The history is a log, not a table: every record carries only some keys (train, eval and the final
summary record differ), values may be NaN after a divergence, and a resumed run logs some steps twice.
So every plot draws what is there, skips what is not, and never fails on a missing key.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

# Figure (not pyplot) renders through Agg without touching a display or the global backend, so importing
# this module from a notebook or a training process changes nothing there.
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .summary import LOG_HISTORY_FILE, read_history

EVAL = "eval_"
TRAIN_STYLE = {"linestyle": "-"}
# Eval on top and thicker: it has few points and would vanish under a noisy train curve.
EVAL_STYLE = {"linestyle": "--", "linewidth": 2, "zorder": 3}


def _series(history: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of `key`, sorted by step, one value per step (a resumed run re-logs steps: the
    later record wins). Non-numeric or non-finite values become NaN, so a divergence shows as a gap."""
    by_step: dict[float, float] = {}
    for record in history:
        if key in record and isinstance(record.get("step"), (int, float)):
            value = record[key]
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            by_step[record["step"]] = float(value) if ok else math.nan
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def _has(history: list[dict], key: str) -> bool:
    """Whether `key` has at least one finite value: an all-NaN series would only draw an empty axis."""
    return any(not math.isnan(v) for v in _series(history, key)[1])


def _line(ax, steps, values, label, **style):
    # A single record is a single point: without a marker, a one-point line draws nothing.
    ax.plot(steps, values, label=label, marker="o" if len(steps) <= 25 else None, markersize=3, **style)


def _plot_keys(ax, history: list[dict], keys, relative: bool = False) -> list[str]:
    """Draw each logged key (solid) and its `eval_` twin (dashed, same colour); return the names that
    have at least one finite value (none: the caller skips the plot rather than save an empty one).

    The legend counts NaN/inf values: a run that diverged would otherwise just show a line that stops,
    and a metric that is NaN throughout would silently be missing.

    `relative` subtracts each series' first finite value, for quantities whose level means little but
    whose drift does (summed log-probs).
    """
    drawn = []
    for key in keys:
        color = None
        for name, style in ((key, TRAIN_STYLE), (EVAL + key, EVAL_STYLE)):
            steps, values = _series(history, name)
            if not steps:
                continue
            if relative:
                first = next((v for v in values if not math.isnan(v)), math.nan)
                values = [v - first for v in values]
            bad = sum(math.isnan(v) for v in values)
            label = f"{name} ({bad} NaN/inf)" if bad else name
            _line(ax, steps, values, label, color=color, **style)
            color = ax.lines[-1].get_color()
            if bad < len(values):
                drawn.append(name)
    return drawn


def _eval_note(*drawn: list[str]) -> str:
    return " (eval dashed)" if any(name.startswith(EVAL) for names in drawn for name in names) else ""


def _figure(nrows: int = 1) -> tuple[Figure, list]:
    fig = Figure(figsize=(9, 4.5 if nrows == 1 else 7), layout="constrained")
    axes = fig.subplots(nrows, 1, sharex=True, squeeze=False)[:, 0]
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    axes[-1].set_xlabel("step")
    return fig, list(axes)


def _legend(*axes):
    """One legend for lines spread over twin axes, outside the plot area so it never hides a curve."""
    handles = [line for ax in axes for line in ax.get_lines() if not line.get_label().startswith("_")]
    axes[0].legend(handles=handles, labels=[h.get_label() for h in handles],
                   loc="upper left", bbox_to_anchor=(1.01 if len(axes) == 1 else 1.09, 1), fontsize="small")


def _loss(history, run):
    fig, (ax,) = _figure()
    drawn = _plot_keys(ax, history, ["loss"])
    if not drawn:
        return None
    ax.set(title=f"Training loss{_eval_note(drawn)} - {run}", ylabel="loss")
    _legend(ax)
    return fig


def _rewards(history, run):
    fig, (ax,) = _figure()
    drawn = _plot_keys(ax, history, ["rewards/chosen", "rewards/rejected", "rewards/margins"])
    if not drawn:
        return None
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set(title=f"Implicit rewards: chosen, rejected, margin{_eval_note(drawn)} - {run}", ylabel="reward")
    _legend(ax)
    return fig


def _shift(history, run):
    """shift/* when logged; otherwise logps/* relative to their first value, labelled as a fallback
    because logged logps are batch means (summed per response for BNF), so their drift is noisier."""
    fig, (ax,) = _figure()
    if drawn := _plot_keys(ax, history, ["shift/chosen", "shift/rejected"]):
        title = "Log-prob shift since start of training: chosen vs rejected"
        ylabel = "mean per-token log-prob change"
    elif drawn := _plot_keys(ax, history, ["logps/chosen", "logps/rejected"], relative=True):
        title = "Fallback (no shift/* logged): logps/chosen, logps/rejected minus first logged value"
        ylabel = "logged log-prob change"
    else:
        return None
    ax.axhline(0, color="grey", linewidth=0.8)
    axes = [ax]
    if _has(history, "shift/chosen_down_frac") or _has(history, EVAL + "shift/chosen_down_frac"):
        twin = ax.twinx()
        twin.set_prop_cycle(color=["tab:green"])
        drawn += _plot_keys(twin, history, ["shift/chosen_down_frac"])
        twin.set(ylabel="fraction of chosen responses going down", ylim=(-0.02, 1.02))
        axes.append(twin)
    ax.set(title=f"{title}\n{run}{_eval_note(drawn)}", ylabel=ylabel)
    _legend(*axes)
    return fig


def _panels(history, top_keys, bottom_keys):
    """A top panel, plus a bottom one on the same step axis only when its metrics were logged."""
    two = any(_has(history, k) or _has(history, EVAL + k) for k in bottom_keys)
    fig, axes = _figure(2 if two else 1)
    return fig, axes, _plot_keys(axes[0], history, top_keys), _plot_keys(axes[-1], history, bottom_keys) if two else []


def _bnf_weights(history, run):
    fig, axes, drawn, drawn_below = _panels(history, ["bnf/weight_chosen", "bnf/weight_rejected"],
                                              ["bnf/below_ref_frac_chosen", "bnf/below_ref_frac_rejected"])
    if not drawn:
        return None
    axes[0].set(title=f"BNF per-token gradient weight, 1 = full push{_eval_note(drawn)} - {run}",
                ylabel="mean weight w")
    if drawn_below:
        axes[1].set(title=f"Fraction of tokens below the reference (q < 1, damped){_eval_note(drawn_below)}", ylabel="fraction",
                    ylim=(-0.02, 1.02))
    for ax in axes:
        _legend(ax)
    return fig


def _asft_terms(history, run):
    fig, axes, drawn, drawn_odds = _panels(history, ["asft/nll_loss", "asft/align_loss"], ["log_odds_chosen"])
    if not drawn:
        return None
    axes[0].set(title=f"ASFT loss terms: NLL and alignment{_eval_note(drawn)} - {run}", ylabel="loss term")
    if drawn_odds:
        axes[1].axhline(0, color="grey", linewidth=0.8)
        axes[1].set(title=f"Log-odds of chosen over rejected (mean r_w - r_l){_eval_note(drawn_odds)}",
                    ylabel="log-odds")
    for ax in axes:
        _legend(ax)
    return fig


PLOTS = {"loss.png": _loss, "rewards.png": _rewards, "shift.png": _shift,
         "bnf_weights.png": _bnf_weights, "asft_terms.png": _asft_terms}


def plot_run(output_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write the PNGs of one run into `out_dir` (default `output_dir/plots/`); return the written paths.

    A plot whose metrics were never logged is skipped, so a BNF run gets no `asft_terms.png` and the
    other way round. Raises FileNotFoundError when `output_dir` has no log history.
    """
    history = read_history(output_dir)
    out = Path(out_dir) if out_dir is not None else Path(output_dir) / "plots"
    run = Path(output_dir).resolve().name
    written = []
    for filename, make in PLOTS.items():
        fig = make(history, run)
        if fig is not None:
            for ax in fig.axes:  # a single logged step: widen the x range so the integer ticks have room
                lo, hi = ax.get_xlim()
                if hi - lo < 2:
                    ax.set_xlim((lo + hi) / 2 - 1, (lo + hi) / 2 + 1)
            out.mkdir(parents=True, exist_ok=True)
            fig.savefig(out / filename, dpi=100)
            written.append(out / filename)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m axolotl_bnf_plugin.plot", description=__doc__.split("\n")[0])
    parser.add_argument("output_dirs", nargs="+", metavar="OUTPUT_DIR", help="output_dir of an rl: bnf / asft run")
    parser.add_argument("--out", help="write here instead of OUTPUT_DIR/plots (one subfolder per run if several)")
    args = parser.parse_args(argv)
    failed, used = False, set()
    for output_dir in args.output_dirs:
        out = None
        if args.out is not None:
            out = Path(args.out)
            if len(args.output_dirs) > 1:  # one folder per run, so runs do not overwrite each other
                name = Path(output_dir).resolve().name
                while name in used:
                    name += "_"
                used.add(name)
                out = out / name
        try:
            paths = plot_run(output_dir, out)
        except FileNotFoundError as e:
            print(f"error: {e}", file=sys.stderr)
            failed = True
            continue
        except ValueError as e:  # json.JSONDecodeError
            print(f"error: {Path(output_dir) / LOG_HISTORY_FILE} is not valid JSON lines: {e}", file=sys.stderr)
            failed = True
            continue
        if not paths:
            print(f"{output_dir}: no plottable metrics logged yet", file=sys.stderr)
        for path in paths:
            print(path)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
