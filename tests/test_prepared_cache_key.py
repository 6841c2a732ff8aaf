"""The prepared-data cache key changes with every input that changes the prepared rows, and only then."""
from __future__ import annotations

import copy
import re
import shutil

import pytest
from conftest import base_config, run_axolotl

from axolotl_bnf_plugin.data.loader import _dataset_hash

JINJA = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


@pytest.fixture
def model_copy(tiny_assets, tmp_path):
    """A private copy of the tiny model + tokenizer, free to overwrite in place."""
    return shutil.copytree(tiny_assets / "model", tmp_path / "model")


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _inputs(tiny_assets, tmp_path):
    from axolotl.utils.dict import DictDefault

    data = tmp_path / "pairs.jsonl"
    shutil.copy(tiny_assets / "pairs_intel.jsonl", data)
    cfg = {"sequence_len": 128, "excess_length_strategy": None, "sample_packing": False, "bnf_rl": "bnf", "seed": 0,
           "chat_template": None, "chat_template_jinja": None}
    datasets = [{"path": str(data), "ds_type": "json", "type": "chatml.intel"}]
    return DictDefault, cfg, datasets, data


def _key(DictDefault, cfg, datasets, tokenizer):
    return _dataset_hash(DictDefault(copy.deepcopy(cfg)), copy.deepcopy(datasets), tokenizer)


# One input changed at a time: (what, change to the config dict, change to the first data set entry).
CHANGES = [
    ("field_prompt added", {}, {"field_prompt": "question"}),
    ("field_chosen", {}, {"field_chosen": "rejected", "field_rejected": "chosen"}),
    ("field_messages", {}, {"field_messages": "conversation"}),
    ("field_system", {}, {"field_system": "sys"}),
    ("type name", {}, {"type": "chatml.prompt_pairs"}),
    ("type dict", {}, {"type": {"field_prompt": "question", "prompt_format": "{prompt}"}}),
    ("bnf_chat_format", {}, {"bnf_chat_format": "text"}),
    ("data set chat_template_jinja", {}, {"chat_template": "jinja", "chat_template_jinja": JINJA}),
    ("data set chat_template name", {}, {"chat_template": "llama3"}),
    ("split", {}, {"split": "other"}),
    ("top-level chat_template_jinja", {"chat_template": "jinja", "chat_template_jinja": JINJA}, {}),
    ("top-level chat_template name", {"chat_template": "chatml"}, {}),
    ("sequence_len", {"sequence_len": 64}, {}),
    ("excess_length_strategy", {"excess_length_strategy": "truncate"}, {}),
    ("sample_packing", {"sample_packing": True}, {}),
    ("bnf_rl", {"bnf_rl": "asft"}, {}),
    ("seed (order of the merged rows)", {"seed": 1}, {}),
]


def test_each_input_that_changes_the_rows_changes_the_key(tiny_assets, tmp_path, model_copy):
    DictDefault, cfg, datasets, _ = _inputs(tiny_assets, tmp_path)
    tokenizer = _tokenizer(model_copy)
    base = _key(DictDefault, cfg, datasets, tokenizer)
    # Deterministic: the same inputs, a tokenizer loaded again, the entry's keys in another order.
    reordered = [dict(reversed(list(datasets[0].items())))]
    assert _key(DictDefault, cfg, reordered, _tokenizer(model_copy)) == base
    keys = {"unchanged": base}
    for what, cfg_change, ds_change in CHANGES:
        changed_datasets = [{**datasets[0], **ds_change}]
        keys[what] = _key(DictDefault, {**cfg, **cfg_change}, changed_datasets, tokenizer)
    same = sorted(what for what, key in keys.items() if what != "unchanged" and key == base)
    assert not same, f"the cache key ignores: {same}"
    assert len(set(keys.values())) == len(keys)  # and no two changes collide


def test_templates_are_keyed_by_content_not_name(tiny_assets, tmp_path, model_copy):
    DictDefault, cfg, datasets, _ = _inputs(tiny_assets, tmp_path)
    tokenizer = _tokenizer(model_copy)
    # chat_template: tokenizer_default names the tokenizer's template: its content is what counts.
    cfg["chat_template"] = "tokenizer_default"
    base = _key(DictDefault, cfg, datasets, tokenizer)
    edited = tokenizer.chat_template.replace("'<|im_end|>'", "'<|im_end|> '")
    assert edited != tokenizer.chat_template
    tokenizer.chat_template = edited
    assert _key(DictDefault, cfg, datasets, tokenizer) != base
    # chat_template_jinja given as a file: the file's content, rewritten under the same name.
    template = tmp_path / "template.jinja"
    template.write_text(JINJA)
    jinja_cfg = {**cfg, "chat_template": "jinja", "chat_template_jinja": str(template)}
    before = _key(DictDefault, jinja_cfg, datasets, tokenizer)
    template.write_text(JINJA.replace(": ", " says: "))
    assert _key(DictDefault, jinja_cfg, datasets, tokenizer) != before


