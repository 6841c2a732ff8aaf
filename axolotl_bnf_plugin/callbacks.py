"""Trainer callbacks the plugin adds to `rl: bnf` / `rl: asft` runs."""
from __future__ import annotations

import json
import os

from transformers import TrainerCallback

from .summary import LOG_HISTORY_FILE


class LogHistoryWriter(TrainerCallback):
    """Append every logged dict (train and eval) to OUTPUT_DIR/bnf_log_history.jsonl as it happens.

    The Trainer keeps its log history only in memory and in checkpoints; a line-per-log file survives a
    crash, is readable while the run goes on, and is what the plotting command reads.
    """

    def on_train_begin(self, args, state, control, **kwargs):
        """Start the file, keeping the records up to the step training starts from: a fresh run starts
        empty; a resumed run keeps its history up to the checkpoint and drops the interrupted tail."""
        if not state.is_world_process_zero:
            return
        os.makedirs(args.output_dir, exist_ok=True)
        path = os.path.join(args.output_dir, LOG_HISTORY_FILE)
        kept = []
        if state.global_step > 0 and os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= state.global_step]
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(kept)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, **{k: _jsonable(v) for k, v in logs.items()}}
        with open(os.path.join(args.output_dir, LOG_HISTORY_FILE), "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def _jsonable(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


class PlotOnTrainEnd(TrainerCallback):
    """Write the run's PNG plots (loss, rewards, likelihood shifts, ...) to OUTPUT_DIR/plots at the end.

    A plotting problem must never fail a finished training run: it is logged and training ends normally.
    """

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        from axolotl.utils.logging import get_logger

        from .plot import plot_run

        try:
            paths = plot_run(args.output_dir)
            get_logger(__name__).info("plots: %s", ", ".join(str(p) for p in paths))
        except Exception as err:  # noqa: BLE001 - see the docstring
            get_logger(__name__).warning("could not write the plots: %s", err)


class OnTrainBegin(TrainerCallback):
    """Run `action(state)` when training begins: after the engine has prepared the model (and a resumed run has
    loaded its checkpoint), before the first step and the first evaluation."""

    def __init__(self, action):
        self.action = action

    def on_train_begin(self, args, state, control, **kwargs):
        self.action(state)
