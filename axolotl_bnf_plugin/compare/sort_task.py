"""A verifiable task on which the methods can be told apart: sort five digits.

`python -m axolotl_bnf_plugin.tiny OUT --sort-task` builds it (`build_sort_task`): the tiny Llama of `tiny.py`
with a tokenizer trained on this text, warmed up by supervised training on correct answers for too few steps
to master the task (its greedy accuracy on held-out prompts is measured and written to `warmup.json`), then:

- `pairs_sort.jsonl`: preference pairs from the verifier, one per training prompt: a correct answer and a
  wrong one sampled from the warmed-up model (on-policy, as when pairs are labelled by a verifier), else the
  reference with two digits swapped. A sorted answer has one correct form, so the chosen answer is always the
  reference text, whether or not the model sampled it: the chosen side repeats the warm-up's own targets;
- `sort_test.jsonl`: held-out prompts (the verifier's and the probe's), in the same columns;
- `copy_test.jsonl`: a held-out set of the warm-up's second skill, repeating the digits in order (`bnf.sft`
  rows): the capability-retention set;
- `compare_sort.yml`: the comparison config, with `bnf_verifiers: [axolotl_bnf_plugin.compare.sort_task.sorted_correctly]`.

Rows carry the digits in a `digits` column, which the verifier reads, as a GRPO reward function reads a
data set's answer column.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

SORT_SYSTEM = "Sort the digits in ascending order."
COPY_SYSTEM = "Repeat the digits in the same order."
LENGTH = 5


def _digits(rng: random.Random) -> list[int]:
    return [rng.randrange(10) for _ in range(LENGTH)]


def _text(digits: list[int]) -> str:
    return " ".join(str(d) for d in digits)


def sort_rows(n: int, seed: int) -> list[dict]:
    """`n` prompts (distinct digit strings) with the reference answer as `chosen`."""
    rng, seen, rows = random.Random(seed), set(), []
    while len(rows) < n:
        digits = _digits(rng)
        if tuple(digits) in seen:
            continue
        seen.add(tuple(digits))
        rows.append({"system": SORT_SYSTEM, "question": _text(digits), "digits": _text(digits),
                     "chosen": _text(sorted(digits)), "rejected": _swapped(sorted(digits), rng)})
    return rows


def _swapped(answer: list[int], rng: random.Random) -> str:
    """`answer` with two different adjacent digits swapped (a wrong order), or one digit changed."""
    places = [i for i in range(len(answer) - 1) if answer[i] != answer[i + 1]]
    wrong = list(answer)
    if places:
        i = rng.choice(places)
        wrong[i], wrong[i + 1] = wrong[i + 1], wrong[i]
    else:
        wrong[0] = (wrong[0] + 1) % 10
    return _text(wrong)


def sorted_correctly(prompts, completions, digits, **kwargs) -> list[float]:
    """The task's verifier: 1.0 when the completion is exactly the row's digits in ascending order."""
    return [float(completion.split() == sorted(d.split())) for completion, d in zip(completions, digits)]


def render(system: str, question: str, answer: str | None = None) -> str:
    prompt = f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    return prompt if answer is None else prompt + answer + "<|im_end|>"


def copy_rows(n: int, seed: int) -> list[dict]:
    """The warm-up's second skill, as `bnf.sft` rows: repeat the digits."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        text = _text(_digits(rng))
        rows.append({"system": COPY_SYSTEM, "instruction": text, "input": "", "output": text})
    return rows


def warm_up(model, tokenizer, texts: list[str], steps: int, seed: int = 0, lr: float = 3e-3, batch: int = 32) -> float:
    """Plain next-token training on `texts` (a few seconds per 100 steps for the tiny model); the last loss."""
    import torch

    torch.manual_seed(seed)
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        enc = tokenizer(rng.sample(texts, min(batch, len(texts))), return_tensors="pt", padding=True)
        loss = model(**enc, labels=enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return float(loss.detach())


def complete(model, tokenizer, rows: list[dict], samples: int = 0, seed: int = 0, batch: int = 64) -> list[list[str]]:
    """Per row, its greedy completion (`samples=0`) or `samples` completions at temperature 1."""
    import torch

    torch.manual_seed(seed)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    tokenizer.padding_side = "left"
    out = []
    for start in range(0, len(rows), batch):
        part = rows[start:start + batch]
        enc = tokenizer([render(r["system"], r["question"]) for r in part], return_tensors="pt", padding=True)
        options = dict(do_sample=True, temperature=1.0, top_k=0, num_return_sequences=samples) if samples else \
            dict(do_sample=False)
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=3 * LENGTH, eos_token_id=end, pad_token_id=tokenizer.pad_token_id,
                                 **options)
        texts = tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        per = max(samples, 1)
        out += [[t.strip() for t in texts[i * per:(i + 1) * per]] for i in range(len(part))]
    tokenizer.padding_side = "right"
    return out


