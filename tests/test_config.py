"""The plugin's configuration: `rl:` translation, key validation, and clear load-time errors."""
from __future__ import annotations

import json

import pytest
import yaml
from conftest import base_config

from axolotl_bnf_plugin.args import BNFArgs
from axolotl_bnf_plugin.compat import loads_installed_plugins
from axolotl_bnf_plugin.config import translate_raw_config


def test_translation_moves_method_and_keeps_raw_datasets():
    datasets = [{"path": "x.jsonl", "type": {"field_prompt": "q", "field_chosen": "good"}, "field_messages": "m"}]
    cfg = {"rl": "BNF", "datasets": datasets, "test_datasets": [{"path": "t.jsonl"}]}
    assert translate_raw_config(cfg) == "bnf"
    assert "rl" not in cfg and cfg["bnf_rl"] == "bnf"
    assert cfg["bnf_datasets"] == datasets and cfg["bnf_datasets"] is not datasets
    assert cfg["bnf_test_datasets"] == [{"path": "t.jsonl"}]
    # Later in-place coercion of `datasets` by validation must not reach the kept copy.
    datasets[0]["type"]["field_prompt"] = "changed"
    assert cfg["bnf_datasets"][0]["type"]["field_prompt"] == "q"


@pytest.mark.parametrize("rl", ["dpo", "kto", None])
def test_translation_leaves_other_methods_alone(rl):
    cfg = {"rl": rl, "datasets": [{"path": "x"}]}
    assert translate_raw_config(cfg) is None
    assert cfg == {"rl": rl, "datasets": [{"path": "x"}]}


@pytest.mark.parametrize(
    "key,value",
    [("bnf_length_norm", "tokens"), ("asft_lambda", "big"), ("asft_lambda", -1.0), ("asft_beta", 0.0),
     ("asft_sft_weight", -0.5), ("bnf_loss_chunk_size", 0), ("bnf_loss_chunk_size", "auto"),
     ("bnf_kernel_impl", "cuda")],
)
def test_args_model_rejects_bad_values_naming_the_key(key, value):
    with pytest.raises(ValueError, match=key):
        BNFArgs(**{key: value})


def test_args_defaults():
    args = BNFArgs()
    assert (args.bnf_length_norm, args.asft_lambda, args.asft_beta, args.asft_sft_weight) == ("sequence", 1.0, 1.0, 1.0)
    assert args.bnf_loss_chunk_size is None


def _load(cfg: dict, tmp_path):
    from axolotl.cli.config import load_cfg

    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    return load_cfg(str(path))


def test_load_cfg_accepts_rl_bnf_with_plugin(tiny_assets, tmp_path):
    cfg = _load(base_config(tiny_assets, tmp_path, "bnf", asft_lambda=0.5), tmp_path)
    assert cfg.bnf_rl == "bnf" and not cfg.rl
    assert cfg.asft_lambda == 0.5 and cfg.bnf_length_norm == "sequence"
    assert cfg.bnf_datasets[0]["type"] == "chatml.intel"


@pytest.mark.parametrize("key,value", [("bnf_length_norm", "tokens"), ("asft_beta", -2), ("bnf_loss_chunk_size", 0)])
def test_load_cfg_rejects_bad_plugin_key(tiny_assets, tmp_path, key, value):
    with pytest.raises(Exception, match=key):
        _load(base_config(tiny_assets, tmp_path, "asft", **{key: value}), tmp_path)


@pytest.mark.skipif(loads_installed_plugins(), reason="Axolotl >= 0.21 loads the installed plugin: test_axolotl_versions.py")
def test_rl_bnf_without_plugin_fails_naming_rl(tiny_assets, tmp_path):
    cfg = base_config(tiny_assets, tmp_path, "bnf")
    del cfg["plugins"]
    with pytest.raises(Exception, match=r"rl"):
        _load(cfg, tmp_path)


@pytest.mark.parametrize("key,expected", [("bnf_lenght_norm", "did you mean 'bnf_length_norm'"),
                                          ("asft_lamda", "did you mean 'asft_lambda'"),
                                          ("bnf_precompute_reference", "did you mean 'bnf_precompute_ref'")])
def test_unknown_plugin_key_suggests_the_nearest(key, expected):
    from axolotl_bnf_plugin.config import PluginConfigError

    with pytest.raises(PluginConfigError, match=expected):
        translate_raw_config({"rl": "bnf", key: 1})


