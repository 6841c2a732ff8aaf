"""Context / sequence / tensor parallel configs are refused by name when the config is read."""
from __future__ import annotations

import json

import pytest
from conftest import base_config, run_axolotl

from axolotl_bnf_plugin.config import PluginConfigError, translate_raw_config

REFUSED_KEYS = ["context_parallel_size", "sequence_parallel_degree", "tensor_parallel_size"]


def _cfg(method: str = "bnf", **keys) -> dict:
    return {"rl": method, "datasets": [{"path": "x.jsonl"}], **keys}


@pytest.mark.parametrize("method", ["bnf", "asft"])
@pytest.mark.parametrize("key", REFUSED_KEYS)
@pytest.mark.parametrize("value", [2, 8, "4"])
def test_parallel_degree_above_one_is_refused_naming_key_and_value(key, value, method):
    cfg = _cfg(method, **{key: value})
    with pytest.raises(PluginConfigError) as err:
        translate_raw_config(cfg)
    message = str(err.value)
    assert f"{key}: {value!r}" in message and f"rl: {method}" in message
    assert cfg["rl"] == method  # refused before anything was rewritten


@pytest.mark.parametrize("key", REFUSED_KEYS)
@pytest.mark.parametrize("value", [None, 1, "1"])
def test_parallel_degree_of_one_is_accepted(key, value):
    assert translate_raw_config(_cfg(**{key: value})) == "bnf"


@pytest.mark.parametrize("key,value", [("ring_attn_func", "varlen_llama3"), ("heads_k_stride", 2)])
def test_context_parallel_options_alone_change_nothing_and_pass(key, value):
    """They only tune ring attention, which Axolotl turns on through context_parallel_size alone."""
    assert translate_raw_config(_cfg(**{key: value, "context_parallel_size": 1})) == "bnf"


def test_other_rl_methods_are_not_checked():
    cfg = {"rl": "dpo", "context_parallel_size": 4}
    assert translate_raw_config(cfg) is None


@pytest.mark.parametrize("inline", [True, False])
def test_deepspeed_autotp_is_refused(tmp_path, inline):
    ds = {"zero_optimization": {"stage": 2}, "tensor_parallel": {"autotp_size": 2}}
    if not inline:
        path = tmp_path / "ds_autotp.json"
        path.write_text(json.dumps(ds))
        ds = str(path)
    with pytest.raises(PluginConfigError, match=r"tensor_parallel\.autotp_size: 2"):
        translate_raw_config(_cfg(deepspeed=ds))
    ok = {"zero_optimization": {"stage": 2}, "tensor_parallel": {"autotp_size": 1}}
    assert translate_raw_config(_cfg(deepspeed=ok)) == "bnf"


def test_axolotl_train_refuses_context_parallel_by_name(tiny_assets, tmp_path):
    cfg = base_config(tiny_assets, tmp_path, "bnf", context_parallel_size=2)
    proc = run_axolotl("train", cfg, tmp_path, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert "PluginConfigError" in output and "context_parallel_size: 2" in output, output[-3000:]
    assert not (tmp_path / "prepared").exists()  # refused before any data was prepared
