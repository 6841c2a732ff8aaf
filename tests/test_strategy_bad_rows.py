"""Axolotl's own DPO / KTO `type:` strategies on bad rows: a row the strategy raises on costs that row,
reported with its number and reason; a strategy that fits no row stops preparation with a clear error."""
from __future__ import annotations

import sys

import pytest
from datasets import Dataset

from axolotl_bnf_plugin.data.axolotl_types import DatasetFormatError
from axolotl_bnf_plugin.data.loader import _prepare_split, format_report
from fixtures.schemas import A_BAD, A_GOOD, SCHEMAS, U, msg

ULTRA = SCHEMAS["argilla/ultrafeedback-binarized-preferences-cleaned"][0]
KTO_MIX = SCHEMAS["argilla/kto-mix-15k"][0]
INDEX_ERROR = "chatml.ultra failed (IndexError: list index out of range)"


from test_adapters import prep_cfg, tokenizer, write_jsonl  # noqa: E402,F401 (tokenizer: a fixture)


def ultra_rows(n=24):
    """n distinct rows in the argilla/ultrafeedback-binarized-preferences-cleaned schema."""
    return [{**ULTRA, "prompt": f"{U} ({i})",
             "chosen": [msg("user", f"{U} ({i})"), msg("assistant", f"{A_GOOD} {i}")],
             "rejected": [msg("user", f"{U} ({i})"), msg("assistant", f"{A_BAD} {i}")]} for i in range(n)]


def only_user_turn(row):
    return {**row, "chosen": row["chosen"][:1]}


def dataset_entry(tmp_path, rows, storage, ds_type):
    """A data set entry read line by line (local JSONL: rows numbered as lines from 1) or by Axolotl's
    loader (parquet: rows numbered from 0)."""
    if storage == "jsonl":
        return {"path": write_jsonl(tmp_path / "data.jsonl", rows), "ds_type": "json", "type": ds_type}
    path = tmp_path / "data.parquet"
    Dataset.from_list(rows).to_parquet(str(path))
    return {"path": str(path), "ds_type": "parquet", "type": ds_type}


def check_accounting(dataset, report, n_rows, expected_dropped):
    """Every row is accounted for exactly once, and the dropped ones are the expected rows for the expected reasons."""
    label, counts, where, unit = report[0]
    assert sum(counts.values()) == n_rows
    assert counts["kept"] == len(dataset) == n_rows - sum(len(rows) for rows in expected_dropped.values())
    assert where == expected_dropped
    table = format_report(report)
    for reason, rows in expected_dropped.items():
        assert f"{label}: {reason}: {unit}s {', '.join(map(str, rows))}" in table, table
    return table


@pytest.mark.parametrize("storage", ["jsonl", "parquet"])
@pytest.mark.parametrize("bad", [7, 0], ids=["row 7", "first row"])
def test_ultrafeedback_row_without_assistant_turn_costs_one_row(tokenizer, tmp_path, storage, bad, caplog):
    rows = ultra_rows(24)
    rows[bad] = only_user_turn(rows[bad])
    entry = dataset_entry(tmp_path, rows, storage, "chatml.ultra")
    with caplog.at_level("INFO"):
        dataset, report = _prepare_split(prep_cfg(), tokenizer, [entry], "train")
    number = bad + 1 if storage == "jsonl" else bad
    table = check_accounting(dataset, report, 24, {INDEX_ERROR: [number]})
    assert report[0][3] == ("line" if storage == "jsonl" else "row")
    assert entry["path"] in table
    # The format is still described from the first row that converts, even when row 0 is the bad one.
    assert any("type chatml.ultra: Axolotl DPO type" in r.getMessage() for r in caplog.records)
    # The kept rows are the good ones, in order, with their own answers.
    decoded = [tokenizer.decode(ex["response_input_ids"][0][ex["response_prompt_len"][0]:]) for ex in dataset]
    assert [d.startswith(f"{A_GOOD} {i}") for d, i in zip(decoded, [i for i in range(24) if i != bad])] == [True] * 23