@pytest.mark.parametrize("key,value,fix", [
    ("rl_beta", 0.1, "BNF has no beta"),
    ("dpo_loss_type", ["sigmoid"], "not DPO variants"),
    ("liger_fused_linear_cross_entropy", True, "set it to false"),
    ("cut_cross_entropy", True, "set it to false"),
    ("orpo_alpha", 0.1, "asft_lambda"),
])
def test_options_that_cannot_apply_are_rejected(key, value, fix):
    from axolotl_bnf_plugin.config import PluginConfigError

    with pytest.raises(PluginConfigError, match=f"'{key}' cannot be used with rl: asft: .*{fix}"):
        translate_raw_config({"rl": "asft", key: value})
    translate_raw_config({"rl": "asft", key: False if value is True else None})  # off: fine


def test_zero3_refuses_only_a_reference_swapped_to_nvme(tmp_path):
    """The stage is read from the file, an inline dict, or (unreadable file) the name. BNF full fine-tuning (a
    partitioned frozen copy), a continued adapter (its copy made before the engine partitions the model) and what
    scores the data once (after the engine is built) are served; a frozen copy of a policy whose parameters are
    swapped to NVMe is refused (it would share the policy's swap folder)."""
    from axolotl_bnf_plugin.config import PluginConfigError

    stage3 = tmp_path / "ds.json"
    stage3.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    for value in (str(stage3), {"zero_optimization": {"stage": 3}}, "deepspeed_configs/zero3_bf16.json"):
        for keys in ({}, {"bnf_precompute_ref": True}, {"adapter": "lora"},
                     {"adapter": "lora", "lora_model_dir": "sft"}):
            translate_raw_config({"rl": "bnf", "deepspeed": value, **keys})
        for scored in ({"val_set_size": 0.1}, {"test_datasets": [{"path": "x"}]}, {"asft_shift_on_train": True}):
            translate_raw_config({"rl": "asft", "deepspeed": value, **scored})
    for device, refused in (("nvme", True), ("cpu", False)):
        offloaded = {"zero_optimization": {"stage": 3, "offload_param": {"device": device, "nvme_path": "/nvme"}}}
        for keys in ({"bnf_precompute_ref": True}, {"adapter": "lora"}):
            translate_raw_config({"rl": "bnf", "deepspeed": offloaded, **keys})
        translate_raw_config({"rl": "asft", "deepspeed": offloaded})
        if refused:
            with pytest.raises(PluginConfigError, match="offload_param.device: nvme.*bnf_precompute_ref: true"):
                translate_raw_config({"rl": "bnf", "deepspeed": offloaded})
        else:
            translate_raw_config({"rl": "bnf", "deepspeed": offloaded})


def test_fsdp_refuses_fsdp1_only():
    """FSDP1 for any method. With cpu_ram_efficient_loading the passes that score the data once run after FSDP2
    has broadcast the weights, and a live BNF reference is sharded at its first pass: all served."""
    from axolotl_bnf_plugin.config import PluginConfigError

    fsdp2 = {"fsdp_version": 2, "fsdp_config": {"reshard_after_forward": True}}
    lazy = {"fsdp_version": 2, "fsdp_config": {"cpu_ram_efficient_loading": True}}
    for method in ("bnf", "asft"):
        for fsdp1 in ({"fsdp_config": {"reshard_after_forward": True}}, {"fsdp": ["full_shard"], "fsdp_version": 1}):
            with pytest.raises(PluginConfigError, match=f"rl: {method} under FSDP needs FSDP2: set fsdp_version: 2"):
                translate_raw_config({"rl": method, **fsdp1})
        translate_raw_config({"rl": method, **fsdp2})
        translate_raw_config({"rl": method, **lazy})
    translate_raw_config({"rl": "bnf", "fsdp_config": {"fsdp_version": 2}})  # the version inside fsdp_config
    translate_raw_config({"rl": "bnf", **lazy, "bnf_precompute_ref": True})
    translate_raw_config({"rl": "asft", **lazy, "val_set_size": 0.1})


def test_bad_config_fails_in_load_cfg_before_any_model(tiny_assets, tmp_path):
    cfg = base_config(tiny_assets, tmp_path, "bnf", bnf_lenght_norm="batch_min")
    cfg["base_model"] = str(tmp_path / "no-such-model")  # would fail differently if anything were loaded
    with pytest.raises(Exception, match="did you mean 'bnf_length_norm'"):
        _load(cfg, tmp_path)


def test_non_causal_lm_is_rejected_before_loading(tmp_path):
    from axolotl.utils.dict import DictDefault

    from axolotl_bnf_plugin.plugin import BNFPlugin

    with pytest.raises(ValueError, match="needs a causal language model.*'t5'"):
        BNFPlugin().pre_model_load(DictDefault({"bnf_rl": "bnf", "model_config_type": "t5", "base_model": "x"}))
    BNFPlugin().pre_model_load(DictDefault({"bnf_rl": "bnf", "model_config_type": "llama", "base_model": "x"}))
