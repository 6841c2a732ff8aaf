"""Get what the fused op needs from a causal LM: its final hidden states and its output head.

The model is still called through its own (possibly DDP / FSDP / PEFT-wrapped) forward, so wrappers
see a normal forward and backward; only `logits_to_keep=1` keeps the `[tokens, vocab]` logits from being
built. The final hidden states are taken from the decoder's output by a forward hook. The head is the
model's output embedding (tied or not), with a LoRA delta on `lm_head` folded in, and the model's own
logit post-processing (scale, soft-capping) read from its config.

A mixture-of-experts model whose config sets `output_router_logits` also returns its router load-balancing
loss from the policy's forward (`router_aux_coef`, `forward_hidden(..., router_aux=True)`); every other
forward (reference, precomputed scoring) asks the model not to record router logits at all.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import sys
from dataclasses import dataclass

import torch

from .data.collator import SCORED_LENGTHS, VARLEN_KEYS, scored_lengths
from .kernels import LogitTransform, token_logprobs

IGNORE_INDEX = -100
LOG = logging.getLogger(__name__)


@dataclass
class OutputHead:
    weight: torch.Tensor
    bias: torch.Tensor | None
    transform: LogitTransform
    # The FSDP2 units that hold `weight` (and a LoRA adapter's matrices on the head), gathered for it (see
    # `_whole_output_weight`).
    gathered_units: tuple[torch.nn.Module, ...] = ()

    def release(self) -> None:
        """Reshard the units gathered for a no-grad pass; a gradient pass leaves that to FSDP's backward.

        A unit left gathered after a no-grad pass (the reference pass of a LoRA policy, run with its adapter
        disabled; an evaluation) would be gathered while PEFT re-enables the adapter, and FSDP2 then loses the
        adapter's gradients; an optimiser step before the next backward would leave it holding stale weights.
        Resharding at once also returns the memory.
        """
        if self.gathered_units and not torch.is_grad_enabled():
            for unit in self.gathered_units:
                unit.reshard()
            self.gathered_units = ()


def unwrap(model, keep_peft: bool = False):
    """The underlying `PreTrainedModel`, through DDP/FSDP `.module`, torch.compile and (unless
    `keep_peft`) PEFT wrappers; with `keep_peft`, the PEFT model itself when there is one."""
    while True:
        if keep_peft and hasattr(model, "disable_adapter"):
            return model
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif not keep_peft and hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()
        else:
            return model


def unwrap_peft(model):
    """The PEFT model inside any DDP/FSDP/compile wrappers, or the plain model when there is no adapter."""
    return unwrap(model, keep_peft=True)


# Logit post-processing that some families configure under keys of their own, which `logit_transform` does
# not read: scored with the plain head, such a model would be trained on another distribution.
UNMODELLED_LOGIT_KEYS = {
    "logits_soft_cap": "soft-caps its logits with `logits_soft_cap` (RecurrentGemma)",
    "output_logit_soft_cap": "soft-caps its logits with `output_logit_soft_cap` (xLSTM)",
    "lm_head_multiplier": "multiplies its logits by `lm_head_multiplier` (Falcon-H1)",
}


def unsupported_head_reason(config) -> str | None:
    """Why the fused op cannot score a model with this config the way the model scores itself; None if it can."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key, what in UNMODELLED_LOGIT_KEYS.items():
        value = getattr(text_config, key, None)
        if value is not None and value != 0 and not (key == "lm_head_multiplier" and value == 1):
            return f"it {what} = {value!r}, a transform of the logits the plugin's fused log-prob op does not apply"
    unpadded = getattr(text_config, "unpadded_vocab_size", None)
    vocab = getattr(text_config, "vocab_size", None)
    if unpadded is not None and vocab is not None and unpadded < vocab:
        return (f"its logits keep only the first {unpadded} of the {vocab} output-embedding rows "
                "(`unpadded_vocab_size`), and the fused log-prob op normalises over every row")
    return None


def refuse_unsupported_head(config) -> None:
    """Raise `NotImplementedError` naming the family and the reason when `unsupported_head_reason` has one."""
    reason = unsupported_head_reason(config)
    if reason is not None:
        family = getattr(config, "model_type", None) or type(config).__name__
        architectures = ", ".join(getattr(config, "architectures", None) or [])
        raise NotImplementedError(
            f"rl: bnf / asft cannot train a {family!r} model{f' ({architectures})' if architectures else ''}: "
            f"{reason}, so its per-token log-probs would not be the model's own"
        )


