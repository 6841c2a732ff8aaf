"""The per-method configs of a comparison: one user config without `rl:`, one derived config per method.

Every derived config is the user's config with only what selects and runs the method changed: `rl:` (and
for IPO `dpo_loss_type`), `output_dir: <output_dir>/<method>`, the plugin line, and the probe key
(`bnf_compare_probe: true`). Model, data, seed, steps, batch sizes and optimiser stay the user's, so the
runs differ in the loss alone. Keys that belong to one family only go to that family: Axolotl's DPO-family
keys (`rl_beta`, `dpo_*`, ...) to its trainers, where `rl_beta` gets a default when the user gives none;
the plugin validates its own methods' configs and refuses those keys there.
"""
from __future__ import annotations

import copy
from typing import Any

from ..methods import method_names

PLUGIN_LINE = "axolotl_bnf_plugin.BNFPlugin"
# Axolotl's own preference trainers this command can run, and how Axolotl (0.19 - 0.21) selects each.
# IPO is `rl: dpo` with `dpo_loss_type: [ipo]` (Axolotl deprecates `rl: ipo` in favour of it).
AXOLOTL_METHODS: dict[str, dict[str, Any]] = {
    "dpo": {"rl": "dpo"},
    "ipo": {"rl": "dpo", "dpo_loss_type": ["ipo"]},
    "simpo": {"rl": "simpo"},
}
# Axolotl's other `rl:` values, refused by name: they are not pairwise offline preference losses on the
# same data (online RL, unpaired KTO, a grouped reward model).
REFUSED_METHODS = {
    "kto": "KTO trains on unpaired (prompt, completion, label) rows, not the pairs every other method gets",
    "grpo": "GRPO is online RL (generation + a reward function), not an offline preference loss",
    "gdpo": "GDPO is online RL (generation + reward functions), not an offline preference loss",
    "ebft": "EBFT is not an offline pairwise preference loss",
    "orpo": "Axolotl's rl: orpo reads its data through its own orpo.* `type:` strategies (it has no chatml.* / "
            "llama3.* DPO types), so the same `datasets:` entries cannot feed it and the other methods",
}
# Keys only Axolotl's DPO-family trainers read; the plugin refuses them for its methods (config.CONFLICTING_KEYS).
AXOLOTL_ONLY_KEYS = ("rl_beta", "dpo_beta", "trl", "dpo_loss_type", "dpo_loss_weights", "dpo_label_smoothing",
                     "dpo_use_weighting", "dpo_norm_loss", "dpo_padding_free", "dpo_use_logits_to_keep",
                     "dpo_use_liger_kernel", "orpo_alpha", "simpo_gamma", "cpo_alpha", "rpo_alpha")
DEFAULT_RL_BETA = 0.1  # TRL's DPO default
# Axolotl hands TRL's CPO trainer `simpo_gamma: None` unless the config sets it, and TRL then fails at the first
# step; these are TRL's CPOConfig defaults for SimPO, with no NLL term (cpo_alpha 0). Beta stays TRL's default
# (0.1) unless the config sets `rl_beta`: far below the SimPO paper's 2-2.5, which the docs say where it matters.
SIMPO_DEFAULTS = {"simpo_gamma": 0.5, "cpo_alpha": 0.0}


class CompareConfigError(ValueError):
    """A config or method list the comparison cannot run, found before anything is trained."""


def known_methods() -> tuple[str, ...]:
    return tuple(AXOLOTL_METHODS) + tuple(method_names())


def check_methods(methods: list[str]) -> list[str]:
    """The methods in order, each once; an unknown or refused one stops the command, named."""
    out = []
    for raw in methods:
        name = str(raw).strip().lower()
        if name in REFUSED_METHODS:
            raise CompareConfigError(f"--methods: {name!r} cannot be compared: {REFUSED_METHODS[name]}")
        if name not in known_methods():
            raise CompareConfigError(f"--methods: unknown method {name!r}; choose from {', '.join(known_methods())}")
        if name not in out:
            out.append(name)
    if not out:
        raise CompareConfigError("--methods: name at least one method")
    return out


def check_user_config(cfg: dict, path: str = "the config") -> None:
    """Refuse what would make the runs differ or fail for a reason other than the method."""
    if not isinstance(cfg, dict):
        raise CompareConfigError(f"{path}: expected a YAML mapping of Axolotl keys, got {type(cfg).__name__}")
    if cfg.get("rl") not in (None, ""):
        raise CompareConfigError(
            f"{path} sets `rl: {cfg['rl']}`: the comparison chooses the method of each run itself; remove the "
            "`rl:` key and name the methods with --methods")
    for key in ("base_model", "datasets", "output_dir"):
        if not cfg.get(key):
            raise CompareConfigError(f"{path} has no `{key}:`, which every compared run needs")
    for key in ("bnf_rl", "bnf_datasets", "bnf_test_datasets"):
        if key in cfg:
            raise CompareConfigError(f"{path} sets `{key}`, which the plugin writes itself; remove it")


def derive_config(cfg: dict, method: str, probe_size: int | None = None) -> dict:
    """The config that runs `method` in the comparison (see the module docstring)."""
    derived = copy.deepcopy(cfg)
    derived["output_dir"] = f"{str(cfg['output_dir']).rstrip('/')}/{method}"
    plugins = list(derived.get("plugins") or [])
    if PLUGIN_LINE not in plugins:
        plugins.append(PLUGIN_LINE)
    derived["plugins"] = plugins
    derived["bnf_compare_probe"] = True
    if probe_size is not None:
        derived["bnf_compare_probe_size"] = probe_size
    # Axolotl refuses packing with any `rl:`; off for every run so that all see the same batches.
    derived.pop("sample_packing", None)
    if method in AXOLOTL_METHODS:
        derived.update(copy.deepcopy(AXOLOTL_METHODS[method]))
        if method in ("dpo", "ipo") and derived.get("rl_beta") is None and derived.get("dpo_beta") is None:
            derived["rl_beta"] = DEFAULT_RL_BETA
        if method == "simpo":
            for key, value in SIMPO_DEFAULTS.items():
                if derived.get(key) is None:
                    derived[key] = value
        if derived["rl"] != "dpo":  # Axolotl accepts dpo_* keys with rl: dpo only
            for key in [k for k in derived if k.startswith("dpo_")]:
                del derived[key]
    else:
        for key in AXOLOTL_ONLY_KEYS:
            derived.pop(key, None)
        derived["rl"] = method
    return derived


def derive_configs(cfg: dict, methods: list[str], probe_size: int | None = None,
                   path: str = "the config") -> dict[str, dict]:
    check_user_config(cfg, path)
    return {method: derive_config(cfg, method, probe_size) for method in check_methods(methods)}
