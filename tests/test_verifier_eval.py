"""Verifier evaluation and capability retention (`bnf_verifiers`, `bnf_retention_datasets`) under any `rl:`.

The logged numbers must equal an independent evaluation of the saved checkpoints: the prompts rendered by
hand, greedy generation with transformers' own `generate` one prompt at a time, the same verifier functions
called directly, and the held-out responses' log-likelihood from the full logits. A verifier that raises costs
the completions it raised on (counted), not the run; two processes split the prompts and give the one-process
numbers.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import base_config, run_axolotl
from test_distributed import run_torchrun

from axolotl_bnf_plugin.evaluation.verifiers import call_verifier

VERIFIERS = '''
import json, os

def overlap(prompts, completions, chosen, **kwargs):
    """Share of the chosen answer's words the completion contains."""
    return [len(set(c.split()) & set(a.split())) / max(len(set(a.split())), 1) for c, a in zip(completions, chosen)]

def nonempty(prompts, completions, **kwargs):
    if os.environ.get("VERIFIER_CALLS"):
        with open(os.path.join(os.environ["VERIFIER_CALLS"], f"rank{os.environ.get('RANK', '0')}.jsonl"), "a") as f:
            f.write(json.dumps(kwargs["question"]) + "\\n")
    return [float(bool(c.strip())) for c in completions]

def flaky(prompts, completions, question, **kwargs):
    """Raises on every question of odd length: those completions are counted as errors."""
    for q in question:
        if len(q) % 2:
            raise RuntimeError("odd question")
    return [1.0] * len(completions)
