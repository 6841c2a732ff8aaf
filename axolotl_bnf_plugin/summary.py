"""Print the first and last logged values of the key metrics of finished runs.

`python -m axolotl_bnf_plugin.summary OUTPUT_DIR [OUTPUT_DIR ...]` reads each run's
`bnf_log_history.jsonl` (written by the plugin during training).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

# Written by `callbacks.LogHistoryWriter` during training; defined here so reading a finished run's
# history (this module, the plot command) does not import transformers.
LOG_HISTORY_FILE = "bnf_log_history.jsonl"

KEYS = ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected",
        "eval_loss", "eval_rewards/margins", "eval_rewards/accuracies")


def read_history(output_dir: str | Path) -> list[dict]:
    path = Path(output_dir) / LOG_HISTORY_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {output_dir} the output_dir of an rl: bnf / asft run?")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def summarise(output_dir: str | Path) -> str:
    history = read_history(output_dir)
    lines = [f"{output_dir}  ({len(history)} log records)", f"  {'metric':26s} {'first':>10s} {'last':>10s}"]
    for key in KEYS:
        values = [(r["step"], r[key]) for r in history if key in r]
        if values:
            lines.append(f"  {key:26s} {values[0][1]:>10.4g} {values[-1][1]:>10.4g}   (steps {values[0][0]}..{values[-1][0]})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    for output_dir in argv if argv is not None else sys.argv[1:]:
        print(summarise(output_dir))


if __name__ == "__main__":
    main()