def test_tokenizer_overwritten_at_the_same_path_changes_the_key(tiny_assets, tmp_path, model_copy):
    DictDefault, cfg, datasets, _ = _inputs(tiny_assets, tmp_path)
    base = _key(DictDefault, cfg, datasets, _tokenizer(model_copy))
    tokenizer = _tokenizer(model_copy)
    tokenizer.add_tokens(["<|extra|>"])
    tokenizer.save_pretrained(model_copy)
    added = _key(DictDefault, cfg, datasets, _tokenizer(model_copy))
    assert added != base
    tokenizer = _tokenizer(model_copy)
    tokenizer.add_special_tokens({"pad_token": "<|extra|>"})
    tokenizer.save_pretrained(model_copy)
    assert _key(DictDefault, cfg, datasets, _tokenizer(model_copy)) not in (base, added)


def test_data_file_rewritten_in_place_changes_the_key(tiny_assets, tmp_path, model_copy):
    DictDefault, cfg, datasets, data = _inputs(tiny_assets, tmp_path)
    tokenizer = _tokenizer(model_copy)
    base = _key(DictDefault, cfg, datasets, tokenizer)
    lines = data.read_text().splitlines(keepends=True)
    data.write_text("".join(lines[:-1]))
    assert _key(DictDefault, cfg, datasets, tokenizer) != base


def _cache_line(output: str) -> tuple[str, str]:
    """(what happened, key) from the plugin's one line about the train split's prepared data."""
    match = re.search(r"BNF/ASFT prepared data \(train split\): (reused from \S+|not in cache: preparing|in cache at "
                      r"\S+ but prepared again)[^\n]*\(key ([0-9a-f]{32})\)", output)
    assert match, output[-4000:]
    return match.group(1), match.group(2)


def test_preprocess_then_train_reuses_then_a_changed_tokenizer_rebuilds(tiny_assets, tmp_path, model_copy):
    cfg = base_config(tiny_assets, tmp_path, "bnf", base_model=str(model_copy), max_steps=1)
    pre = run_axolotl("preprocess", cfg, tmp_path / "pre")
    what, key = _cache_line(pre.stdout + pre.stderr)
    assert what == "not in cache: preparing"
    assert (tmp_path / "prepared" / key).is_dir()

    train = run_axolotl("train", cfg, tmp_path / "train")
    output = train.stdout + train.stderr
    assert _cache_line(output) == (f"reused from {tmp_path / 'prepared' / key}", key)
    assert "rows by outcome" not in output

    # The tokenizer saved over the same path with one more token: same name, other rows.
    tokenizer = _tokenizer(model_copy)
    tokenizer.add_tokens(["<|extra|>"])
    tokenizer.save_pretrained(model_copy)
    again = run_axolotl("preprocess", cfg, tmp_path / "again")
    what, new_key = _cache_line(again.stdout + again.stderr)
    assert what == "not in cache: preparing" and new_key != key
    assert "rows by outcome" in again.stdout + again.stderr



def test_writing_the_cache_inside_a_data_directory_keeps_the_key(tiny_assets, tmp_path, model_copy):
    DictDefault, cfg, datasets, _ = _inputs(tiny_assets, tmp_path)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    shutil.copy(tiny_assets / "pairs_intel.jsonl", data_dir / "pairs.jsonl")
    cfg["dataset_prepared_path"] = str(data_dir / "prepared")
    datasets = [{"path": str(data_dir), "ds_type": "json", "type": "chatml.intel"}]
    tokenizer = _tokenizer(model_copy)
    base = _key(DictDefault, cfg, datasets, tokenizer)
    (data_dir / "prepared" / base).mkdir(parents=True)
    (data_dir / "prepared" / base / "data-00000-of-00001.arrow").write_bytes(b"rows")
    assert _key(DictDefault, cfg, datasets, tokenizer) == base
    (data_dir / "more.jsonl").write_text((data_dir / "pairs.jsonl").read_text().splitlines()[0] + "\n")
    assert _key(DictDefault, cfg, datasets, tokenizer) != base
