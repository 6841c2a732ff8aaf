"""Fuzzing the data path with malformed rows: nothing crashes, every bad line is reported by its line
number and reason, every good row is kept."""
from __future__ import annotations

import json
import random

import pytest
from transformers import AutoTokenizer

from axolotl.utils.dict import DictDefault
from axolotl_bnf_plugin.data.axolotl_types import DatasetFormatError
from axolotl_bnf_plugin.data.loader import _prepare_split, format_report


@pytest.fixture(scope="module")
def tokenizer(tiny_assets):
    return AutoTokenizer.from_pretrained(tiny_assets / "model")


def cfg(**kw):
    return DictDefault({"sequence_len": 512, "excess_length_strategy": "drop", "dataset_num_proc": None,
                        "chat_template": None, "hf_use_auth_token": False, "shuffle_merged_datasets": False,
                        "seed": 0, **kw})


def good_pair(rng):
    topic = rng.choice(["rain", "rivers", "bread", "stars"])
    return {"prompt": f"Tell me about {topic}.", "chosen": f" {topic} are calm {rng.random():.6f}",
            "rejected": f" {topic} are rude {rng.random():.6f}"}


def good_unpaired(rng):
    return {"prompt": [{"role": "user", "content": "Q?"}],
            "completion": [{"role": "assistant", "content": f"answer {rng.random():.6f} \u2603 \u05e9\u05dc\u05d5\u05dd"}],
            "label": rng.random() < 0.5}


def bad_line(rng, kind_pool, good):
    """One malformed line as bytes."""
    kind = rng.choice(kind_pool)
    row = good(rng)
    key = rng.choice(sorted(row))
    if kind == "invalid utf-8":
        return b'{"prompt": "caf\xe9", "chosen": "x", "rejected": "y"}'
    if kind == "truncated json":
        return json.dumps(row)[: rng.randint(1, 20)].encode()
    if kind == "not an object":
        return json.dumps(rng.choice([[1, 2], 42, "text", None, True])).encode()
    if kind == "wrong type":
        row[key] = rng.choice([123, 4.5, True, [1, 2], {"x": 1}, [{"speaker": "a"}], [None]])
    elif kind == "null":
        row[key] = None
    elif kind == "missing key":
        del row[key]
    elif kind == "empty string":
        row[key] = "" if key != "label" else "maybe"
    elif kind == "huge string":
        row[key] = "word " * 40000 if key != "label" else 7
    return json.dumps(row).encode()


BAD_KINDS = ["invalid utf-8", "truncated json", "not an object", "wrong type", "null", "missing key",
             "empty string", "huge string"]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("good", [good_pair, good_unpaired], ids=["pairwise", "unpaired"])
def test_fuzzed_file_keeps_every_good_row_and_names_every_bad_line(tokenizer, tmp_path, seed, good):
    rng = random.Random(seed)
    lines, good_lines, bad_lines = [], [], []
    for number in range(1, 61):
        if rng.random() < 0.4:
            lines.append(bad_line(rng, BAD_KINDS, good))
            bad_lines.append(number)
        else:
            lines.append(json.dumps(good(rng)).encode())
            good_lines.append(number)
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n\n")  # trailing blank lines are not rows
    dataset, report = _prepare_split(cfg(), tokenizer, [{"path": str(path), "ds_type": "json"}], "train")
    label, counts, where, unit = report[0]
    assert unit == "line" and sum(counts.values()) == 60
    kept = counts.get("kept", 0)
    dropped_lines = sorted(line for lines_ in where.values() for line in lines_)
    # Some "bad" lines are still usable (a wrong type in an unused column, a huge string that drops as
    # too long is reported): what matters is that kept + reported covers every line exactly once and
    # no good line is lost.
    assert kept + len(dropped_lines) == 60
    assert set(dropped_lines) <= set(bad_lines)
    assert len(dataset) == kept >= len(good_lines)
    table = format_report(report)
    for reason, lines_ in where.items():
        assert f"{reason}: lines {lines_[0]}" in table


def test_invalid_utf8_line_is_reported_by_line(tokenizer, tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(json.dumps({"prompt": "a", "chosen": " b", "rejected": " c"}).encode() + b"\n"
                     + b'{"prompt": "\xff\xfe", "chosen": " b", "rejected": " c"}\n'
                     + json.dumps({"prompt": "a", "chosen": [{"role": "assistant", "content": "b"}],
                                   "rejected": " c"}).encode() + b"\n")
    dataset, report = _prepare_split(cfg(), tokenizer, [{"path": str(path), "ds_type": "json"}], "train")
    assert report[0][2] == {"invalid UTF-8": [2]}
    assert len(dataset) == 2  # a string and a message-list response in one column do not break loading


def test_empty_file_is_reported_and_skipped(tokenizer, tmp_path, caplog):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "a", "chosen": " b", "rejected": " c"}) + "\n")
    dataset, report = _prepare_split(cfg(), tokenizer, [{"path": str(empty), "ds_type": "json"},
                                                        {"path": str(good), "ds_type": "json"}], "train")
    assert len(dataset) == 1 and sum(report[0][1].values()) == 0
    with pytest.raises(DatasetFormatError, match="no usable rows in any train data set"):
        _prepare_split(cfg(), tokenizer, [{"path": str(empty), "ds_type": "json"}], "train")


def test_json_array_file_and_unreadable_array(tokenizer, tmp_path):
    array = tmp_path / "rows.json"
    array.write_text(json.dumps([{"prompt": "a", "chosen": " b", "rejected": " c"}, 7]))
    dataset, report = _prepare_split(cfg(), tokenizer, [{"path": str(array), "ds_type": "json"}], "train")
    assert len(dataset) == 1 and report[0][2] == {"not a JSON object": [2]}
    broken = tmp_path / "broken.json"
    broken.write_text('[{"prompt": "a", ')
    with pytest.raises(DatasetFormatError, match="broken.json(.|\\n)*invalid JSON: lines 1"):
        _prepare_split(cfg(), tokenizer, [{"path": str(broken), "ds_type": "json"}], "train")
    jsonl = tmp_path / "starts_with_array.jsonl"
    jsonl.write_text("[1, 2]\n" + json.dumps({"prompt": "a", "chosen": " b", "rejected": " c"}) + "\n")
    dataset, report = _prepare_split(cfg(), tokenizer, [{"path": str(jsonl), "ds_type": "json"}], "train")
    assert len(dataset) == 1 and report[0][2] == {"not a JSON object": [1]}
