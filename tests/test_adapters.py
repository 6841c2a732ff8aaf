"""Every public schema's fixture row -> the exact prompt / completion token ids of the intended text,
through auto-detection and through an explicit `type:`; Axolotl's own types; mixed runs; accounting."""
from __future__ import annotations

import json
import logging

import pytest
from transformers import AutoTokenizer

from axolotl.utils.dict import DictDefault
from axolotl_bnf_plugin.data.axolotl_types import DatasetFormatError
from axolotl_bnf_plugin.data.collator import ResponseBatchCollator
from axolotl_bnf_plugin.data.loader import _prepare_split, format_report
from fixtures.schemas import A_BAD, A_GOOD, SCHEMAS, U, msg


@pytest.fixture(scope="module")
def tokenizer(tiny_assets):
    return AutoTokenizer.from_pretrained(tiny_assets / "model")


def prep_cfg(**overrides):
    return DictDefault({"sequence_len": 256, "excess_length_strategy": None, "dataset_num_proc": None,
                        "chat_template": None, "hf_use_auth_token": False, "shuffle_merged_datasets": False,
                        "seed": 0, **overrides})


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def expected_ids(tokenizer, prompt, response):
    """Direct tokenization of the intended text: (full ids, prompt length)."""
    eos = tokenizer.eos_token_id
    if isinstance(prompt, str):
        prompt_text, full_text = prompt, prompt + response
    else:
        prompt_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        full_text = tokenizer.apply_chat_template(prompt + [response], tokenize=False).rstrip()
    ids = tokenizer(full_text)["input_ids"]
    return (ids if ids[-1] == eos else ids + [eos]), len(tokenizer(prompt_text)["input_ids"])


@pytest.mark.parametrize("how", ["detected", "explicit"])
@pytest.mark.parametrize("schema", list(SCHEMAS))
def test_schema_row_gives_intended_tokens(tokenizer, tmp_path, schema, how, caplog):
    row, ds_type, prompt, responses, paired = SCHEMAS[schema]
    ds_cfg = {"path": write_jsonl(tmp_path / "data.jsonl", [row]), "ds_type": "json"}
    if how == "explicit":
        ds_cfg["type"] = ds_type
    with caplog.at_level(logging.INFO):
        dataset, report = _prepare_split(prep_cfg(), tokenizer, [ds_cfg], "train")
    assert report[0][1] == {"kept": 1}, report
    example = dataset[0]
    assert example["is_pair"] == paired
    assert example["response_sign"] == [sign for _, sign in responses]
    for ids, prompt_len, (response, _) in zip(example["response_input_ids"], example["response_prompt_len"], responses):
        want_ids, want_prompt_len = expected_ids(tokenizer, prompt, response)
        assert ids == want_ids, (tokenizer.decode(ids), tokenizer.decode(want_ids))
        assert prompt_len == want_prompt_len
        assert ids.count(tokenizer.eos_token_id) == tokenizer.decode(want_ids).count(tokenizer.eos_token)
    logged = [r.getMessage() for r in caplog.records if "datasets[0]" in r.getMessage() and ": " in r.getMessage()]
    assert any(("detected: " if how == "detected" else f"type {ds_type}: ") in m for m in logged), logged


@pytest.mark.parametrize("ds_type,fixture", [
    ("chatml.intel", "Intel/orca_dpo_pairs"),
    ("chat_template.argilla_chat", "argilla/ultrafeedback-binarized-preferences-cleaned"),
    ("chatml.ultra", "argilla/ultrafeedback-binarized-preferences-cleaned"),
    ("llama3.icr", "argilla/distilabel-intel-orca-dpo-pairs"),
    ({"field_prompt": "question", "field_chosen": "chosen", "field_rejected": "rejected",
      "prompt_format": "Q: {prompt}\nA:", "chosen_format": " {chosen}", "rejected_format": " {rejected}"},
     "Intel/orca_dpo_pairs"),
])
def test_axolotl_dpo_types_keep_working(tokenizer, tmp_path, ds_type, fixture):
    row = SCHEMAS[fixture][0]
    ds_cfg = {"path": write_jsonl(tmp_path / "data.jsonl", [row]), "ds_type": "json", "type": ds_type}
    dataset, report = _prepare_split(prep_cfg(), tokenizer, [ds_cfg], "train")
    example = dataset[0]
    assert example["is_pair"] and example["response_sign"] == [1, -1]
    for ids, plen, answer in zip(example["response_input_ids"], example["response_prompt_len"], (A_GOOD, A_BAD)):
        assert answer in tokenizer.decode(ids[plen:])
        assert answer not in tokenizer.decode(ids[:plen])
        assert U in tokenizer.decode(ids[:plen])