def logit_transform(config) -> LogitTransform:
    """Scale and soft-cap the architecture applies to `lm_head` outputs (Cohere, Granite, Gemma 2/3); a
    family whose logits go through anything else is refused (`refuse_unsupported_head`)."""
    refuse_unsupported_head(config)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = None
    if getattr(text_config, "logit_scale", None) is not None:
        scale = float(text_config.logit_scale)
    if getattr(text_config, "logits_scaling", None) not in (None, 1, 1.0):
        scale = (scale or 1.0) / float(text_config.logits_scaling)
    softcap = getattr(text_config, "final_logit_softcapping", None)
    return LogitTransform(scale=scale, softcap=float(softcap) if softcap else None)


def _is_dtensor(tensor: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(tensor, DTensor)


def local_bytes(param: torch.Tensor) -> int:
    """Bytes of `param` this process holds: its shard under FSDP2 (a DTensor) or ZeRO-3 (`ds_tensor`)."""
    if hasattr(param, "ds_tensor"):
        local = param.ds_tensor
    else:
        local = param.to_local() if hasattr(param, "to_local") else param
    return local.numel() * local.element_size()


def head_shape(weight: torch.Tensor) -> tuple[int, int]:
    """The whole `[V, H]` shape of an output embedding, without gathering it: DeepSpeed ZeRO-3 partitions a
    parameter to shape `(0,)` and keeps its whole shape as `ds_shape`; an FSDP2 DTensor reports its global shape."""
    shape = tuple(getattr(weight, "ds_shape", weight.shape))
    if len(shape) != 2:
        raise ValueError(f"the output embedding's weight has shape {shape}, not [vocab, hidden]")
    return shape[0], shape[1]


def _fsdp_unit_of(top: torch.nn.Module, module: torch.nn.Module) -> torch.nn.Module | None:
    """The FSDP2 unit that manages `module`'s parameters: its innermost `fully_shard`-ed ancestor (itself
    included) within `top`, or None."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return None
    path = next((name for name, m in top.named_modules() if m is module), None)
    if path is None:
        return None
    parts = path.split(".") if path else []
    for depth in range(len(parts), -1, -1):
        candidate = top.get_submodule(".".join(parts[:depth]))
        if isinstance(candidate, FSDPModule):
            return candidate
    return None


def _whole_output_weight(base, head: torch.nn.Module, top: torch.nn.Module | None = None
                         ) -> tuple[torch.Tensor, tuple[torch.nn.Module, ...]]:
    """The whole `[V, H]` output embedding, gathered if FSDP2 holds it sharded; never a shard.

    Under FSDP2 the head may have been resharded after its unit's forward: always when the head (or the
    input embedding it is tied to) is a unit of its own, and also when it shares the root unit (the usual
    layout: decoder layers wrapped, the rest in the root) and the root was sharded with
    `reshard_after_forward=True`, as accelerate's FSDP2 plugin and Axolotl do. `unshard()` of the unit that
    manages the weight (`_fsdp_unit_of`, searched from `top`, the outermost model) gathers it again, and
    FSDP's post-backward reduce-scatters its gradient and reshards it, as for any unit whose parameters were
    used. Axolotl shards a LoRA adapter's matrices on the head as units of their own: those are gathered too.
    ZeRO-3 gathers a module's parameters only while that module runs, so `response_token_logps` scores inside
    a call of the head (see `_score_inside_head_call`), where this sees the gathered weight. Anything still not
    `[V, H]` (FSDP1's flat views, a ZeRO-3 partition outside that call) is refused, never scored as a slice of
    the vocabulary. Returns the weight and the FSDP2 units that hold it and the head's adapter (gathered now or
    kept gathered since their forward), for `OutputHead.release`.
    """
    weight, units = head.weight, []
    unit = _fsdp_unit_of(top if top is not None else base, head)
    if unit is not None:
        if _is_dtensor(weight):
            unit.unshard()
            weight = head.weight
        units.append(unit)
    for inner in head.modules():  # a LoRA layer's lora_A / lora_B sharded on their own (Axolotl's FSDP2 prepare)
        if inner is not unit and _is_fsdp_module(inner) and any(_is_dtensor(p) for p in inner.parameters()):
            inner.unshard()
            units.append(inner)
    in_features = getattr(head, "in_features", None)
    if _is_dtensor(weight) or weight.dim() != 2 or (in_features is not None and weight.shape[1] != in_features):
        raise NotImplementedError(
            f"rl: bnf / asft: the output embedding is sharded ({type(weight).__name__} of shape "
            f"{tuple(weight.shape)}: FSDP1, or a layout whose head cannot be gathered, such as a LoRA adapter "
            "on lm_head under ZeRO-3) and the fused log-prob op needs all of it; use DDP, FSDP2 "
            "(fsdp_version: 2) or DeepSpeed ZeRO-1/2/3 with a plain lm_head"
        )
    return weight, tuple(units)


def _is_fsdp_module(module: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return False
    return isinstance(module, FSDPModule)


@contextlib.contextmanager
def resharded_after_each_forward(model):
    """FSDP2: every unit resharded after its forward, whatever its `reshard_after_forward`, for no-grad passes
    (nothing changes for a model without FSDP2 units).

    A unit that keeps its weights gathered after its forward is resharded by its backward; a pass without a
    backward (scoring the data once with the initial policy) would leave every layer gathered: a whole replica
    of the model on each process.
    """
    from torch.distributed.fsdp import FSDPModule

    handles = [module.register_forward_hook(lambda unit, *_: unit.reshard())
               for module in model.modules() if isinstance(module, FSDPModule)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def keep_head_gathered_through_backward(model) -> list[torch.nn.Module]:
    """FSDP2: the root unit, and the unit that holds the output embedding, stay gathered from their forward to
    their backward.

    accelerate's FSDP2 prepare (and Axolotl's) passes `reshard_after_forward=True` to every `fully_shard`, the
    root's included (torch keeps a root gathered by default, as its backward comes right after). The fused op
    needs the head right after the forward: resharded, it would be gathered a second time per forward. And the
    loss reaches the root's own weights (the final norm) through the decoder's hidden states, not through the
    root's outputs, where FSDP2 hooks the gathering for backward: a root resharded after its forward would be
    differentiated through freed weights. Returns the units changed (none without FSDP2).
    """
    root = next((m for m in model.modules() if _is_fsdp_module(m)), None)
    head = unwrap(model).get_output_embeddings()
    units = [root] if root is not None else []
    unit = _fsdp_unit_of(model, head) if head is not None and _is_dtensor(head.weight) else None
    if unit is not None and unit is not root:
        units.append(unit)
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
    return units


def output_head(model) -> OutputHead:
    """The output head as the fused op needs it, gathered in full (see `_whole_output_weight`)."""
    base = unwrap(model)
    head = base.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(base).__name__} has no output embedding: rl: bnf / asft needs a causal LM head")
    weight, gathered = _whole_output_weight(base, head, top=model)
    if hasattr(head, "get_delta_weight") and hasattr(head, "active_adapters"):
        # A LoRA layer on lm_head: score with the adapted weight, differentiably w.r.t. the adapter,
        # unless the adapter is disabled (reference pass) or already merged into the base weight.
        if not head.disable_adapters and not head.merged:
            for name in head.active_adapters:
                if name in getattr(head, "lora_A", {}):
                    weight = weight + head.get_delta_weight(name)
        bias = getattr(head.get_base_layer(), "bias", None)
    else:
        bias = getattr(head, "bias", None)
    return OutputHead(weight=weight, bias=bias, transform=logit_transform(base.config), gathered_units=gathered)


@contextlib.contextmanager
def capture_final_hidden(model):
    """Yield a list that receives the decoder's last hidden state during the next forward."""
    base = unwrap(model)
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    if decoder is None or decoder is base:
        raise ValueError(f"cannot find the decoder of {type(base).__name__}; rl: bnf / asft needs a causal LM")
    captured: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        captured.append(hidden)

    handle = decoder.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _router_logits_on(model) -> bool:
    """Whether the model's config sets `output_router_logits` (its forward then records router logits and
    computes the load-balancing loss unless told otherwise)."""
    config = getattr(unwrap(model), "config", None)
    return config is not None and getattr(_text_config(config), "output_router_logits", None) is True


