"""The Axolotl releases the plugin supports (0.19 on Python 3.11, 0.21 on Python 3.12) and how it installs.

- setup.py states ranges that admit what the environment already has (so `pip install` of the plugin keeps a
  working torch / Axolotl), and each pin set of scripts/pins/ lies inside them.
- Axolotl >= 0.21 loads installed `axolotl.plugins` entry points without a `plugins:` line: `rl: bnf` then
  trains from a config that never names the plugin, and a config that does not use it trains as Axolotl
  alone would. Its own context- and expert-parallel plugins, loaded the same way, are refused by name when
  switched on and change nothing when not.
"""
from __future__ import annotations

import copy
import json
import re
import sys
from importlib.metadata import entry_points, requires, version
from pathlib import Path

import pytest
import yaml
from conftest import base_config, run_axolotl
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.version import Version

from axolotl_bnf_plugin import compat
from axolotl_bnf_plugin.config import PluginConfigError, translate_raw_config
from axolotl_bnf_plugin.summary import LOG_HISTORY_FILE

ROOT = Path(__file__).resolve().parents[1]
# Installed by the user or pinned by Axolotl: a plugin install must never replace them.
KEPT = ("torch", "axolotl", "transformers", "trl", "peft", "datasets", "accelerate")
autoloads = pytest.mark.skipif(
    not compat.loads_installed_plugins(), reason="Axolotl < 0.21 loads only the plugins a config names"
)


