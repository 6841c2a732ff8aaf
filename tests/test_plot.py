"""The plotting command on hand-written log histories: which PNGs it writes, that they are real images,
and that odd histories (one record, NaNs, no history at all) neither crash it nor pass silently."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from axolotl_bnf_plugin.plot import _loss, _series, main, plot_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _train_record(step: int, kind: str) -> dict:
    """A train log record shaped like the plugin's: rewards drift apart, logps of rejected fall."""
    t = step / 40
    record = {
        "step": step, "loss": 0.7 - 0.5 * t, "rewards/chosen": 0.4 * t, "rewards/rejected": -1.2 * t,
        "rewards/margins": 1.6 * t, "rewards/accuracies": min(1.0, 0.5 + t), "logps/chosen": -58.0 - 2 * t,
        "logps/rejected": -60.0 - 9 * t, "learning_rate": 1e-3, "grad_norm": 2.3, "epoch": t,
    }
    if kind == "bnf":
        record |= {"bnf/weight_chosen": 1 - 0.05 * t, "bnf/weight_rejected": 1 - 0.2 * t,
                   "bnf/below_ref_frac_chosen": 1 - 0.8 * t, "bnf/below_ref_frac_rejected": 1 - 0.3 * t}
    else:
        record |= {"asft/nll_loss": 1.5 - 0.6 * t, "asft/align_loss": 0.69 - 0.4 * t, "log_odds_chosen": 3 * t}
    return record


def _history(kind: str, shift: bool = False) -> list[dict]:
    """Train records every 2 steps, eval every 10, then the Trainer's final summary record."""
    records = []
    for step in range(2, 41, 2):
        record = _train_record(step, kind)
        if shift:
            record |= {"shift/chosen": -0.01 * step, "shift/rejected": -0.05 * step,
                       "shift/chosen_down_frac": min(1.0, 0.3 + step / 60)}
        records.append(record)
        if step % 10 == 0:
            records.append({"step": step, "epoch": step / 40,
                            **{"eval_" + k: v * 0.9 for k, v in _train_record(step, kind).items()
                               if "/" in k or k == "loss"}})
    records.append({"step": 40, "train_runtime": 12.3, "train_loss": 0.45, "epoch": 1.0})
    return records


def _write(directory: Path, records: list[dict]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "bnf_log_history.jsonl", "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")  # json.dumps writes NaN as NaN, as the plugin's writer does
    return directory


def _assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    with Image.open(path) as image:
        image.load()
        assert image.width > 200 and image.height > 200, (path, image.size)
        # Not a blank canvas: a drawn plot has far more than a couple of colours.
        colors = image.convert("RGB").getcolors(maxcolors=1 << 16)  # None: more colours than that
        assert colors is None or len(colors) > 50, path


def _names(paths) -> set[str]:
    return {Path(p).name for p in paths}


def test_bnf_run_writes_bnf_plots_only(tmp_path):
    run = _write(tmp_path / "bnf_run", _history("bnf"))
    paths = plot_run(run)
    assert _names(paths) == {"loss.png", "rewards.png", "shift.png", "bnf_weights.png"}
    assert all(p.parent == run / "plots" and p.exists() for p in paths)
    for p in paths:
        _assert_png(p)


def test_asft_run_writes_asft_plots_only(tmp_path):
    run = _write(tmp_path / "asft_run", _history("asft", shift=True))
    out = tmp_path / "elsewhere"
    paths = plot_run(run, out)
    assert _names(paths) == {"loss.png", "rewards.png", "shift.png", "asft_terms.png"}
    assert not (out / "bnf_weights.png").exists() and not (run / "plots").exists()
    for p in paths:
        _assert_png(p)


def test_single_record_history(tmp_path):
    run = _write(tmp_path / "one", [_train_record(1, "bnf")])
    paths = plot_run(run)
    assert _names(paths) == {"loss.png", "rewards.png", "shift.png", "bnf_weights.png"}
    for p in paths:
        _assert_png(p)


def test_nan_and_missing_values(tmp_path):
    records = _history("bnf")
    records[5]["loss"] = math.nan
    records[6]["rewards/margins"] = math.inf
    records[7]["bnf/weight_chosen"] = "not a number"
    for record in records:  # a metric that is NaN throughout must not produce an empty plot
        if "bnf/weight_chosen" in record:
            record["bnf/weight_rejected"] = math.nan
        for key in ("bnf/below_ref_frac_chosen", "bnf/below_ref_frac_rejected"):
            record.pop(key, None)
    run = _write(tmp_path / "nan", records)
    paths = plot_run(run)
    assert _names(paths) == {"loss.png", "rewards.png", "shift.png", "bnf_weights.png"}
    for p in paths:
        _assert_png(p)


def test_resumed_run_and_divergence_are_visible():
    """A resumed run re-logs steps (the later value wins, x stays monotonic); NaNs are counted in the legend."""
    history = [{"step": 1, "loss": 0.9}, {"step": 2, "loss": 0.8}, {"step": 2, "loss": 0.7},
               {"step": 3, "loss": math.nan}, {"step": 4, "loss": None}, {"step": 4, "eval_loss": 0.75}]
    assert _series(history, "loss")[0] == [1, 2, 3, 4]
    assert _series(history, "loss")[1][:2] == [0.9, 0.7]
    labels = [t.get_text() for t in _loss(history, "run").axes[0].get_legend().get_texts()]
    assert labels == ["loss (2 NaN/inf)", "eval_loss"]


def test_history_without_plottable_metrics(tmp_path):
    run = _write(tmp_path / "final_only", [{"step": 3, "train_runtime": 1.0, "train_loss": 0.5}])
    assert plot_run(run) == []
    assert not (run / "plots").exists()


def test_cli_plots_several_runs(tmp_path):
    bnf = _write(tmp_path / "a" / "run", _history("bnf"))
    asft = _write(tmp_path / "b" / "run", _history("asft"))
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "axolotl_bnf_plugin.plot", str(bnf), str(asft), "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    printed = [Path(line) for line in result.stdout.splitlines()]
    assert len(printed) == 8 and all(p.exists() for p in printed)
    # Same run name twice: each gets its own folder instead of overwriting the other.
    assert len({p.parent for p in printed}) == 2
    assert _names(p for p in printed if p.parent == out / "run") >= {"bnf_weights.png"}
    for p in printed:
        _assert_png(p)


def test_cli_missing_directory(tmp_path):
    missing = tmp_path / "no_such_run"
    result = subprocess.run([sys.executable, "-m", "axolotl_bnf_plugin.plot", str(missing)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "bnf_log_history.jsonl not found" in result.stderr and str(missing) in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_plots_good_runs_and_fails_on_bad_one(tmp_path, capsys):
    good = _write(tmp_path / "good", _history("bnf"))
    assert main([str(tmp_path / "empty_dir"), str(good)]) == 1
    captured = capsys.readouterr()
    assert "not found" in captured.err
    assert len(captured.out.splitlines()) == 4 and (good / "plots" / "loss.png").exists()


@pytest.mark.parametrize("bad_line", ['{"step": 3, "loss": 0.5', "not json"])
def test_cli_unreadable_history(tmp_path, capsys, bad_line):
    run = tmp_path / "bad"
    run.mkdir()
    (run / "bnf_log_history.jsonl").write_text('{"step": 1, "loss": 0.7}\n' + bad_line + "\n")
    assert main([str(run)]) == 1
    err = capsys.readouterr().err
    assert "bnf_log_history.jsonl" in err and "not valid JSON" in err