def test_key_type_and_index_errors_each_cost_one_row(tokenizer, tmp_path):
    rows = ultra_rows(24)
    del rows[3]["prompt"]                  # KeyError: a column absent from this row
    rows[10]["chosen"] = None              # TypeError: None where a message list is expected
    rows[17] = only_user_turn(rows[17])    # IndexError: no assistant turn
    rows[20]["rejected"] = ["question", "answer"]  # TypeError: strings where message dicts are expected
    entry = dataset_entry(tmp_path, rows, "jsonl", "chatml.ultra")
    dataset, report = _prepare_split(prep_cfg(), tokenizer, [entry], "train")
    check_accounting(dataset, report, 24, {
        "chatml.ultra failed (KeyError: 'prompt')": [4],
        "chatml.ultra failed (TypeError: 'NoneType' object is not subscriptable)": [11],
        INDEX_ERROR: [18],
        "chatml.ultra failed (TypeError: string indices must be integers, not 'str')": [21],
    })


def test_kto_strategy_bad_rows(tokenizer, tmp_path):
    rows = [{**KTO_MIX, "label": i % 2 == 0,
             "completion": [msg("user", f"{U} {i}"), msg("assistant", f"{A_GOOD} {i}")]} for i in range(12)]
    rows[2]["completion"] = []             # IndexError
    rows[5]["completion"] = None           # TypeError
    rows[9]["completion"] = [msg("user", U), {"text": "no role"}]  # KeyError
    entry = dataset_entry(tmp_path, rows, "jsonl", "chatml.argilla_chat")
    dataset, report = _prepare_split(prep_cfg(), tokenizer, [entry], "train")
    check_accounting(dataset, report, 12, {
        "chatml.argilla_chat failed (IndexError: list index out of range)": [3],
        "chatml.argilla_chat failed (TypeError: 'NoneType' object is not subscriptable)": [6],
        "chatml.argilla_chat failed (KeyError: 'content')": [10],
    })
    assert not any(dataset["is_pair"])
    kept = [i for i in range(12) if i not in (2, 5, 9)]
    assert [e["response_sign"][0] for e in dataset] == [1 if i % 2 == 0 else -1 for i in kept]


def test_chat_template_type_unknown_role_costs_one_row(tokenizer, tmp_path):
    """chat_template.* rows are read by the plugin with the entry's `roles`: a role outside them costs the row."""
    rows = [{"messages": [msg("user", f"{U} {i}")], "chosen": msg("assistant", f"{A_GOOD} {i}"),
             "rejected": msg("assistant", f"{A_BAD} {i}")} for i in range(8)]
    rows[5]["messages"] = [msg("critic", U)]
    entry = dataset_entry(tmp_path, rows, "parquet", "chat_template.default")
    dataset, report = _prepare_split(prep_cfg(), tokenizer, [entry], "train")
    check_accounting(dataset, report, 8, {"unknown role 'critic'": [5]})


STRATEGY_MODULE = '''
def checked(cfg, dataset_idx=0, **kwargs):
    def transform_fn(sample):
        if sample["prompt"] == "value":
            raise ValueError("prompt is\\n  not a question " + "x" * 300)
        if sample["prompt"] == "attr":
            return {"prompt": sample["prompt"].missing}
        if sample["prompt"] == "none":
            return None
        if sample["prompt"] == "no rejected":
            return {"prompt": "q", "chosen": "a"}
        return {"prompt": sample["prompt"] + "\\n", "chosen": sample["chosen"], "rejected": sample["rejected"]}
    return transform_fn
'''


