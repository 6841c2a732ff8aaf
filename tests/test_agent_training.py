"""`axolotl train` on agent preference data (examples/tiny-agent-bnf.yml): tool calls, tool results, a tools
schema and reasoning, rendered by Axolotl's Qwen3 template, for both methods.

The run must read every row, take the steps the row count gives, and move the model the expected way:
the margin log p(chosen final turn) - log p(rejected final turn) grows, measured independently of the
plugin's data path (the template's own rendering through `apply_chat_template(..., tools=...)`, the two
conversations' common token prefix as the context, full logits).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import CPU_KEYS, run_axolotl

from axolotl_bnf_plugin.callbacks import LOG_HISTORY_FILE

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "tiny-agent-bnf.yml"


def example_config(assets: Path, out: Path, method: str) -> dict:
    cfg = yaml.safe_load(EXAMPLE.read_text())
    cfg.update(base_model=str(assets / "model"), rl=method, output_dir=str(out / "run"),
               dataset_prepared_path=str(out / "prepared"), logging_steps=1, **CPU_KEYS)
    cfg["datasets"][0]["path"] = str(assets / "agent_pairs.jsonl")
    return cfg


def as_template_input(conversation: list[dict]) -> list[dict]:
    """What a caller of `apply_chat_template` passes: empty content for calls, arguments as dicts."""
    out = []
    for message in conversation:
        message = {**message, "content": message["content"] or ""}
        if message.get("tool_calls"):
            message["tool_calls"] = [{**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                                     for c in message["tool_calls"]]
        out.append(message)
    return out


@torch.no_grad()
def final_turn_margin(model, tokenizer, template: str, rows: list[dict]) -> float:
    """Mean over rows of log p(chosen) - log p(rejected), over the tokens after the two renderings'
    common prefix (they differ only in the final turn)."""
    total = 0.0
    for row in rows:
        tools = json.loads(row["tools"])
        ids = [tokenizer.apply_chat_template(as_template_input(row[side]), tools=tools, chat_template=template,
                                             tokenize=True, return_dict=False) for side in ("chosen", "rejected")]
        common = next(i for i, (a, b) in enumerate(zip(*ids)) if a != b)
        logps = []
        for seq in ids:
            x = torch.tensor([seq])
            logp = torch.log_softmax(model(x).logits[0, :-1].float(), -1).gather(1, x[0, 1:, None])[:, 0]
            logps.append(logp[common - 1:].sum().item())
        total += logps[0] - logps[1]
    return total / len(rows)


@pytest.mark.parametrize("method", ["bnf", "asft"])
def test_agent_example_trains_tool_calls(tiny_assets, tmp_path, method):
    from axolotl.utils.chat_templates import get_chat_template
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = example_config(tiny_assets, tmp_path, method)
    proc = run_axolotl("train", cfg, tmp_path)
    log = proc.stdout + proc.stderr
    rows = [json.loads(line) for line in (tiny_assets / "agent_pairs.jsonl").read_text().splitlines()]
    # Every row kept: the preparation table has no dropped column for this data set.
    table = log[log.index("rows by outcome"):]
    header, line = table.splitlines()[1:3]
    assert header.split()[2:] == ["rows", "kept", "truncated"], header
    assert line.split()[-3:] == [str(len(rows)), str(len(rows)), "0"], line
    history = [json.loads(line) for line in (tmp_path / "run" / LOG_HISTORY_FILE).read_text().splitlines()]
    train_logs = [r for r in history if "loss" in r]
    held_out = math.ceil(len(rows) * cfg["val_set_size"])
    assert len(train_logs) == math.ceil((len(rows) - held_out) / cfg["micro_batch_size"])
    assert any("eval_loss" in r for r in history)

    tokenizer = AutoTokenizer.from_pretrained(tiny_assets / "model")
    template = get_chat_template(cfg["chat_template"])
    before = final_turn_margin(AutoModelForCausalLM.from_pretrained(tiny_assets / "model"), tokenizer, template, rows[:16])
    after = final_turn_margin(AutoModelForCausalLM.from_pretrained(tmp_path / "run"), tokenizer, template, rows[:16])
    print(f"{method}: margin before {before:.3f}, after {after:.3f}")
    assert after > before + 0.5, (before, after)