'''
NAMES = ["verifiers_under_test.overlap", "verifiers_under_test.nonempty", "verifiers_under_test.flaky"]
PROMPTS = 6


def test_a_raising_verifier_costs_only_the_completions_it_fails_on():
    def picky(prompts, completions, n, **kwargs):
        if any(x == 2 for x in n):
            raise ValueError("two")
        return [None if x == 3 else float(x) for x in n]

    scores = call_verifier(picky, ["p"] * 5, ["c"] * 5, {"n": [0, 1, 2, 3, 4]})
    assert scores.values == [0.0, 1.0, None, None, 4.0] and scores.errors == 1
    wrong_length = call_verifier(lambda prompts, completions, **kw: [1.0], ["p"] * 2, ["c"] * 2, {})
    assert wrong_length.values == [1.0, 1.0] and wrong_length.errors == 0  # retried one by one: one score each
    nan = call_verifier(lambda prompts, completions, **kw: [float("nan")] * len(completions), ["p"], ["c"], {})
    assert nan.values == [None] and nan.errors == 0  # NaN: not applicable, as TRL reads it


def test_prompts_and_completions_take_trl_s_forms():
    """A row's own `prompt` column is passed as is (text, or messages with completions as assistant messages,
    as TRL's GRPO trainer does); rows without one get the rendered prompt the model saw."""
    from axolotl_bnf_plugin.evaluation.callback import ModelEvaluation

    evaluation = object.__new__(ModelEvaluation)
    chat = [{"role": "user", "content": "sort 3 1"}]
    evaluation.columns = {"prompt": ["plain text", chat, None]}
    evaluation.prompt_texts = ["<rendered 0>", "<rendered 1>", "<rendered 2>"]
    prompts, completions = evaluation._as_trl([0, 1, 2], ["a", "b", "c"])
    assert prompts == ["plain text", chat, "<rendered 2>"]
    assert completions == ["a", [{"role": "assistant", "content": "b"}], "c"]


def _config(tiny_assets: Path, out: Path, method: str) -> dict:
    rows = [json.loads(line) for line in (tiny_assets / "pairs_intel.jsonl").read_text().splitlines()]
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:48]))
    (out / "held_out.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[48:]))
    (out / "verifiers_under_test.py").write_text(VERIFIERS)
    entry = {"ds_type": "json", "type": "chatml.intel"}
    return base_config(
        tiny_assets, out, method, max_steps=4, eval_steps=2, save_steps=2, save_strategy="steps", eval_strategy="steps", learning_rate=5e-3,
        datasets=[{"path": str(out / "train.jsonl"), **entry}],
        test_datasets=[{"path": str(out / "held_out.jsonl"), "split": "train", **entry}],
        bnf_verifiers=NAMES, bnf_verifier_size=PROMPTS, bnf_verifier_max_new_tokens=12,
        bnf_retention_datasets=[{"path": str(tiny_assets / "sft_alpaca.jsonl"), "ds_type": "json", "type": "bnf.sft"}],
        bnf_retention_size=8,
    )


def _records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run_dir / "evaluation_log.jsonl").read_text().splitlines())}


def _prompt(row: dict) -> str:
    return (f"<|im_start|>system\n{row['system']}<|im_end|>\n<|im_start|>user\n{row['question']}<|im_end|>\n"
            "<|im_start|>assistant\n")


@torch.no_grad()
def _independent(model_dir: Path, tokenizer, rows: list[dict], sft_rows: list[dict], module) -> dict:
    """Greedy completions one prompt at a time, the verifiers called directly, retention from full logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    completions = []
    for row in rows:
        ids = torch.tensor([tokenizer(_prompt(row))["input_ids"]])
        out = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=end, pad_token_id=end)
        completions.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    columns = {k: [r[k] for r in rows] for k in rows[0]}
    prompts = [_prompt(r) for r in rows]
    scores = {name: getattr(module, name)(prompts=prompts, completions=completions, **columns)
              for name in ("overlap", "nonempty")}
    total, count = 0.0, 0
    for row in sft_rows:
        user = [{"role": "user", "content": row["instruction"]}]
        prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": row["output"]}], tokenize=False)
        full = full[:full.rindex("<|im_end|>") + len("<|im_end|>")]  # the trained turn ends at its end of turn
        start = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        ids = torch.tensor([tokenizer(full, add_special_tokens=False)["input_ids"]])
        logps = torch.log_softmax(model(ids).logits[0, :-1].double(), -1).gather(1, ids[0, 1:, None])[:, 0]
        total, count = total + logps[start - 1:].sum().item(), count + logps[start - 1:].numel()
    return {"completions": completions, "scores": scores, "retention": total / count}


@pytest.mark.parametrize("method", ["bnf", "dpo"])
def test_logged_scores_equal_an_independent_evaluation_of_the_checkpoints(tiny_assets, tmp_path, method, monkeypatch):
    import importlib
    import sys

    from transformers import AutoTokenizer

    cfg = {**_config(tiny_assets, tmp_path, method), "bnf_verifier_samples": 2, "bnf_verifier_temperature": 0.7}
    if method == "dpo":
        cfg["rl_beta"] = 0.1
    run_axolotl("train", cfg, tmp_path)
    run = tmp_path / "run"
    records = _records(run)
    assert sorted(records) == [0, 2, 4]
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("verifiers_under_test")
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets / "model")
    rows = [json.loads(line) for line in (tmp_path / "held_out.jsonl").read_text().splitlines()][:PROMPTS]
    sft_rows = [json.loads(line) for line in (tiny_assets / "sft_alpaca.jsonl").read_text().splitlines()][:8]
    completions = {}
    for step in (0, 2, 4):
        model_dir = tiny_assets / "model" if step == 0 else run / f"checkpoint-{step}"
        want = _independent(model_dir, tokenizer, rows, sft_rows, module)
        got = records[step]
        completions[step] = [json.loads(line)["completion"] for line in (run / "verifier_completions.jsonl").read_text()
                             .splitlines() if json.loads(line)["step"] == step]
        assert completions[step] == want["completions"], step
        for name in ("overlap", "nonempty"):
            assert got[f"eval_verifier/{name}"] == pytest.approx(sum(want["scores"][name]) / PROMPTS), (step, name)
        assert got["eval_verifier/nonempty_pass_rate"] == got["eval_verifier/nonempty"]
        odd = sum(len(r["question"]) % 2 for r in rows)
        assert 0 < odd < PROMPTS
        assert got["eval_verifier/flaky_errors"] == odd and got["eval_verifier/flaky"] == 1.0
        assert got["eval_verifier/flaky_sampled_errors"] == 2 * odd and got["eval_verifier/flaky_unscored"] == 0
        assert got["eval_verifier/completion_tokens"] > 0 and got["eval_verifier/seconds"] > 0
        # two samples per prompt: their mean, and the share of prompts with a sample that passes
        samples = [json.loads(line) for line in (run / "verifier_completions.jsonl").read_text().splitlines()
                   if json.loads(line)["step"] == step]
        assert all(len(r["samples"]) == 2 for r in samples)
        flags = [[float(bool(t.strip())) for t in r["samples"]] for r in samples]
        assert got["eval_verifier/nonempty_sampled"] == pytest.approx(sum(map(sum, flags)) / (2 * PROMPTS))
        assert got["eval_verifier/nonempty_pass_at_n"] == pytest.approx(sum(max(f) for f in flags) / PROMPTS)
        assert got["eval_retention/logp"] == pytest.approx(want["retention"], abs=1e-4)
        assert got["eval_retention/change"] == pytest.approx(want["retention"] - records[0]["eval_retention/logp"],
                                                             abs=1e-4)
    assert records[0]["eval_retention/change"] == 0.0
    assert records[4]["eval_retention/change"] != 0.0  # training moved the held-out likelihood
    # The trainer's own logs are intact: a training record at every step (logging_steps 1), the evaluation
    # steps included, carrying the method's own metrics, none of which went into the verifier records.
    logged = json.loads((run / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    train = [r for r in logged if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all("rewards/chosen" in r for r in train)
    assert not any("rewards/chosen" in r for r in logged if "eval_verifier/overlap" in r)
    sys.modules.pop("verifiers_under_test", None)
    if method == "bnf":
        history = [json.loads(line) for line in (run / "bnf_log_history.jsonl").read_text().splitlines()]
        assert [r["step"] for r in history if "eval_verifier/overlap" in r] == [0, 2, 4]
        # Sampling ran on a forked random state: the same run without any evaluation trains identically.
        plain = {k: v for k, v in cfg.items() if not k.startswith(("bnf_verifier", "bnf_retention"))}
        plain.update(output_dir=str(tmp_path / "plain"), save_strategy="no")
        plain.pop("save_steps")
        run_axolotl("train", plain, tmp_path / "plain_run")
        plain_losses = [json.loads(line).get("loss") for line in (tmp_path / "plain" / "bnf_log_history.jsonl")
                        .read_text().splitlines()]
        assert [x for x in plain_losses if x is not None] == [r["loss"] for r in history if "loss" in r]


def test_two_processes_split_the_prompts_and_give_the_one_process_numbers(tiny_assets, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    for out in (one, two):
        out.mkdir()
    run_axolotl("train", {**_config(tiny_assets, one, "bnf"), "max_steps": 1}, one)
    calls = two / "calls"
    calls.mkdir()
    import os

    os.environ["VERIFIER_CALLS"] = str(calls)
    try:
        run_torchrun({**_config(tiny_assets, two, "bnf"), "max_steps": 1}, two, processes=2)
    finally:
        del os.environ["VERIFIER_CALLS"]
    start_one, start_two = _records(one / "run")[0], _records(two / "run")[0]
    for key, value in start_one.items():
        if key != "eval_verifier/seconds":
            assert start_two[key] == pytest.approx(value), key
    # One line per verifier call: the questions of that process's completions.
    rank0, rank1 = ([json.loads(q) for q in (calls / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1))
    questions = [json.loads(line)["question"] for line in (two / "held_out.jsonl").read_text().splitlines()][:PROMPTS]
    evaluations = 2  # the start and the end of the one-step run
    assert len(rank0) == len(rank1) == evaluations
    for at in range(evaluations):
        assert len(rank0[at]) == len(rank1[at]) == math.ceil(PROMPTS / 2)
        assert sorted(rank0[at] + rank1[at]) == sorted(questions)