def test_users_own_strategy_value_attribute_errors_and_bad_output(tokenizer, tmp_path, monkeypatch):
    (tmp_path / "bnf_test_strategies.py").write_text(STRATEGY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "bnf_test_strategies", raising=False)
    rows = [{"prompt": f"question {i}", "chosen": f" yes {i}", "rejected": f" no {i}"} for i in range(10)]
    for i, prompt in ((1, "value"), (4, "attr"), (6, "none"), (8, "no rejected")):
        rows[i]["prompt"] = prompt
    entry = dataset_entry(tmp_path, rows, "jsonl", "bnf_test_strategies.checked")
    dataset, report = _prepare_split(prep_cfg(), tokenizer, [entry], "train")
    name = "bnf_test_strategies.checked"
    where = report[0][2]
    value_reason = next(r for r in where if "ValueError" in r)
    # One line, shortened: a long or multi-line message does not flood the report.
    assert value_reason.startswith(f"{name} failed (ValueError: prompt is not a question xxx")
    assert value_reason.endswith("...)") and len(value_reason) < 220
    check_accounting(dataset, report, 10, {
        value_reason: [2],
        f"{name} failed (AttributeError: 'str' object has no attribute 'missing')": [5],
        f"{name} failed (returned NoneType, not a row)": [7],
        f"{name} failed (no 'rejected' in its output)": [9],
    })


def test_strategy_failing_on_every_row_is_a_clear_error(tokenizer, tmp_path):
    # chatml.intel reads `question`, which ultrafeedback rows do not have: a configuration error.
    entry = dataset_entry(tmp_path, ultra_rows(24), "jsonl", "chatml.intel")
    good = {"path": write_jsonl(tmp_path / "good.jsonl", ultra_rows(4)), "ds_type": "json", "type": "chatml.ultra"}
    for entries in ([entry], [good, entry]):  # also when another data set is usable
        with pytest.raises(DatasetFormatError) as err:
            _prepare_split(prep_cfg(), tokenizer, entries, "train")
        text = str(err.value)
        assert "datasets[%d] (%s)" % (len(entries) - 1, entry["path"]) in text
        assert "Axolotl type 'chatml.intel' failed on 24 of the data set's 24 lines" in text
        assert "chatml.intel failed (KeyError: 'question'): lines 1, 2, 3, 4, 5 (+19 more)" in text


def test_all_rows_bad_for_different_reasons_names_the_first_reasons(tokenizer, tmp_path):
    rows = [only_user_turn(r) for r in ultra_rows(6)]
    rows[2]["chosen"] = None
    rows[4]["chosen"] = None
    entry = dataset_entry(tmp_path, rows, "parquet", "chatml.ultra")
    with pytest.raises(DatasetFormatError) as err:
        _prepare_split(prep_cfg(), tokenizer, [entry], "train")
    text = str(err.value)
    assert "Axolotl type 'chatml.ultra' failed on 6 of the data set's 6 rows" in text
    assert f"{INDEX_ERROR}: rows 0, 1, 3, 5" in text
    assert "chatml.ultra failed (TypeError: 'NoneType' object is not subscriptable): rows 2, 4" in text


def test_passthrough_of_message_lists_explains_the_fix(tokenizer, tmp_path):
    entry = dataset_entry(tmp_path, ultra_rows(3), "jsonl", "passthrough")
    with pytest.raises(DatasetFormatError) as err:
        _prepare_split(prep_cfg(), tokenizer, [entry], "train")
    assert "chat_template.default" in str(err.value)
    assert "passthrough failed ('chosen' is list, not text): lines 1, 2, 3" in str(err.value)


def test_unknown_type_name_is_not_a_row_problem(tokenizer, tmp_path):
    entry = dataset_entry(tmp_path, ultra_rows(3), "jsonl", "chatml.no_such_strategy")
    with pytest.raises(DatasetFormatError, match="cannot load DPO type 'chatml.no_such_strategy'"):
        _prepare_split(prep_cfg(), tokenizer, [entry], "train")


def test_detection_is_not_decided_by_a_bad_first_row(tokenizer, tmp_path):
    """Without `type:`, HH transcripts are told from other chosen/rejected data by the first rows that
    have a value: a first row with a null `chosen` must not make the whole file read as pairs."""
    hh = SCHEMAS["Anthropic/hh-rlhf"][0]
    rows = [{"chosen": None, "rejected": hh["rejected"]}] + [hh] * 3
    dataset, report = _prepare_split(prep_cfg(), tokenizer, [{"path": write_jsonl(tmp_path / "hh.jsonl", rows),
                                                              "ds_type": "json"}], "train")
    check_accounting(dataset, report, 4, {"missing value": [1]})
