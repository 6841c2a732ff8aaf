"""Get what the fused op needs from a causal LM: its final hidden states and its output head.

The model is still called through its own (possibly DDP / FSDP / PEFT-wrapped) forward, so wrappers
see a normal forward and backward; only `logits_to_keep=1` keeps the `[tokens, vocab]` logits from being
built. The final hidden states are taken from the decoder's output by a forward hook. The head is the
model's output embedding (tied or not), with a LoRA delta on `lm_head` folded in, and the model's own
logit post-processing (scale, soft-capping) read from its config.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .kernels import LogitTransform, token_logprobs

IGNORE_INDEX = -100


@dataclass
class OutputHead:
    weight: torch.Tensor
    bias: torch.Tensor | None
    transform: LogitTransform
    # The FSDP2 unit `output_head` gathered to get `weight`, if any (see `_whole_output_weight`).
    gathered_unit: torch.nn.Module | None = None

    def release(self) -> None:
        """Reshard a unit gathered for a no-grad pass; a gradient pass leaves that to FSDP's backward.

        A unit left gathered after a no-grad pass (the reference pass of a LoRA policy, run with its adapter
        disabled) would be gathered while PEFT re-enables the adapter, and FSDP2 then loses the adapter's
        gradients; resharding at once also returns the memory.
        """
        if self.gathered_unit is not None and not torch.is_grad_enabled():
            self.gathered_unit.reshard()
            self.gathered_unit = None


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


def logit_transform(config) -> LogitTransform:
    """Scale and soft-cap the architecture applies to `lm_head` outputs (Cohere, Granite, Gemma 2/3)."""
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


def _whole_output_weight(base, head: torch.nn.Module) -> tuple[torch.Tensor, torch.nn.Module | None]:
    """The whole `[V, H]` output embedding, gathered if FSDP2 holds it sharded; never a shard.

    Where `lm_head` shares FSDP2's root unit (the usual layout: decoder layers wrapped, the rest in the
    root), the root keeps it gathered from forward to backward and there is nothing to do. Where the head
    (or the input embedding it is tied to) is an FSDP2 unit of its own, it was resharded after its forward:
    `unshard()` gathers it again, and FSDP's end-of-backward callback reduce-scatters its gradient and
    reshards it, as for any unit whose parameters were used. ZeRO-3 gathers a module's parameters only
    while that module runs, so `response_token_logps` scores inside a call of the head (see
    `_score_inside_head_call`), where this sees the gathered weight. Anything still not `[V, H]` (FSDP1's
    flat views, a ZeRO-3 partition outside that call) is refused, never scored as a slice of the vocabulary.
    Returns the weight and the FSDP2 unit gathered for it (None when nothing was gathered).
    """
    weight, gathered = head.weight, None
    if _is_dtensor(weight):
        tied_to = base.get_input_embeddings()
        for unit in (head, tied_to):
            if unit is not None and unit.weight is weight and callable(getattr(unit, "unshard", None)):
                unit.unshard()
                weight, gathered = head.weight, unit
                break
    in_features = getattr(head, "in_features", None)
    if _is_dtensor(weight) or weight.dim() != 2 or (in_features is not None and weight.shape[1] != in_features):
        raise NotImplementedError(
            f"rl: bnf / asft: the output embedding is sharded ({type(weight).__name__} of shape "
            f"{tuple(weight.shape)}: FSDP1, or a layout whose head cannot be gathered, such as a LoRA adapter "
            "on lm_head under ZeRO-3) and the fused log-prob op needs all of it; use DDP, FSDP2 "
            "(fsdp_version: 2) or DeepSpeed ZeRO-1/2/3 with a plain lm_head"
        )
    return weight, gathered


def output_head(model) -> OutputHead:
    """The output head as the fused op needs it, gathered in full (see `_whole_output_weight`)."""
    base = unwrap(model)
    head = base.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(base).__name__} has no output embedding: rl: bnf / asft needs a causal LM head")
    weight, gathered = _whole_output_weight(base, head)
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
    return OutputHead(weight=weight, bias=bias, transform=logit_transform(base.config), gathered_unit=gathered)


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


def forward_hidden(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(final hidden states [R, L, H], the model's own logits at the last position or None)."""
    kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    with capture_final_hidden(model) as captured:
        outputs = model(**kwargs, logits_to_keep=1, use_cache=False, return_dict=True)
    if len(captured) != 1:
        raise RuntimeError(f"expected one decoder forward, saw {len(captured)}")
    return captured[0], getattr(outputs, "logits", None)


