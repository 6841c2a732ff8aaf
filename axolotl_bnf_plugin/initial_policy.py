"""The policy as training starts, scored during training: BNF's live reference.

BNF's reference is the initial policy, whatever that is for the run:
- full fine-tuning: a frozen copy of the model (`FrozenCopy`);
- a fresh adapter, whose initial delta is zero (LoRA's B = 0): the policy with its adapter disabled, which is
  the same function at no memory cost (`DisabledAdapter`);
- an adapter that already changes the model at the start: one continued from an SFT run (`lora_model_dir`,
  the usual SFT-then-preference recipe), or an initialisation that moves the base weights (PiSSA, OLoRA):
  disabling it would score the bare base model, not the starting policy. A frozen second copy of the
  adapter is kept instead and switched in for the reference pass (`AdapterSnapshot`).

Every reference pass runs in eval mode (no dropout), as TRL's reference does, and gives the policy back in
exactly the mode (per module) it had.
"""
from __future__ import annotations

import contextlib
import copy
import logging

import torch

from .model_io import unwrap_peft

LOG = logging.getLogger(__name__)

SNAPSHOT_ADAPTER = "bnf_initial_policy"


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Run the body with every module in eval mode, then restore each module's own `training` flag."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def _kept_requires_grad(model: torch.nn.Module):
    """Restore every parameter's `requires_grad` afterwards (PEFT's adapter switching changes them)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _adapter_modules(peft_model):
    """PEFT's layers and wrappers that hold one set of weights per adapter name."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    return [m for m in peft_model.modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))]


def adapter_is_identity(peft_model) -> bool:
    """True when the adapter does not change the model yet: a LoRA whose every B matrix is zero."""
    config = peft_model.peft_config.get(peft_model.active_adapter)
    if config is None or str(getattr(config, "peft_type", "")).split(".")[-1] != "LORA":
        return False
    names = [n for n, _ in peft_model.named_parameters() if ".lora_B." in n or ".lora_embedding_B." in n]
    if not names:
        return False
    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        return all(not bool(params[n].any()) for n in names)


class FrozenCopy:
    """Full fine-tuning: a frozen copy of the initial policy.

    `shard(copy) -> prepared copy`, when given, is run once before the first reference pass, after the engine
    prepared the policy: under FSDP2 the copy is sharded by the same engine as the policy, so that each
    process holds its shard of the reference, not a whole replica. Until then the copy stays where the policy
    was loaded (the CPU under FSDP: a second copy of the model in host memory until the first step); with
    `cpu_ram_efficient_loading` every process but the first holds empty `meta` weights (`weights_on_meta`),
    and the engine broadcasts the first one's as it shards.
    """

    description = "a frozen copy of the initial policy"

    def __init__(self, model, shard=None, weights_on_meta: bool = False, make_copy=None):
        # `weights_on_meta`: the copy's parameters are empty `meta` tensors (a process whose weights `shard`
        # receives from another); its buffers are copied. `make_copy(model)`: how to copy a model that
        # `deepcopy` cannot (ZeRO-3's partitioned policy: `zero3_reference.partitioned_copy`).
        if make_copy is not None:
            self.model = make_copy(model)
            self.description += ", partitioned by ZeRO-3 like the policy"
        else:
            memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
                    for p in model.parameters()} if weights_on_meta else {}
            self.model = copy.deepcopy(model, memo)
        self.model.eval()
        self.model.requires_grad_(False)
        self._shard = shard
        if shard is not None:
            self.description += ", sharded like the policy at the first reference pass"

    def scoring(self, policy):
        if self._shard is not None:
            shard, self._shard = self._shard, None
            self.model = shard(self.model)
        return contextlib.nullcontext(self.model)


class DisabledAdapter:
    """A fresh adapter (zero delta): the policy itself with its adapter switched off."""

    description = "the base model with the adapter disabled (the adapter starts at zero; no second copy)"

    def __init__(self, model=None):
        self.model = model

    @contextlib.contextmanager
    def scoring(self, policy=None):
        policy = policy if policy is not None else self.model
        with eval_mode(policy), unwrap_peft(policy).disable_adapter():
            yield policy


class AdapterSnapshot:
    """An adapter that already changes the model: a frozen copy of its starting weights, a second PEFT adapter
    switched in for the reference pass. `save_pretrained` (the final model and every checkpoint) is limited to
    the trained adapter, so the copy is never written next to it."""

    description = "the starting policy: base model + a frozen copy of the starting adapter"

    def __init__(self, model):
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        peft_model = unwrap_peft(model)
        self.active = peft_model.active_adapter
        with _kept_requires_grad(peft_model):
            peft_model.add_adapter(SNAPSHOT_ADAPTER, copy.deepcopy(peft_model.peft_config[self.active]))
            state = get_peft_model_state_dict(peft_model, adapter_name=self.active)
            result = set_peft_model_state_dict(peft_model, state, adapter_name=SNAPSHOT_ADAPTER)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise RuntimeError(f"could not copy the starting adapter for the BNF reference: {unexpected[:5]}")
        for name, param in peft_model.named_parameters():
            if f".{SNAPSHOT_ADAPTER}." in name:
                param.requires_grad_(False)
        _save_only(peft_model, self.active)

    @contextlib.contextmanager
    def scoring(self, policy):
        peft_model = unwrap_peft(policy)
        modules = _adapter_modules(peft_model)
        with eval_mode(policy), _kept_requires_grad(peft_model):
            for module in modules:
                module.set_adapter(SNAPSHOT_ADAPTER)
            try:
                yield policy
            finally:
                for module in modules:
                    module.set_adapter(self.active)


def _save_only(peft_model, adapter: str) -> None:
    """Make `peft_model.save_pretrained` save `adapter` unless told otherwise (PEFT saves every adapter)."""
    save = peft_model.save_pretrained

    def save_pretrained(save_directory, *args, selected_adapters=None, **kwargs):
        return save(save_directory, *args, selected_adapters=selected_adapters or [adapter], **kwargs)

    peft_model.save_pretrained = save_pretrained


def live_reference(model, shard=None, weights_on_meta: bool = False, make_copy=None):
    """BNF's reference for `model` as it is now (call before the first update). `shard`, `weights_on_meta`,
    `make_copy`: see `FrozenCopy`."""
    peft_model = unwrap_peft(model)
    if not hasattr(peft_model, "disable_adapter"):
        reference = FrozenCopy(model, shard=shard, weights_on_meta=weights_on_meta, make_copy=make_copy)
    elif adapter_is_identity(peft_model):
        reference = DisabledAdapter(model)
    else:
        reference = AdapterSnapshot(model)
    LOG.info("BNF reference: %s", reference.description)
    return reference
