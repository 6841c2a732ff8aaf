"""A toy built to provoke likelihood displacement, for `python -m axolotl_bnf_plugin.compare`.

Each row asks for a running sum and has two step-by-step "solutions" that share most of their tokens: the
rejected one gets one step's result wrong (by 1 or 2) and carries the error to the end, as math solutions
that differ in one step do. Pairs this close are where DPO-style losses are known to push the chosen
likelihood down with the rejected one (their gradients on the shared tokens cancel, and what is left moves
probability mass in ways the margin does not see).

`build_displacement_assets(out)` writes under `out`: `model/` (the tiny Llama of `tiny.py` with a tokenizer
trained on this text, first fine-tuned for `warmup_steps` on chosen and rejected answers alike, so the initial
policy knows the format and rates both sides about equally, as a model after SFT on mixed data does),
`pairs_math.jsonl` (training pairs, chatml.intel columns), `pairs_math_test.jsonl` (held-out pairs, the probe)
and `compare.yml` (the config the comparison in docs/compare.md ran). CLI: `python -m axolotl_bnf_plugin.tiny
OUT --displacement`.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import yaml

SYSTEM = "You are a careful math tutor."


def _solution(numbers: list[int], wrong_step: int | None = None, error: int = 0) -> str:
    total, parts = numbers[0], []
    for step, number in enumerate(numbers[1:]):
        result = total + number + (error if step == wrong_step else 0)
        parts.append(f"{total} + {number} = {result}.")
        total = result
    return " ".join(parts) + f" The answer is {total}."


def math_pairs(n: int, seed: int = 0) -> list[dict[str, str]]:
    """`n` rows: a running sum of 4-5 numbers; chosen correct, rejected wrong at one step (error carried)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        numbers = [rng.randint(2, 19) for _ in range(rng.randint(4, 5))]
        wrong = rng.randrange(len(numbers) - 1)
        error = rng.choice([-2, -1, 1, 2])
        rows.append({
            "system": SYSTEM,
            "question": "Add " + ", ".join(str(x) for x in numbers[:-1]) + f" and {numbers[-1]} step by step.",
            "chosen": _solution(numbers),
            "rejected": _solution(numbers, wrong, error),
        })
    return rows


def _render(row: dict, answer: str) -> str:
    return (f"<|im_start|>system\n{row['system']}<|im_end|>\n<|im_start|>user\n{row['question']}<|im_end|>\n"
            f"<|im_start|>assistant\n{answer}<|im_end|>\n")


def warm_up(model, tokenizer, rows: list[dict], steps: int, seed: int = 0, lr: float = 3e-3, batch: int = 16):
    """Plain next-token training on chosen and rejected answers alike (a few seconds for the tiny model)."""
    import torch

    torch.manual_seed(seed)
    texts = [_render(row, row[side]) for row in rows for side in ("chosen", "rejected")]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    rng = random.Random(seed)
    model.train()
    for _ in range(steps):
        enc = tokenizer(rng.sample(texts, min(batch, len(texts))), return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return float(loss.detach())


def compare_config(out: Path, max_steps: int, probe_size: int) -> dict:
    return {
        "base_model": str(out / "model"),
        "datasets": [{"path": str(out / "pairs_math.jsonl"), "ds_type": "json", "type": "chatml.intel"}],
        "test_datasets": [{"path": str(out / "pairs_math_test.jsonl"), "ds_type": "json", "type": "chatml.intel",
                           "split": "train"}],
        "bnf_compare_probe_size": probe_size,
        "dataset_prepared_path": str(out / "prepared"),
        "output_dir": str(out / "compare"),
        "sequence_len": 128,
        "micro_batch_size": 8,
        "gradient_accumulation_steps": 1,
        "num_epochs": 10,
        "max_steps": max_steps,
        "learning_rate": 5e-4,
        "optimizer": "adamw_torch",
        "lr_scheduler": "constant",
        "logging_steps": 5,
        "save_strategy": "no",
        "seed": 0,
        "fp16": False,
        "bf16": False,
        "tf32": False,
    }


def build_displacement_assets(out_dir: str | Path, n_rows: int = 128, n_test: int = 32, seed: int = 0,
                              warmup_steps: int = 150, max_steps: int = 60) -> Path:
    from ..tiny import build_model, build_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, test_rows = math_pairs(n_rows, seed), math_pairs(n_test, seed + 1)
    tokenizer = build_tokenizer(rows + test_rows)
    model = build_model(len(tokenizer), seed=seed)
    if warmup_steps:
        warm_up(model, tokenizer, rows, warmup_steps, seed)
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    for name, data in (("pairs_math.jsonl", rows), ("pairs_math_test.jsonl", test_rows)):
        with open(out / name, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in data)
    (out / "compare.yml").write_text(yaml.safe_dump(compare_config(out, max_steps, n_test), sort_keys=False),
                                     encoding="utf-8")
    return out