def response_token_logps(model, batch: dict[str, torch.Tensor], chunk_size: int | None = None,
                         check_head: bool = False, impl: str = "auto", grad_rule=None, grad_inputs=None):
    """Per-token (logp, neg_entropy, scored mask), each `[R, L]`, of every row's own next tokens.

    Position t scores label t + 1 (the usual causal shift); only tokens whose label is not -100 are
    scored, and the fused op never forms the `[R * L, V]` logits. With `check_head`, the model's own
    last-position logits are compared with the op's projection first (see `check_head_matches`).
    `grad_rule` / `grad_inputs`: a loss's gradient rule and its per-position inputs `[R, L]`, for the
    single-pass gradient (see `kernels.token_logprobs`).
    """
    hidden, last_logits = forward_hidden(model, batch)
    rows, length, width = hidden.shape
    labels = batch["labels"]
    targets = torch.cat([labels[:, 1:], labels.new_full((rows, 1), IGNORE_INDEX)], dim=1)

    def score(flat_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        head = output_head(model)
        try:
            if check_head:
                check_head_matches(model, hidden, last_logits, head)
            return token_logprobs(
                flat_hidden,
                head.weight,
                targets.reshape(-1),
                bias=head.bias,
                ignore_index=IGNORE_INDEX,
                chunk_size=chunk_size,
                softcap=head.transform.softcap,
                scale=head.transform.scale,
                impl=impl,
                row_index=batch.get("scored_index"),
                grad_rule=grad_rule,
                grad_inputs=grad_inputs,
            )
        finally:
            head.release()

    head_module = unwrap(model).get_output_embeddings()
    if hasattr(head_module.weight, "ds_id"):
        logp, neg_entropy = _score_inside_head_call(head_module, score, hidden.reshape(-1, width))
    else:
        logp, neg_entropy = score(hidden.reshape(-1, width))
    return logp.view(rows, length), neg_entropy.view(rows, length), targets != IGNORE_INDEX


def _score_inside_head_call(head_module: torch.nn.Module, score, flat_hidden: torch.Tensor):
    """Run `score(flat_hidden)` as the forward of `head_module`, so DeepSpeed ZeRO-3 handles the head as usual.

    ZeRO-3 gathers a module's parameters in its pre-forward hook and partitions them again after; it gathers
    them again before the module's outputs receive their gradient and reduce-scatters the weight's gradient.
    Called this way, the fused op sees the whole weight in forward and in backward, and the gradient takes
    ZeRO-3's own path.
    """
    had_own_forward = "forward" in head_module.__dict__
    own_forward = head_module.__dict__.get("forward")
    head_module.forward = score
    try:
        return head_module(flat_hidden)
    finally:
        if had_own_forward:
            head_module.forward = own_forward
        else:
            del head_module.forward


@torch.no_grad()
def check_head_matches(model, hidden: torch.Tensor, last_logits: torch.Tensor | None, head: OutputHead) -> None:
    """Fail loudly if `transform(lm_head(final hidden))` is not the model's own logits.

    An architecture that post-processes logits in a way this module does not know would otherwise be
    trained on the wrong distribution without any sign of it.
    """
    if last_logits is None:
        return
    ours = head.transform.apply(torch.nn.functional.linear(hidden[:, -1], head.weight, head.bias).float())
    theirs = last_logits[:, -1].float()
    tol = 1e-3 if hidden.dtype == torch.float32 else 5e-2
    err = (ours - theirs).abs().max().item()
    if err > tol * (1.0 + theirs.abs().max().item()):
        raise RuntimeError(
            f"{type(unwrap(model)).__name__}: lm_head(final hidden state) differs from the model's logits by "
            f"{err:.3g}; the architecture post-processes logits in a way the plugin does not know, so "
            "rl: bnf / asft would train on the wrong distribution"
        )
