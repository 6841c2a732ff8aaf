"""The plugin's configuration: the `rl:` translation and the checks on the raw config (the keys themselves
are declared in `args.py`).

Axolotl's `rl:` is a closed enum, so `rl: bnf` / `rl: asft` cannot reach validation as they are. The
plugin's `register` hook sees the raw YAML first and rewrites it: the method moves to `bnf_rl`, `rl` is
removed (so Axolotl takes its SFT builder route, which accepts a plugin trainer, collator and data
loader), and the `datasets:` / `test_datasets:` entries are kept verbatim in `bnf_datasets` /
`bnf_test_datasets`, because validation coerces dataset entries into narrow models that drop the keys
preference formats need (field_chosen, a dict `type:`, ...).
"""
from __future__ import annotations

import copy
import difflib
import json
import os
from pathlib import Path
from typing import Any

from .args import BNFArgs
from .compat import parallelism_settings
from .methods import method_names

DATASET_KEYS = (("datasets", "bnf_datasets"), ("test_datasets", "bnf_test_datasets"))


def _plain(value: Any) -> Any:
    """A deep, plain-Python copy (DictDefault / addict mappings become dicts)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return copy.deepcopy(value)


# Keys of other preference methods or of other fused-loss integrations, with the fix for each.
CONFLICTING_KEYS = {
    "rl_beta": "BNF has no beta; ASFT's temperature is asft_beta",
    "dpo_loss_type": "remove it: rl: bnf / asft are not DPO variants",
    "dpo_label_smoothing": "remove it",
    "dpo_use_weighting": "remove it",
    "dpo_norm_loss": "remove it",
    "dpo_padding_free": "remove it (use sample_packing: true, which rl: bnf / asft support)",
    "orpo_alpha": "ASFT's alignment weight is asft_lambda",
    "simpo_gamma": "remove it",
    "cpo_alpha": "remove it",
    "kto_desirable_weight": "remove it; unpaired data needs no weights with rl: bnf / asft",
    "kto_undesirable_weight": "remove it; unpaired data needs no weights with rl: bnf / asft",
    "liger_fused_linear_cross_entropy": "set it to false: the plugin's fused log-prob op replaces it",
    "cut_cross_entropy": "set it to false: the plugin's fused log-prob op replaces it",
    "chunked_cross_entropy": "set it to false: the plugin's fused log-prob op replaces it",
}


class PluginConfigError(ValueError):
    """A config the plugin cannot run, found before anything is loaded."""


# Axolotl keys that split one sequence (context / sequence parallel: ring attention) or one weight matrix
# (tensor parallel) across processes. The trainer scores each response's tokens with the whole output
# embedding on one process, so neither layout can run; Axolotl would otherwise start and fail (or train
# wrongly) much later. `ring_attn_func` / `heads_k_stride` only tune context parallelism and do nothing
# without it, so they need no check of their own.
PARALLELISM_KEYS = {
    "context_parallel_size": "context parallelism (ring attention)",
    "sequence_parallel_degree": "sequence parallelism (the older name of context_parallel_size)",
    "tensor_parallel_size": "tensor parallelism",
}


def _parallel_degree(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _check_parallelism(cfg: dict, method: str) -> None:
    for key, what in PARALLELISM_KEYS.items():
        value = cfg.get(key)
        degree = _parallel_degree(value)
        if value is not None and (degree is None or degree > 1):
            raise PluginConfigError(
                f"{key}: {value!r} asks for {what}, which rl: {method} does not support: the fused log-prob op "
                f"needs every token of a response and the whole output embedding on one process. Remove "
                f"{key} (or set it to 1); to spread a large model over GPUs use FSDP (fsdp_config) or "
                "DeepSpeed ZeRO, which the plugin supports."
            )
    for key, value, what in parallelism_settings(cfg):  # Axolotl >= 0.21's own parallelism plugins
        raise PluginConfigError(
            f"{key}: {value!r} asks for {what}, which rl: {method} does not support: the fused log-prob op "
            f"needs every token of a response and the whole output embedding on one process. Remove {key} "
            "(or set it to 1); FSDP (fsdp_config) and DeepSpeed ZeRO are the supported ways to shard."
        )
    # DeepSpeed's AutoTP is switched on in its own config as well (what tensor_parallel_size sets).
    ds_config = _deepspeed_config(cfg.get("deepspeed")) if cfg.get("deepspeed") else None
    autotp = (ds_config or {}).get("tensor_parallel") or {}
    if isinstance(autotp, dict) and (_parallel_degree(autotp.get("autotp_size")) or 1) > 1:
        raise PluginConfigError(
            f"deepspeed ({cfg.get('deepspeed')!r}) sets tensor_parallel.autotp_size: {autotp['autotp_size']!r}, "
            f"DeepSpeed's tensor parallelism, which rl: {method} does not support: the fused log-prob op needs "
            "the whole output embedding on one process. Remove tensor_parallel from the DeepSpeed config "
            "(ZeRO stages are supported)."
        )


def _check_raw_config(cfg: dict, method: str) -> None:
    known = set(BNFArgs.model_fields)
    for key in cfg:
        if isinstance(key, str) and key.startswith(("bnf_", "asft_")) and key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(known))}"
            raise PluginConfigError(f"unknown key {key!r} for axolotl_bnf_plugin{hint}")
    for key, fix in CONFLICTING_KEYS.items():
        value = cfg.get(key)
        if value not in (None, False):
            raise PluginConfigError(f"{key!r} cannot be used with rl: {method}: {fix}")
    _check_parallelism(cfg, method)
    if _zero_stage(cfg.get("deepspeed")) == 3:
        _check_zero3(cfg, method)
    if cfg.get("fsdp") or cfg.get("fsdp_config"):
        _check_fsdp(cfg, method)
    _check_model_head(cfg, method)


def _check_fsdp(cfg: dict, method: str) -> None:
    """FSDP1 cannot be served: the fused op gathers the output embedding through FSDP2's own unit; FSDP1's flat
    parameters cannot be gathered that way."""
    fsdp_config = cfg.get("fsdp_config") or {}
    version = cfg.get("fsdp_version") or (fsdp_config.get("fsdp_version") if isinstance(fsdp_config, dict) else None)
    if str(version or 1) != "2":
        raise PluginConfigError(
            f"rl: {method} under FSDP needs FSDP2: set fsdp_version: 2 (this config runs FSDP1, fsdp_version: "
            f"{version!r}), whose sharded output embedding the fused log-prob op can gather"
        )


def _check_model_head(cfg: dict, method: str) -> None:
    """Refuse, before anything is loaded, a base model whose logits go through a transform the fused op does not
    apply (see `model_io.unsupported_head_reason`), read from its config as Axolotl will read it. A config
    that cannot be read here is left to Axolotl, which reports it a moment later."""
    name = cfg.get("base_model_config") or cfg.get("base_model")
    if not name:
        return
    revision = cfg.get("revision_of_model") or cfg.get("model_revision")
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(name), trust_remote_code=cfg.get("trust_remote_code") is True,
                                            **({"revision": revision} if revision else {}))
        overrides = cfg.get("overrides_of_model_config") or cfg.get("model_config")
        for key, value in (overrides.items() if isinstance(overrides, dict) else ()):
            setattr(config, key, value)
    except Exception:  # noqa: BLE001
        return
    from .model_io import unsupported_head_reason

    reason = unsupported_head_reason(config)
    if reason is not None:
        raise PluginConfigError(
            f"rl: {method} cannot train base_model {name!r}, a {getattr(config, 'model_type', '?')!r} model: "
            f"{reason}, so its per-token log-probs would not be the model's own"
        )


def _check_zero3(cfg: dict, method: str) -> None:
    """What cannot run under ZeRO-3: BNF's frozen reference of a policy swapped to NVMe (the copy would share the
    policy's swap folder). Under full fine-tuning otherwise the reference is built partitioned
    (`zero3_reference`); a continued adapter's frozen copy is made before the engine partitions the model; the
    passes that score the data once run after the engine is built."""
    offload = ((_deepspeed_config(cfg.get("deepspeed")) or {}).get("zero_optimization") or {}).get("offload_param")
    if (method == "bnf" and not cfg.get("adapter") and not cfg.get("bnf_precompute_ref")
            and isinstance(offload, dict) and str(offload.get("device", "")).lower() == "nvme"):
        raise PluginConfigError(
            f"rl: bnf with full fine-tuning under DeepSpeed ZeRO-3 with offload_param.device: nvme ('deepspeed': "
            f"{cfg.get('deepspeed')!r}): the frozen reference would be a second partitioned model swapped to the "
            "same NVMe folder as the policy; set bnf_precompute_ref: true (no reference model held), offload "
            "the parameters to the CPU instead, or train an adapter"
        )


def _deepspeed_config(deepspeed: Any) -> dict | None:
    """Axolotl's `deepspeed:` value as a dict (inline, or read from its JSON file); None if unreadable."""
    if isinstance(deepspeed, (str, os.PathLike)):
        try:
            deepspeed = json.loads(Path(deepspeed).read_text())
        except (OSError, ValueError):
            return None
    return deepspeed if isinstance(deepspeed, dict) else None