def router_aux_coef(model) -> float | None:
    """`router_aux_loss_coef` when the model's config sets `output_router_logits` (an MoE model whose router
    load-balancing loss is to be trained), else None: nothing is recorded or added then."""
    if not _router_logits_on(model):
        return None
    base = unwrap(model)
    config = base.config
    coef = getattr(_text_config(config), "router_aux_loss_coef", None)
    if coef is None:
        coef = getattr(base, "router_aux_loss_coef", None)
    if coef is None:
        raise ValueError(
            f"{type(base).__name__}: output_router_logits is set but the config has no router_aux_loss_coef; set "
            "both under `model_config:` (e.g. `model_config: {output_router_logits: true, "
            "router_aux_loss_coef: 0.001}`)"
        )
    return float(coef)


def _standard_balancing_loss(base):
    """The architecture's `load_balancing_loss_func(gate_logits, num_experts, top_k, attention_mask)` with its
    expert counts, or None where its module has no such function (or one with other parameters)."""
    fn = getattr(sys.modules.get(type(base).__module__), "load_balancing_loss_func", None)
    experts, top_k = getattr(base, "num_experts", None), getattr(base, "num_experts_per_tok", None)
    if fn is None or experts is None or top_k is None:
        return None
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # pragma: no cover
        return None
    if params != ["gate_logits", "num_experts", "top_k", "attention_mask"]:
        return None
    return lambda router_logits, mask: fn(router_logits, experts, top_k, mask)


