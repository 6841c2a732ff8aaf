"""Tokenization boundaries, length handling, pairwise examples and the batch collator."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from axolotl_bnf_plugin.data.collator import ResponseBatchCollator
from axolotl_bnf_plugin.data.adapters import Candidate
from axolotl_bnf_plugin.data.examples import candidate_example
from axolotl_bnf_plugin.data.loader import format_report
from axolotl_bnf_plugin.data.tokenize import LengthPolicy, TokenizedResponse, fit_length, tokenize_response


@pytest.fixture(scope="module")
def tokenizer(tiny_assets):
    return AutoTokenizer.from_pretrained(tiny_assets / "model")


def test_completion_tokens_are_those_of_the_full_text(tokenizer):
    prompt = "<|im_start|>user\nTell me about rivers.<|im_end|>\n<|im_start|>assistant\n"
    resp = tokenize_response(tokenizer, prompt, "rivers are calm and kind.<|im_end|>")
    full = tokenizer(prompt + "rivers are calm and kind.<|im_end|>")["input_ids"]
    assert resp.input_ids == full
    assert resp.input_ids[: resp.prompt_len] == tokenizer(prompt)["input_ids"]
    assert resp.input_ids.count(tokenizer.eos_token_id) == prompt.count("<|im_end|>") + 1  # EOS once at the end


def test_eos_is_appended_once_when_missing(tokenizer):
    resp = tokenize_response(tokenizer, "Q: rain?\nA:", " rain is gentle")
    assert resp.input_ids[-1] == tokenizer.eos_token_id
    assert resp.input_ids[-2] != tokenizer.eos_token_id
    assert tokenizer.decode(resp.input_ids[resp.prompt_len:]) == " rain is gentle<|im_end|>"


def test_merge_across_boundary_falls_back_to_separate_tokenization(tokenizer):
    # "rive" + "rs" merges into "rivers" when tokenized together: the prompt must not be re-tokenized.
    prompt, completion = "Tell me about rive", "rs are calm."
    together = tokenizer(prompt + completion)["input_ids"]
    prompt_ids = tokenizer(prompt)["input_ids"]
    resp = tokenize_response(tokenizer, prompt, completion)
    assert resp.input_ids[: resp.prompt_len] == prompt_ids
    if together[: len(prompt_ids)] != prompt_ids:
        assert resp.input_ids[resp.prompt_len:-1] == tokenizer(completion, add_special_tokens=False)["input_ids"]


def test_bos_is_not_doubled():
    from axolotl_bnf_plugin.tiny import build_tokenizer, toy_pairs

    tok = build_tokenizer(toy_pairs(4))
    tok.add_bos_token = True  # tokenizers that add BOS themselves

    class WithBos:
        bos_token, eos_token = tok.bos_token, tok.eos_token
        bos_token_id, eos_token_id = tok.bos_token_id, tok.eos_token_id

        def __call__(self, text, add_special_tokens=True):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            return {"input_ids": ([tok.bos_token_id] if add_special_tokens else []) + ids}

    wrapped = WithBos()
    plain = tokenize_response(wrapped, "Tell me about rain.", " rain is calm.")
    already = tokenize_response(wrapped, "<s>Tell me about rain.", " rain is calm.")
    assert plain.input_ids.count(tok.bos_token_id) == 1
    assert already.input_ids.count(tok.bos_token_id) == 1
    assert plain.input_ids == already.input_ids


@pytest.mark.parametrize("strategy,expected", [("drop", (None, "too long")), ("truncate", "truncated")])
def test_length_policy(strategy, expected):
    resp = TokenizedResponse(list(range(12)), prompt_len=4)
    out, note = fit_length(resp, LengthPolicy(8, strategy))
    if strategy == "drop":
        assert (out, note) == expected
    else:
        assert note == "truncated" and out.input_ids == list(range(8)) and out.prompt_len == 4
    # A prompt that alone fills the budget cannot be truncated into a usable example.
    assert fit_length(TokenizedResponse(list(range(12)), 8), LengthPolicy(8, "truncate")) == (None, "too long")
    with pytest.raises(ValueError, match="excess_length_strategy"):
        fit_length(resp, LengthPolicy(8, "raise"))
    with pytest.raises(ValueError, match="excess_length_strategy"):
        LengthPolicy(8, "shorten")


def test_pair_example_statuses(tokenizer):
    policy = LengthPolicy(64, "drop")

    def pair_example(prompt, chosen, rejected):
        return candidate_example(Candidate(prompt, [(chosen, 1), (rejected, -1)], True), tokenizer, None, policy)

    ok = pair_example("Q ", "calm answer", "rude answer")
    assert ok["bnf_status"] == "kept" and ok["response_sign"] == [1, -1] and ok["is_pair"]
    assert ok["length"] == sum(len(x) for x in ok["response_input_ids"])
    assert pair_example("Q ", "same", "same")["bnf_status"] == "chosen == rejected"
    assert pair_example("Q ", "  ", "x")["bnf_status"] == "empty completion"
    assert pair_example("Q " * 80, "a", "b")["bnf_status"] == "too long"
    chat = Candidate([{"role": "user", "content": "hi"}], [({"role": "assistant", "content": "calm"}, 1)], False)
    assert candidate_example(chat, tokenizer, None, policy)["bnf_status"] == "no chat template"


def test_report_table_lists_every_status():
    from collections import Counter

    table = format_report([("datasets[0] (a.jsonl)", Counter({"kept": 5, "too long": 2})),
                           ("datasets[1] (b.jsonl)", Counter({"kept": 1, "chosen == rejected": 3}))])
    header, first, second = table.splitlines()
    assert header.split()[:4] == ["data", "set", "rows", "kept"]
    assert "too long" in header and "chosen == rejected" in header
    assert first.split()[2:4] == ["7", "5"] and second.split()[2:4] == ["4", "1"]


def test_collator_layout(tokenizer):
    examples = [
        {"response_input_ids": [[5, 6, 7, 8], [5, 6, 9]], "response_prompt_len": [2, 2], "response_sign": [1, -1], "is_pair": True},
        {"response_input_ids": [[5, 10, 11, 12, 13]], "response_prompt_len": [1], "response_sign": [-1], "is_pair": False},
    ]
    batch = ResponseBatchCollator(tokenizer, pad_to_multiple_of=8)(examples)
    assert batch["input_ids"].shape == (3, 8)
    assert batch["sign"].tolist() == [1, -1, -1]
    assert batch["pair_ids"].tolist() == [0, 0, -1]
    assert batch["labels"][0].tolist() == [-100, -100, 7, 8] + [-100] * 4
    assert batch["labels"][2].tolist() == [-100, 10, 11, 12, 13] + [-100] * 3
    assert batch["attention_mask"].sum(1).tolist() == [4, 3, 5]
    assert (batch["input_ids"][1, 3:] == tokenizer.pad_token_id).all()