def on_policy_pairs(model, tokenizer, rows: list[dict], samples: int, seed: int) -> tuple[list[dict], dict]:
    """One pair per row from the model's own samples, labelled by the verifier (module docstring), and how
    many pairs took each side from the model."""
    rng = random.Random(seed)
    completions = complete(model, tokenizer, rows, samples=samples, seed=seed)
    pairs, counts = [], {"chosen_sampled": 0, "rejected_sampled": 0}
    for row, texts in zip(rows, completions):
        scores = sorted_correctly(None, texts, [row["digits"]] * len(texts))
        right = [t for t, s in zip(texts, scores) if s == 1.0]
        wrong = [t for t, s in zip(texts, scores) if s == 0.0 and t]
        pair = dict(row)
        if right:
            pair["chosen"], counts["chosen_sampled"] = right[0], counts["chosen_sampled"] + 1
        if wrong:
            pair["rejected"], counts["rejected_sampled"] = rng.choice(wrong), counts["rejected_sampled"] + 1
        pairs.append(pair)
    return pairs, counts


def sort_compare_config(out: Path, max_steps: int, prompts: int) -> dict:
    entry = {"ds_type": "json", "type": "chatml.intel"}
    return {
        "base_model": str(out / "model"),
        "datasets": [{"path": str(out / "pairs_sort.jsonl"), **entry}],
        "test_datasets": [{"path": str(out / "sort_test.jsonl"), "split": "train", **entry}],
        "bnf_verifiers": ["axolotl_bnf_plugin.compare.sort_task.sorted_correctly"],
        "bnf_verifier_size": prompts,
        "bnf_verifier_max_new_tokens": 3 * LENGTH,
        "bnf_retention_datasets": [{"path": str(out / "copy_test.jsonl"), "ds_type": "json", "type": "bnf.sft"}],
        "bnf_retention_size": prompts,
        "bnf_compare_probe_size": prompts,
        "dataset_prepared_path": str(out / "prepared"),
        "output_dir": str(out / "compare"),
        "sequence_len": 128,
        "micro_batch_size": 8,
        "per_device_eval_batch_size": 64,
        "gradient_accumulation_steps": 1,
        "num_epochs": 1,
        "max_steps": max_steps,
        "learning_rate": 5e-4,
        "optimizer": "adamw_torch",
        "lr_scheduler": "constant",
        "logging_steps": 8,
        "eval_strategy": "steps",
        "eval_steps": max(1, max_steps // 4),
        "save_strategy": "no",
        "seed": 0,
        "fp16": False,
        "bf16": False,
        "tf32": False,
    }


def build_sort_task(out_dir: str | Path, n_train: int = 512, n_test: int = 64, seed: int = 0,
                    warmup_steps: int = 320, samples: int = 4, max_steps: int = 64) -> Path:
    """Write the task's model and data under `out_dir` (module docstring); return it."""
    from ..tiny import build_model, build_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    every = sort_rows(n_train + n_test, seed)
    train, test = every[:n_train], every[n_train:]
    copies = copy_rows(n_train + n_test, seed + 1)
    corpus = [{"system": r["system"], "question": r.get("question", r.get("instruction")),
               "chosen": r.get("chosen", r.get("output")), "rejected": r.get("rejected", r.get("output"))}
              for r in every + copies]
    tokenizer = build_tokenizer(corpus, vocab_size=300)
    model = build_model(len(tokenizer), seed=seed)
    texts = [render(r["system"], r["question"], r["chosen"]) for r in train] + \
        [render(r["system"], r["instruction"], r["output"]) for r in copies[:n_train]]
    loss = warm_up(model, tokenizer, texts, warmup_steps, seed)
    greedy = complete(model, tokenizer, test)
    accuracy = sum(sorted_correctly(None, [g[0] for g in greedy], [r["digits"] for r in test])) / len(test)
    pairs, counts = on_policy_pairs(model, tokenizer, train, samples, seed)
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    for name, rows in (("pairs_sort.jsonl", pairs), ("sort_test.jsonl", test), ("copy_test.jsonl", copies[n_train:])):
        with open(out / name, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    summary = {"warmup_steps": warmup_steps, "warmup_loss": loss, "held_out_greedy_accuracy": accuracy,
               "pairs": len(pairs), "samples_per_prompt": samples, **counts}
    (out / "warmup.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    import yaml

    (out / "compare_sort.yml").write_text(yaml.safe_dump(sort_compare_config(out, max_steps, n_test), sort_keys=False),
                                          encoding="utf-8")
    return out
