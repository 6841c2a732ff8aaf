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
        if state.is_world_process_zero and not args.resume_from_checkpoint:
            os.makedirs(args.output_dir, exist_ok=True)
            open(os.path.join(args.output_dir, LOG_HISTORY_FILE), "w", encoding="utf-8").close()

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