def _plugin_requirements(extra: str | None = None) -> dict[str, Requirement]:
    out = {}
    for line in requires("axolotl-bnf-plugin") or []:
        req = Requirement(line)
        is_extra = req.marker is not None and "extra" in str(req.marker)
        if (extra is None and not is_extra) or (extra and is_extra and req.marker.evaluate({"extra": extra})):
            out[req.name.lower()] = req
    return out


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)==([^\s;#]+)", line.strip())
        if match:
            pins[match.group(1).lower().replace("_", "-")] = match.group(2)
    return pins


def test_installed_axolotl_is_a_supported_release():
    low, high = compat.SUPPORTED_AXOLOTL
    assert low <= compat.axolotl_version() < high, compat.axolotl_version()
    assert compat.loads_installed_plugins() == (compat.axolotl_version() >= Version("0.21"))


def test_requirements_are_ranges_that_keep_the_installed_stack():
    reqs = _plugin_requirements()
    for name in KEPT:
        req = reqs[name]
        assert not any(spec.operator in ("==", "===") for spec in req.specifier), f"{req} is an exact pin"
        assert req.specifier.contains(version(name), prereleases=True), f"installed {name} {version(name)} vs {req}"


@pytest.mark.parametrize("pins", sorted((ROOT / "scripts" / "pins").glob("py*.txt")), ids=lambda p: p.stem)
def test_each_pin_set_lies_inside_the_requirements(pins):
    """What the bootstrap builds for each Python satisfies setup.py there (markers evaluated for that Python)."""
    python = pins.stem[2:]
    pinned = _pins(pins)
    assert {"torch", "axolotl"} <= set(pinned), f"{pins.name} must pin torch and axolotl"
    env = {"python_version": python, "python_full_version": python + ".0", "extra": "test"}
    for req in [*_plugin_requirements().values(), *_plugin_requirements("test").values()]:
        if req.marker is not None and not Marker(str(req.marker)).evaluate(env):
            continue
        have = pinned.get(req.name.lower().replace("_", "-"))
        assert have is not None, f"{pins.name} does not pin {req.name}"
        assert req.specifier.contains(have, prereleases=True), f"{pins.name}: {req.name}=={have} vs {req}"


def test_this_environment_holds_its_pin_set():
    pins = _pins(ROOT / "scripts" / "pins" / f"py{sys.version_info[0]}.{sys.version_info[1]}.txt")
    for name in KEPT:
        assert version(name).split("+")[0] == pins[name].split("+")[0], name


def test_entry_point_is_declared():
    assert compat.plugin_entry_point_declared(), [p.value for p in entry_points(group=compat.ENTRY_POINT_GROUP)]


@autoloads
def test_axolotl_lists_the_plugin_and_its_own_parallel_plugins_as_installed():
    from axolotl.integrations.base import get_builtin_plugins

    installed = get_builtin_plugins()
    assert "axolotl_bnf_plugin.BNFPlugin" in installed
    assert "axolotl.integrations.context_parallel.ContextParallelPlugin" in installed
    assert "axolotl.integrations.expert_parallel.ExpertParallelPlugin" in installed


SFT = {"datasets": [{"path": "x.jsonl", "type": "alpaca"}], "sequence_len": 128, "learning_rate": 1e-3}


@pytest.mark.parametrize("raw", [SFT, {**SFT, "rl": "dpo", "rl_beta": 0.1}, {**SFT, "rl": "kto"},
                                 {**SFT, "context_parallel": {"size": 2}, "expert_parallel_size": 2}],
                         ids=["sft", "dpo", "kto", "parallel"])
def test_a_config_not_using_the_plugin_is_left_alone(raw):
    """Every hook Axolotl >= 0.21 calls for every config: register keeps the raw config as it is, and the
    others contribute nothing (the checks of `rl: bnf` configs do not apply)."""
    from axolotl.utils.dict import DictDefault

    from axolotl_bnf_plugin.plugin import BNFPlugin

    plugin = BNFPlugin()
    cfg = copy.deepcopy(raw)
    plugin.register(cfg)
    assert cfg == raw
    validated = DictDefault({**raw, "bnf_rl": None, "bnf_precompute_ref": False, "bnf_shift_metrics": True})
    assert plugin.get_training_args(validated) is None
    assert plugin.load_datasets(validated) is None
    assert plugin.get_trainer_cls(validated) is None
    assert plugin.get_collator_cls_and_kwargs(validated) is None
    assert plugin.add_callbacks_post_trainer(validated, trainer=None) == []
    plugin.pre_model_load(validated)
    plugin.post_trainer_create(validated, trainer=None)


@pytest.mark.parametrize("method", ["bnf", "asft"])
@pytest.mark.parametrize("keys,named", [({"context_parallel": {"size": 2}}, "context_parallel.size: 2"),
                                        ({"context_parallel": {"size": 4, "backend": "ring"}}, "context_parallel.size: 4"),
                                        ({"expert_parallel_size": 2}, "expert_parallel_size: 2"),
                                        ({"expert_parallel_size": "x"}, "expert_parallel_size: 'x'")])
def test_axolotl_parallel_plugins_switched_on_are_refused_by_name(method, keys, named):
    cfg = {"rl": method, "datasets": [{"path": "x.jsonl"}], **keys}
    with pytest.raises(PluginConfigError, match=re.escape(named)) as err:
        translate_raw_config(cfg)
    assert "Plugin" in str(err.value) and f"rl: {method}" in str(err.value)
    assert cfg["rl"] == method  # refused before anything was rewritten


@pytest.mark.parametrize("keys", [{"context_parallel": {"size": 1}}, {"context_parallel": {"backend": "auto"}},
                                  {"expert_parallel_size": 1}, {"expert_parallel_size": None}])
def test_axolotl_parallel_plugins_at_size_one_are_accepted(keys):
    assert translate_raw_config({"rl": "bnf", "datasets": [{"path": "x.jsonl"}], **keys}) == "bnf"


def _load(cfg: dict, tmp_path: Path):
    from axolotl.cli.config import load_cfg

    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    return load_cfg(str(path))


@autoloads
def test_load_cfg_refuses_context_parallel_block_without_plugins_line(tiny_assets, tmp_path):
    """Loaded from its entry point, the plugin still reads (and refuses) what Axolotl's own plugin would run."""
    cfg = base_config(tiny_assets, tmp_path, "bnf", context_parallel={"size": 2})
    del cfg["plugins"]
    with pytest.raises(PluginConfigError, match=re.escape("context_parallel.size: 2")):
        _load(cfg, tmp_path)


@autoloads
def test_load_cfg_translates_rl_bnf_without_plugins_line(tiny_assets, tmp_path):
    cfg = base_config(tiny_assets, tmp_path, "asft", asft_lambda=0.5)
    del cfg["plugins"]
    loaded = _load(cfg, tmp_path)
    assert loaded.bnf_rl == "asft" and not loaded.rl and loaded.asft_lambda == 0.5


@autoloads
def test_rl_bnf_trains_without_plugins_line(tiny_assets, tmp_path):
    """`axolotl train` of a config that never names the plugin, Axolotl's own parallel plugins loaded too."""
    cfg = base_config(tiny_assets, tmp_path, "bnf", max_steps=3)
    del cfg["plugins"]
    proc = run_axolotl("train", cfg, tmp_path)
    output = proc.stdout + proc.stderr
    for plugin in ("axolotl_bnf_plugin.BNFPlugin", "axolotl.integrations.context_parallel.ContextParallelPlugin",
                   "axolotl.integrations.expert_parallel.ExpertParallelPlugin"):
        assert f"Plugin loaded successfully: {plugin}" in output, plugin
    history = [json.loads(line) for line in (tmp_path / "run" / LOG_HISTORY_FILE).read_text().splitlines()]
    train_logs = [r for r in history if "loss" in r]
    assert len(train_logs) == 3 and "bnf/weight_chosen" in train_logs[-1], train_logs[-1:]
    assert "arXiv 2410.04834" in output  # the method card


@autoloads
def test_sft_config_trains_as_axolotl_alone_with_the_plugin_installed(tiny_assets, tmp_path):
    """No `rl:`, no `plugins:`: Axolotl's own SFT path, its data, trainer and collator; nothing of the plugin."""
    cfg = base_config(tiny_assets, tmp_path, "bnf", max_steps=3)
    del cfg["plugins"], cfg["rl"]
    cfg["datasets"] = [{"path": str(tiny_assets / "sft_alpaca.jsonl"), "ds_type": "json", "type": "alpaca"}]
    proc = run_axolotl("train", cfg, tmp_path)
    output = proc.stdout + proc.stderr
    assert "Plugin loaded successfully: axolotl_bnf_plugin.BNFPlugin" in output
    assert not (tmp_path / "run" / LOG_HISTORY_FILE).exists()
    assert "BNFTrainer" not in output and "arXiv 2410.04834" not in output
    assert (tmp_path / "run" / "model.safetensors").exists() or any((tmp_path / "run").glob("*.safetensors"))


def test_ci_subset_names_existing_tests():
    """Each entry of tests/ci_subset.txt (where CI runs a heavy test) still names a test: a renamed test must
    not silently move back onto both environments, nor a stale entry hide one."""
    for line in (ROOT / "tests" / "ci_subset.txt").read_text().splitlines():
        fields = line.split("#")[0].split()
        if not fields:
            continue
        where, node = fields
        assert where in ("3.11", "3.12", "full"), line
        path, _, rest = node.partition("::")
        source = (ROOT / path).read_text()
        name = rest.split("[")[0]
        assert re.search(rf"^def {re.escape(name)}\(", source, flags=re.M), f"{node}: no test {name!r} in {path}"
