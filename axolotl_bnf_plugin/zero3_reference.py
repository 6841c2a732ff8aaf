"""BNF's frozen reference under DeepSpeed ZeRO-3: a copy of the policy partitioned like it, never gathered whole.

Under ZeRO-3 the policy is loaded partitioned (transformers builds it inside `deepspeed.zero.Init`): each process
holds a flat slice of every parameter (`ds_tensor`) and the engine's hooks gather one module's parameters at a
time for its forward. A `deepcopy` of such a model would copy the slices without the machinery that gathers
them. Instead the copy is built empty from the policy's config, inside `zero.Init` as well, so that it gets the
same partitioning, and each process copies its own slice of every parameter into it: no process ever holds
more than its share. The copy is then prepared by DeepSpeed without an optimiser (as TRL prepares its
`ref_model`), which installs the same gather-per-module hooks for its forwards.
"""
from __future__ import annotations

import contextlib
import copy

import torch


def reference_config(ds_config: dict, hidden_size: int) -> dict:
    """The run's DeepSpeed config for a model that is never trained: no optimiser or scheduler, and the
    model-size values left "auto" (which the Trainer fills in for its own engine only) set from the hidden size,
    as transformers sets them."""
    config = copy.deepcopy(ds_config)
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    zero = config.setdefault("zero_optimization", {})
    for key, value in (("reduce_bucket_size", hidden_size * hidden_size),
                       ("stage3_param_persistence_threshold", 10 * hidden_size),
                       ("stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size))):
        if zero.get(key, "auto") == "auto":
            zero[key] = value
    return config


@torch.no_grad()
def partitioned_copy(policy: torch.nn.Module, ds_config: dict) -> torch.nn.Module:
    """A frozen, eval-mode copy of the ZeRO-3-partitioned `policy` (a `PreTrainedModel`), partitioned the same
    way and prepared by DeepSpeed for forwards only. Collective: every process calls it.

    `ds_config`: the run's DeepSpeed config with its batch sizes and precision resolved (as the Trainer's
    arguments hold it); "auto" model sizes and the optimiser may remain.
    """
    import deepspeed
    from transformers.integrations import is_deepspeed_zero3_enabled

    # The partitions' dtype: Axolotl upcasts some modules to fp32 after loading, which changes only the
    # empty `param.data` of a partition; the engine casts the whole model to the run's precision.
    dtype = next(policy.parameters()).ds_tensor.dtype
    text_config = policy.config.get_text_config() if hasattr(policy.config, "get_text_config") else policy.config
    hidden = max(getattr(text_config, "hidden_sizes", None) or [text_config.hidden_size])
    config = reference_config(ds_config, hidden)
    # transformers builds a model inside zero.Init by itself while the run's ZeRO-3 config is active.
    building = torch.no_grad() if is_deepspeed_zero3_enabled() else deepspeed.zero.Init(config_dict_or_path=config,
                                                                                       dtype=dtype)
    with building, _random_init_skipped():
        frozen = type(policy)._from_config(copy.deepcopy(policy.config), dtype=dtype)
    mine, theirs = dict(frozen.named_parameters()), dict(policy.named_parameters())
    if mine.keys() != theirs.keys():
        differ = sorted(set(mine) ^ set(theirs))[:5]
        raise RuntimeError(f"BNF's reference under ZeRO-3: the model rebuilt from its config has other parameters "
                           f"than the policy ({differ}); the policy was changed after loading in a way its config "
                           "does not record. Use bnf_precompute_ref: true, or train an adapter")
    for name, param in theirs.items():
        target = mine[name]
        if param.ds_shape == target.ds_shape and param.ds_tensor.shape == target.ds_tensor.shape:
            target.ds_tensor.copy_(param.ds_tensor)  # this process's slice of the same partitioning
        else:  # a slice held elsewhere (offloaded): one parameter gathered at a time
            with deepspeed.zero.GatheredParameters([param]), \
                    deepspeed.zero.GatheredParameters([target], modifier_rank=0):
                target.data.copy_(param.data)
    buffers = dict(frozen.named_buffers())
    for name, buffer in policy.named_buffers():
        buffers[name].copy_(buffer)
    _copy_module_settings(policy, frozen)
    frozen.requires_grad_(False)
    # Copied before the engine exists: the engine keeps small parameters gathered after their first fetch.
    engine, *_ = deepspeed.initialize(model=frozen, config=config)
    engine.eval()
    object.__setattr__(frozen, "_deepspeed_engine", engine)  # kept alive with the copy, not as a submodule
    return frozen


@contextlib.contextmanager
def _random_init_skipped():
    """transformers initialises a model built under ZeRO-3 by gathering each module, initialising it on the first
    process and broadcasting it: a whole model's worth of collectives, for weights the copy overwrites at once."""
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:  # pragma: no cover
        yield
        return
    initialise = getattr(hf_deepspeed, "initialize_weights_zero3", None)
    if initialise is None:
        yield
        return
    hf_deepspeed.initialize_weights_zero3 = lambda model: None
    try:
        yield
    finally:
        hf_deepspeed.initialize_weights_zero3 = initialise


def _copy_module_settings(policy: torch.nn.Module, frozen: torch.nn.Module) -> None:
    """What the policy's modules hold outside parameters and buffers and may have changed after they were built
    from the config: plain settings (e.g. a rotary embedding's `original_max_seq_len`, fixed at load time, before
    Axolotl raised the config's `max_position_embeddings` to the run's sequence length) and ZeRO-3's leaf-module
    flags (a mixture-of-experts block gathered whole, so that every process gathers the same parameters)."""
    theirs = dict(policy.named_modules())
    for name, module in frozen.named_modules():
        source = theirs.get(name)
        if source is None:
            continue
        for key, value in vars(source).items():
            settable = (not key.startswith(("_", "ds_")) or key == "_z3_leaf") and key not in ("training", "id")
            if settable and isinstance(value, (bool, int, float, str)) and (not hasattr(module, key) or
                                                                            getattr(module, key) != value):
                setattr(module, key, value)