def _zero_stage(deepspeed: Any) -> int | None:
    """The ZeRO stage of Axolotl's `deepspeed:` value: an inline dict, a JSON file, or (unreadable) its name."""
    if not deepspeed:
        return None
    config = _deepspeed_config(deepspeed)
    if config is None:
        name = str(deepspeed).replace("_", "").replace("-", "").lower()
        return 3 if ("zero3" in name or "stage3" in name) else None
    stage = config.get("zero_optimization", {}).get("stage") if isinstance(config, dict) else None
    return int(stage) if isinstance(stage, (int, str)) and str(stage).isdigit() else None


def translate_raw_config(cfg: dict) -> str | None:
    """Rewrite a raw config that says `rl: bnf` / `rl: asft`; return the method, or None if not ours.

    Also rejects, before anything is loaded, plugin keys that do not exist (with the closest valid one)
    and keys of other methods or fused-loss integrations that cannot apply to BNF / ASFT.
    """
    rl = cfg.get("rl")
    if not isinstance(rl, str) or rl.strip().lower() not in method_names():
        if cfg.get("bnf_compare_probe") or cfg.get("bnf_verifiers"):  # read the data set entries under any trainer
            _keep_dataset_entries(cfg)
        return cfg.get("bnf_rl")
    method = rl.strip().lower()
    _check_raw_config(cfg, method)
    cfg["bnf_rl"] = method
    del cfg["rl"]
    _keep_dataset_entries(cfg)
    return method


def _keep_dataset_entries(cfg: dict) -> None:
    for source, kept in DATASET_KEYS:
        if cfg.get(source) is not None:
            cfg[kept] = _plain(cfg[source])