_warned_padded_aux = set()


def _router_aux_loss(model, outputs, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's router load-balancing loss over the batch's real tokens (padding excluded).

    An unpacked batch carries its padding mask, and the model's own `aux_loss` already used it. A packed batch
    has no attention mask (the position ids keep its responses apart), so the model counted the padding at the
    end of its rows as tokens: the loss is computed again from the recorded router logits with the batch's
    token mask (`response_index >= 0`), so packed and unpacked layouts of the same examples give the same
    aux loss.
    """
    base = unwrap(model)
    aux = getattr(outputs, "aux_loss", None)
    router_logits = getattr(outputs, "router_logits", None)
    if "attention_mask" not in batch and "response_index" in batch and isinstance(router_logits, tuple) \
            and router_logits:
        balancing = _standard_balancing_loss(base)
        if balancing is not None:
            aux = balancing(router_logits, batch["response_index"] >= 0)
        elif type(base).__name__ not in _warned_padded_aux:
            _warned_padded_aux.add(type(base).__name__)
            LOG.warning(
                "%s: the router load-balancing loss of packed batches counts their padding tokens (the "
                "architecture's own aux loss is used as is)", type(base).__name__)
    if aux is None:
        raise RuntimeError(
            f"{type(base).__name__}: the config sets output_router_logits but the forward returned no aux_loss, "
            "so the router load-balancing loss cannot be trained; unset output_router_logits or use a model "
            "whose forward returns it"
        )
    if not torch.is_tensor(aux):  # a model without router layers returns the number 0
        aux = torch.as_tensor(float(aux))
    return aux.float()


class _AttributeDict(dict):
    """A parameter dict that takes attributes: DeepSpeed's engine marks every submodule's `_parameters` (its
    `ZeROOrderedDict`) as in forward, through an attribute, at each forward."""


class _NoHead(torch.nn.Module):
    """Stands in for the output embedding during a forward whose logits are not used: an empty `[..., 0]`.
    Reads of the head's attributes (a forward that casts to `lm_head.weight.dtype`) reach the head, whose
    parameters are not registered here."""

    def __init__(self, head: torch.nn.Module):
        super().__init__()
        self._parameters = _AttributeDict()
        object.__setattr__(self, "_head", head)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_head"), name)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden[..., :0]


@contextlib.contextmanager
def _head_not_called(model):
    """The model's forward without its own output-embedding call (its logits come back empty).

    Where the head is loaded for each call (ZeRO-3 gathers it from every process, accelerate's hook loads an
    offloaded one), the model's own `logits_to_keep=1` call would load it a second time per forward, next to
    the fused op's call.
    """
    base = unwrap(model)
    head = base.get_output_embeddings()
    parent, name = next((module, child_name) for module in base.modules()
                        for child_name, child in module.named_children() if child is head)
    setattr(parent, name, _NoHead(head))
    try:
        yield
    finally:
        setattr(parent, name, head)


def forward_hidden(model, batch: dict[str, torch.Tensor], router_aux: bool = False, own_head: bool = True):
    """(final hidden states [R, L, H], the model's own logits at the last position or None).

    With `router_aux` (the policy's forward), a third item: the router load-balancing loss (fp32 scalar) when
    the model's config sets `output_router_logits`, else None. A model whose config sets the flag is told
    `output_router_logits=False` in every other forward, so that no router logits are recorded there; without
    the flag the model is called exactly as before. Without `own_head` the model's own output-embedding call is
    skipped (`_head_not_called`) and the logits item is None.
    """
    kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    rows = batch["input_ids"].shape[0]
    varlen = "cu_seq_lens_q" in batch and _varlen_attention(model)
    if varlen:
        # A packed batch under a varlen attention kernel: its rows as one row, with its sequences' boundaries.
        # transformers derives the boundaries from position ids for a batch of one row only, and kernels that
        # take `cu_seq_lens` (flash-attention, linear-attention layers of hybrid models) expect one row.
        kwargs["input_ids"] = kwargs["input_ids"].reshape(1, -1)
        kwargs["position_ids"] = kwargs["position_ids"].reshape(1, -1)
        kwargs.update({k: batch[k] for k in VARLEN_KEYS})
    want_aux = router_aux and _router_logits_on(model)
    if _router_logits_on(model):
        kwargs["output_router_logits"] = want_aux
    with capture_final_hidden(model) as captured, \
            contextlib.nullcontext() if own_head else _head_not_called(model):
        outputs = model(**kwargs, logits_to_keep=1, use_cache=False, return_dict=True)
    if len(captured) != 1:
        raise RuntimeError(f"expected one decoder forward, saw {len(captured)}")
    hidden = captured[0].view(rows, -1, captured[0].shape[-1]) if varlen else captured[0]
    last_logits = getattr(outputs, "logits", None) if own_head else None
    if not router_aux:
        return hidden, last_logits
    return hidden, last_logits, _router_aux_loss(model, outputs, batch) if want_aux else None


# Attention implementations whose kernels take a packed row's sequence boundaries (`cu_seq_lens_q/k`):
# flash-attention 2 / 3 and its hub kernels, xformers, and varlen variants.
VARLEN_ATTENTION = ("flash", "xformers", "varlen")


def _varlen_attention(model) -> bool:
    implementation = str(getattr(getattr(unwrap(model), "config", None), "_attn_implementation", "") or "")
    return any(name in implementation for name in VARLEN_ATTENTION)


def response_token_logps(model, batch: dict[str, torch.Tensor], chunk_size: int | None = None,
                         check_head: bool = False, impl: str = "auto", grad_rule=None, grad_inputs=None,
                         router_aux: bool = False, with_lse: bool = False):
    """Per-token (logp, neg_entropy, scored mask), each `[R, L]`, of every row's own next tokens.

    Position t scores label t + 1 (the usual causal shift); only tokens whose label is not -100 are
    scored, and the fused op never forms the `[R * L, V]` logits. With `check_head`, the model's own
    last-position logits are compared with the op's projection first (see `check_head_matches`).
    `grad_rule` / `grad_inputs`: a loss's gradient rule and its per-position inputs `[R, L]`, for the
    single-pass gradient (see `kernels.token_logprobs`); an item after the mask then holds the rule's
    d loss / d logp `[R, L]` (0 where unscored). With `router_aux` (the policy's forward), a last item: the
    router load-balancing loss, or None (see `forward_hidden`). With `with_lse` (scoring only), an
    item after the mask: each position's log-partition log Z `[R, L]` (0 where unscored), so the label logit
    is `logp + log Z` (`kernels.token_logprobs(return_lse=True)`), from the same chunks, no extra pass.
    """
    head_module = unwrap(model).get_output_embeddings()
    # A head loaded for each call of its module (ZeRO-3, an offloaded head) is loaded once per forward: in the
    # op's call (`_score_inside_head_call`), not also in the model's own (needed only to check the head).
    in_head_call = hasattr(head_module.weight, "ds_id") or hasattr(head_module, "_hf_hook")
    hidden, last_logits, *aux = forward_hidden(model, batch, router_aux=router_aux,
                                               own_head=check_head or not in_head_call)
    rows, length, width = hidden.shape
    labels = batch["labels"]
    targets = torch.cat([labels[:, 1:], labels.new_full((rows, 1), IGNORE_INDEX)], dim=1)
    segment_lengths = None
    if grad_rule is not None and getattr(grad_rule, "over_segments", False):
        segment_lengths = batch.get(SCORED_LENGTHS)
        if segment_lengths is None:  # a batch not from the plugin's collator: one device sync
            segment_lengths = scored_lengths(batch["response_index"], batch["scored_index"], batch["sign"].shape[0])

    def score(flat_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        head = output_head(model)
        try:
            # A model spread over devices in one process (`device_map`): the op runs on the head's device,
            # and its per-token results come back to the batch's.
            to_head = _mover(head.weight.device)
            if check_head:
                check_head_matches(model, to_head(hidden), to_head(last_logits), head)
            results = token_logprobs(
                to_head(flat_hidden),
                head.weight,
                to_head(targets.reshape(-1)),
                bias=head.bias,
                ignore_index=IGNORE_INDEX,
                chunk_size=chunk_size,
                softcap=head.transform.softcap,
                scale=head.transform.scale,
                impl=impl,
                row_index=to_head(batch.get("scored_index")),
                grad_rule=grad_rule,
                grad_inputs=None if grad_inputs is None else tuple(to_head(t) for t in grad_inputs),
                return_lse=with_lse,
                segment_lengths=segment_lengths,
            )
            return tuple(t.to(labels.device) for t in results)
        finally:
            head.release()

    if in_head_call:
        logp, neg_entropy, *extra = _score_inside_head_call(head_module, score, hidden.reshape(-1, width))
    else:
        logp, neg_entropy, *extra = score(hidden.reshape(-1, width))
    return (logp.view(rows, length), neg_entropy.view(rows, length), targets != IGNORE_INDEX,
            *(t.view(rows, length) for t in extra), *aux)


def _mover(device: torch.device):
    """`tensor.to(device)` for tensors (and None) not already there."""
    if device.type == "meta":
        raise RuntimeError(
            "the output embedding's weight is on the 'meta' device, with no accelerate hook to load it: a "
            "device_map that offloads lm_head must be applied with accelerate's dispatch (as transformers' "
            "from_pretrained(device_map=...) does); otherwise keep lm_head on a device, or shard the model with "
            "FSDP2 / DeepSpeed ZeRO-3"
        )
    return lambda t: t if t is None or t.device == device else t.to(device)


def _score_inside_head_call(head_module: torch.nn.Module, score, flat_hidden: torch.Tensor):
    """Run `score(flat_hidden)` as the forward of `head_module`, so the engine handles the head as usual.

    DeepSpeed ZeRO-3 gathers a module's parameters in its pre-forward hook and partitions them again after; it
    gathers them again before the module's outputs receive their gradient and reduce-scatters the weight's
    gradient. Called this way, the fused op sees the whole weight in forward and in backward, and the gradient
    takes ZeRO-3's own path. accelerate's dispatch hook (`device_map`) likewise loads an offloaded head onto
    its execution device for the call (the op keeps what its backward needs) and offloads it again after.
    """
    # accelerate's hook wraps the module's forward in an instance attribute and calls `_old_forward` inside it.
    attribute = "_old_forward" if hasattr(head_module, "_hf_hook") else "forward"
    had_own = attribute in head_module.__dict__
    own = head_module.__dict__.get(attribute)
    setattr(head_module, attribute, score)
    try:
        return head_module(flat_hidden)
    finally:
        if had_own:
            setattr(head_module, attribute, own)
        else:
            delattr(head_module, attribute)


@torch.no_grad()
def check_head_matches(model, hidden: torch.Tensor, last_logits: torch.Tensor | None, head: OutputHead) -> None:
    """Fail loudly if `transform(lm_head(final hidden))` is not the model's own logits.

    An architecture that post-processes logits in a way this module does not know would otherwise be
    trained on the wrong distribution without any sign of it.
    """
    if last_logits is None:
        return
    theirs = last_logits[:, -1].float()
    # The model's logits are of its last row's last position (one row for a packed batch run as one row).
    last = hidden[-theirs.shape[0]:, -1]
    ours = head.transform.apply(torch.nn.functional.linear(last, head.weight, head.bias).float())
    if ours.shape != theirs.shape:
        raise RuntimeError(
            f"{type(unwrap(model)).__name__}: the model's logits have {theirs.shape[-1]} columns but its output "
            f"embedding has {ours.shape[-1]} rows; the fused log-prob op normalises over every row, so rl: bnf / "
            "asft would train on the wrong distribution"
        )
    tol = 1e-3 if hidden.dtype == torch.float32 else 5e-2
    err = (ours - theirs).abs().max().item()
    if err > tol * (1.0 + theirs.abs().max().item()):
        raise RuntimeError(
            f"{type(unwrap(model)).__name__}: lm_head(final hidden state) differs from the model's logits by "
            f"{err:.3g}; the architecture post-processes logits in a way the plugin does not know, so "
            "rl: bnf / asft would train on the wrong distribution"
        )