def test_axolotl_kto_type_for_labelled_rows(tokenizer, tmp_path):
    row = SCHEMAS["argilla/kto-mix-15k"][0]
    ds_cfg = {"path": write_jsonl(tmp_path / "data.jsonl", [row, {**row, "label": False}]), "ds_type": "json",
              "type": "chatml.argilla_chat"}
    dataset, _ = _prepare_split(prep_cfg(), tokenizer, [ds_cfg], "train")
    assert [e["response_sign"] for e in dataset] == [[1], [-1]]
    assert not any(dataset["is_pair"])
    assert tokenizer.decode(dataset[0]["response_input_ids"][0]).endswith(A_GOOD + "<|im_end|>")


def test_hh_prefix_stops_at_last_shared_assistant_turn(tokenizer, tmp_path):
    # Both answers start with the same words: the prompt must still end at "Assistant:".
    base = f"\n\nHuman: {U}\n\nAssistant:"
    row = {"chosen": base + " rivers are calm.", "rejected": base + " rivers are rude."}
    dataset, _ = _prepare_split(prep_cfg(), tokenizer, [{"path": write_jsonl(tmp_path / "d.jsonl", [row]),
                                                         "ds_type": "json"}], "train")
    ids, plen = dataset[0]["response_input_ids"][0], dataset[0]["response_prompt_len"][0]
    assert tokenizer.decode(ids[:plen]) == base
    assert tokenizer.decode(ids[plen:]) == " rivers are calm.<|im_end|>"


def test_mixed_run_batches_carry_signs_and_pairs(tokenizer, tmp_path):
    pairs = [SCHEMAS["argilla/ultrafeedback-binarized-preferences-cleaned"][0]] * 2
    unpaired = [SCHEMAS["trl unpaired preference (conversational)"][0],
                {**SCHEMAS["trl unpaired preference (conversational)"][0], "label": True}]
    sft = [SCHEMAS["chat messages (positives only)"][0]]
    ds_cfgs = [{"path": write_jsonl(tmp_path / f"{name}.jsonl", rows), "ds_type": "json"}
               for name, rows in (("pairs", pairs), ("unpaired", unpaired), ("sft", sft))]
    dataset, report = _prepare_split(prep_cfg(), tokenizer, ds_cfgs, "train")
    assert [sum(entry[1].values()) for entry in report] == [2, 2, 1] and len(dataset) == 5
    batch = ResponseBatchCollator(tokenizer)(list(dataset))
    assert batch["sign"].tolist() == [1, -1, 1, -1, -1, 1, 1]
    assert batch["pair_ids"].tolist() == [0, 0, 1, 1, -1, -1, -1]
    from axolotl_bnf_plugin.methods import batch_normalizer

    assert float(batch_normalizer(batch["pair_ids"], 7)) == 2 + 3  # two pairs, three unpaired responses


TEXT_ROWS = [
    {"prompt": U, "chosen": A_GOOD, "rejected": A_BAD},                    # kept
    {"prompt": U, "chosen": A_GOOD, "rejected": A_GOOD},                   # chosen == rejected
    {"prompt": U, "chosen": "   ", "rejected": A_BAD},                     # empty completion
    {"prompt": U, "chosen": None, "rejected": A_BAD},                      # missing value
    {"prompt": U + " word" * 300, "chosen": A_GOOD, "rejected": A_BAD},    # prompt too long: dropped
    {"prompt": U, "chosen": A_GOOD * 30, "rejected": A_BAD},               # truncated, or dropped as too long
]
CHAT_ROWS = [
    {"chosen": [msg("user", U), msg("assistant", A_GOOD)], "rejected": [msg("user", U), msg("assistant", A_BAD)]},
    {"chosen": [msg("user", U), msg("assistant", A_GOOD)],
     "rejected": [msg("user", "other"), msg("assistant", A_BAD)]},        # chosen/rejected prompts differ
    {"chosen": [msg("user", U)], "rejected": [msg("user", U)]},            # no final assistant turn
    {"chosen": [{"speaker": "x"}], "rejected": [msg("user", U), msg("assistant", A_BAD)]},  # malformed message
    {"chosen": [msg("user", U), msg("critic", A_GOOD)],
     "rejected": [msg("user", U), msg("assistant", A_BAD)]},               # unknown role
]


