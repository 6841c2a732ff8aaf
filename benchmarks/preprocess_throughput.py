"""Preprocessing throughput: rows/s from raw JSONL to tokenized examples, per data format.

    python benchmarks/preprocess_throughput.py [--rows 10000] [--json out.json]

Generates `--rows` rows per format (with 2% deliberately unusable rows, so the accounting path runs too),
runs the plugin's preparation (adapter, chat template, tokenization, length policy, accounting) in one
process with the tiny local BPE tokenizer, and prints a table. Dominated by tokenization and chat-template
rendering, so a real tokenizer changes the absolute numbers; the relative cost of formats holds.
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from axolotl.utils.dict import DictDefault

from axolotl_bnf_plugin.data.loader import _prepare_split, format_report
from axolotl_bnf_plugin.tiny import build_tokenizer, toy_pairs


def rows_for(fmt: str, n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    base = toy_pairs(n, seed)
    out = []
    for i, r in enumerate(base):
        bad = rng.random() < 0.02
        rejected = r["chosen"] if bad else r["rejected"]
        if fmt == "text pairs (prompt/chosen/rejected)":
            out.append({"prompt": r["question"], "chosen": " " + r["chosen"], "rejected": " " + rejected})
        elif fmt == "chat pairs (whole conversations)":
            user = {"role": "user", "content": r["question"]}
            out.append({"chosen": [user, {"role": "assistant", "content": r["chosen"]}],
                        "rejected": [user, {"role": "assistant", "content": rejected}]})
        elif fmt == "unpaired (conversational, label)":
            out.append({"prompt": [{"role": "user", "content": r["question"]}],
                        "completion": [{"role": "assistant", "content": "" if bad else r["chosen"]}], "label": i % 2 == 0})
        elif fmt == "positives-only (messages)":
            out.append({"messages": [{"role": "system", "content": r["system"]}, {"role": "user", "content": r["question"]},
                                     {"role": "assistant", "content": "" if bad else r["chosen"]}]})
    return out


FORMATS = ["text pairs (prompt/chosen/rejected)", "chat pairs (whole conversations)",
           "unpaired (conversational, label)", "positives-only (messages)"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10000)
    parser.add_argument("--json", type=str, default=None)
    args = parser.parse_args()
    tokenizer = build_tokenizer(toy_pairs(256))
    cfg = DictDefault({"sequence_len": 512, "excess_length_strategy": "drop", "dataset_num_proc": None,
                       "chat_template": None, "hf_use_auth_token": False, "shuffle_merged_datasets": False, "seed": 0})
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in FORMATS:
            path = Path(tmp) / "data.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in rows_for(fmt, args.rows)))
            start = time.perf_counter()
            dataset, report = _prepare_split(cfg, tokenizer, [{"path": str(path), "ds_type": "json"}], "train")
            seconds = time.perf_counter() - start
            counts = dict(report[0][1])
            results.append({"format": fmt, "rows": args.rows, "seconds": round(seconds, 2),
                            "rows_per_s": round(args.rows / seconds), "examples": len(dataset), "outcomes": counts})
            last_report = format_report(report)
    print(f"{'format':40s} {'rows':>7s} {'seconds':>8s} {'rows/s':>8s} {'examples':>9s}  outcomes")
    for r in results:
        print(f"{r['format']:40s} {r['rows']:7d} {r['seconds']:8.2f} {r['rows_per_s']:8d} {r['examples']:9d}  {r['outcomes']}")
    print("\nlast accounting table:\n" + last_report)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