@pytest.mark.parametrize("strategy", ["drop", "truncate"])
def test_accounting_table_on_dirty_files(tokenizer, tmp_path, strategy, caplog):
    ds_cfgs = [{"path": write_jsonl(tmp_path / "text.jsonl", TEXT_ROWS), "ds_type": "json"},
               {"path": write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS), "ds_type": "json"}]
    dataset, report = _prepare_split(prep_cfg(sequence_len=64, excess_length_strategy=strategy), tokenizer,
                                     ds_cfgs, "train")
    text_counts, chat_counts = report[0][1], report[1][1]
    assert sum(text_counts.values()) == len(TEXT_ROWS) and sum(chat_counts.values()) == len(CHAT_ROWS)
    expected_text = {"kept": 1, "chosen == rejected": 1, "empty completion": 1, "missing value": 1, "too long": 1}
    if strategy == "truncate":
        expected_text["truncated"] = 1
    else:
        expected_text["too long"] += 1
    assert dict(text_counts) == expected_text
    assert dict(chat_counts) == {"kept": 1, "chosen/rejected prompts differ": 1, "no final assistant turn": 1,
                                 "malformed message": 1, "unknown role 'critic'": 1}
    kept = sum(c.get("kept", 0) + c.get("truncated", 0) for c in (text_counts, chat_counts))
    assert len(dataset) == kept
    table = format_report(report)
    for reason in list(expected_text) + list(chat_counts):
        assert reason in table
    assert "text.jsonl" in table and "chat.jsonl" in table
    # Every dropped row is named by its line: TEXT_ROWS[1] (line 2) repeats its chosen answer.
    assert "(" + str(tmp_path / "text.jsonl") + "): chosen == rejected: lines 2" in table
    assert "chosen/rejected prompts differ: lines 2" in table


def test_missing_column_fails_with_path_and_columns(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": U, "chosen": A_GOOD, "answer": A_BAD}])
    with pytest.raises(DatasetFormatError) as err:
        _prepare_split(prep_cfg(), tokenizer, [{"path": path, "ds_type": "json", "type": "bnf.pairs"}], "train")
    assert "bad.jsonl" in str(err.value) and "rejected" in str(err.value) and "'answer'" in str(err.value)
    with pytest.raises(DatasetFormatError, match="cannot tell the data format"):
        _prepare_split(prep_cfg(), tokenizer, [{"path": path, "ds_type": "json"}], "train")


def test_raise_strategy_names_the_fix(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "long.jsonl", [{"prompt": U, "chosen": A_GOOD * 40, "rejected": A_BAD}])
    with pytest.raises(ValueError, match="excess_length_strategy"):
        _prepare_split(prep_cfg(sequence_len=32, excess_length_strategy="raise"), tokenizer,
                       [{"path": path, "ds_type": "json"}], "train")


def test_unknown_plugin_type_is_named(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [SCHEMAS["Intel/orca_dpo_pairs"][0]])
    with pytest.raises(DatasetFormatError, match="bnf.pair'.*bnf.pairs"):
        _prepare_split(prep_cfg(), tokenizer, [{"path": path, "ds_type": "json", "type": "bnf.pair"}], "train")


def test_label_must_be_boolean(tokenizer, tmp_path):
    files = {"bools": [True, False], "ints": [0, 1, 2]}
    ds_cfgs = [{"path": write_jsonl(tmp_path / f"{name}.jsonl",
                                    [{"prompt": "a", "completion": " b", "label": v} for v in values]),
                "ds_type": "json"} for name, values in files.items()]
    dataset, report = _prepare_split(prep_cfg(), tokenizer, ds_cfgs, "train")
    assert dict(report[0][1]) == {"kept": 2}
    assert dict(report[1][1]) == {"kept": 2, "label not boolean": 1}
    assert [e["response_sign"] for e in dataset] == [[1], [-1], [-1], [1]]


def test_data_set_with_no_usable_row_fails_with_its_counts(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "strings.jsonl", [{"prompt": "a", "completion": " b", "label": "yes"}])
    with pytest.raises(DatasetFormatError, match=r"no usable rows(.|\n)*strings.jsonl(.|\n)*label not boolean: lines 1"):
        _prepare_split(prep_cfg(), tokenizer, [{"path": path, "ds_type": "json"}], "train")


def test_chat_format_override_wraps_plain_text(tokenizer, tmp_path):
    row = SCHEMAS["argilla/ultrafeedback-binarized-preferences-cleaned-kto"][0]
    path = write_jsonl(tmp_path / "kto.jsonl", [row])
    dataset, _ = _prepare_split(prep_cfg(), tokenizer, [{"path": path, "ds_type": "json",
                                                         "bnf_chat_format": "chat"}], "train")
    want, plen = expected_ids(tokenizer, [msg("user", U)], msg("assistant", A_BAD))
    assert dataset[0]["response_input_ids"][0] == want and dataset[0]["response_prompt_len"][0] == plen
