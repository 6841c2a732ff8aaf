"""Mixture-of-experts router load-balancing loss under `rl: bnf` / `rl: asft`.

With `output_router_logits` in the model's config, the policy's forward returns the router's load-balancing
loss, `router_aux_loss_coef * aux_loss` joins the training loss and `aux_loss` the metrics; the reference and
scoring forwards record no router logits. Without the flag the loss, gradients and metrics are the plain
method's. Checked on tiny random Qwen3-MoE and Mixtral models against a naive reference built from the
model's full logits and its own `aux_loss`.
"""
from __future__ import annotations

import json

import pytest
import torch
from conftest import TwoPassBNF
from test_packing import setup  # noqa: F401  (fixture)

from axolotl_bnf_plugin.data.collator import ResponseBatchCollator, response_rows
from axolotl_bnf_plugin.methods import batch_normalizer
from axolotl_bnf_plugin.methods.asft import ASFT, asft_loss
from axolotl_bnf_plugin.methods.bnf import bnf_loss
from axolotl_bnf_plugin.model_io import response_token_logps, router_aux_coef
from axolotl_bnf_plugin.step_loss import LossSettings, batch_loss

COEF = 0.3  # large, so that the aux term visibly moves the router's gradient
ARCHS = ["qwen3_moe", "mixtral"]
SETTINGS = {
    "bnf": LossSettings("bnf"),
    "bnf-two-pass": LossSettings(TwoPassBNF()),
    "asft": LossSettings(ASFT(lam=0.7, beta=1.3, sft_weight=0.5)),
}


def tiny_moe(arch: str, vocab_size: int, seed: int, router_logits: bool = True):
    """2 layers, hidden 32, 4 experts, top-2, fp32, no dropout or router noise."""
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    common = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, num_experts_per_tok=2, max_position_embeddings=512,
                  pad_token_id=0, bos_token_id=1, eos_token_id=3, output_router_logits=router_logits,
                  router_aux_loss_coef=COEF)
    torch.manual_seed(seed)
    if arch == "qwen3_moe":
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=32, num_experts=4,
                                                   **common))
    else:
        model = MixtralForCausalLM(MixtralConfig(intermediate_size=32, num_local_experts=4, **common))
    model.config._attn_implementation = "sdpa"
    return model.float()


def balancing_loss_func(arch: str):
    if arch == "qwen3_moe":
        from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func
    else:
        from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    return load_balancing_loss_func


@pytest.fixture(scope="module")
def moe(setup):  # noqa: F811
    tokenizer, examples, _, _ = setup
    collate = ResponseBatchCollator(tokenizer, pad_to_multiple_of=8)
    batches = {"unpacked": collate(examples), "packed": collate([examples[:2], examples[2:4], examples[4:]])}
    models = {arch: (tiny_moe(arch, len(tokenizer), seed=1), tiny_moe(arch, len(tokenizer), seed=2).eval())
              for arch in ARCHS}
    return batches, models


class ForwardKwargs:
    """Records the `output_router_logits` keyword of every call of a model (absent: '-')."""

    def __init__(self, model):
        self.seen: list = []
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, _module, _args, kwargs):
        self.seen.append(kwargs.get("output_router_logits", "-"))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def model_aux_loss(arch, model, batch) -> torch.Tensor:
    """The model's own load-balancing loss over the batch's real tokens.

    Unpacked: the `aux_loss` its forward returns with the batch's padding mask. Packed (no attention mask; the
    model would count the padding): transformers' `load_balancing_loss_func` on the router logits it
    returns, with the real-token mask."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    out = model(**inputs, output_router_logits=True, use_cache=False)  # a cache would undo the packing isolation
    if "attention_mask" in batch:
        return out.aux_loss
    return balancing_loss_func(arch)(out.router_logits, 4, 2, batch["response_index"] >= 0)


def naive_loss(arch, policy, reference, batch, settings, with_aux: bool, normalizer=None):
    """Method loss from full logits (+ coef * the model's own aux loss, weighted by the micro-batch's share of
    `normalizer`): an independent reference for `batch_loss`."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    labels = batch["labels"]
    targets = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), -100)], dim=1)

    def token_logps(model, **extra):
        out = model(**inputs, **extra, use_cache=False)
        logprobs = torch.log_softmax(out.logits.float(), -1)
        logp = logprobs.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        return out, logp, (logprobs.exp() * logprobs).sum(-1)

    out, logp, neg_entropy = token_logps(policy, output_router_logits=False)
    mask, logp, neg_entropy = response_rows(batch, logp, neg_entropy)
    if settings.method.name == "bnf":
        with torch.no_grad():
            ref_logp = response_rows(batch, token_logps(reference, output_router_logits=False)[1])[1]
        loss, _ = bnf_loss(logp, ref_logp, neg_entropy, mask, batch["sign"], batch["pair_ids"],
                           length_norm=settings.method.length_norm, normalizer=normalizer)
    else:
        loss, _ = asft_loss(logp, mask, batch["sign"], batch["pair_ids"], lam=settings.method.lam, beta=settings.method.beta,
                            sft_weight=settings.method.sft_weight, normalizer=normalizer)
    if with_aux:
        share = 1.0 if normalizer is None else batch_normalizer(batch["pair_ids"], batch["sign"].shape[0]) / normalizer
        loss = loss + COEF * share * model_aux_loss(arch, policy, batch)
    return loss


def loss_and_grads(fn, model):
    model.zero_grad()
    loss, *rest = fn()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return (loss.detach(), *rest, grads)


def router_params(grads):
    return {n: g for n, g in grads.items() if n.endswith("mlp.gate.weight")}


# Every method on both architectures, each in one of the two layouts (all twelve would only cost time).
CASES = [("qwen3_moe", "bnf", "packed"), ("qwen3_moe", "bnf-two-pass", "unpacked"), ("qwen3_moe", "asft", "unpacked"),
         ("mixtral", "bnf", "unpacked"), ("mixtral", "bnf-two-pass", "packed"), ("mixtral", "asft", "packed")]


@pytest.mark.parametrize("arch, method, layout", CASES, ids=["-".join(case) for case in CASES])
def test_aux_loss_joins_the_policy_loss(moe, arch, method, layout):
    batches, models = moe
    batch, (policy, reference), settings = batches[layout], models[arch], SETTINGS[method]
    policy.config.output_router_logits = reference.config.output_router_logits = True
    with ForwardKwargs(policy) as policy_calls, ForwardKwargs(reference) as reference_calls:
        loss, metrics, grads = loss_and_grads(lambda: batch_loss(policy, batch, settings, reference=reference), policy)
    # The policy's forward records router logits; the reference's (same config flag) does not.
    assert policy_calls.seen == [True]
    assert reference_calls.seen == ([False] if settings.method.name == "bnf" else [])

    without = loss_and_grads(lambda: (naive_loss(arch, policy, reference, batch, settings, with_aux=False),), policy)
    with torch.no_grad():
        aux = model_aux_loss(arch, policy, batch)
    torch.testing.assert_close(loss, without[0] + COEF * aux, rtol=1e-5, atol=1e-6)
    assert "aux_loss" in metrics
    torch.testing.assert_close(metrics["aux_loss"], aux.float(), rtol=1e-5, atol=1e-6)
    assert metrics.counts["aux_loss"] == batch_normalizer(batch["pair_ids"], batch["sign"].shape[0])

    naive = loss_and_grads(lambda: (naive_loss(arch, policy, reference, batch, settings, with_aux=True),), policy)
    torch.testing.assert_close(loss, naive[0], rtol=1e-5, atol=1e-6)
    assert router_params(grads) and set(router_params(grads)) == set(router_params(naive[1]))
    for name, grad in naive[1].items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # Not vacuous: the aux term moves the router's gradient.
    for name, grad in router_params(without[1]).items():
        assert (grads[name] - grad).abs().max() > 1e-3 * COEF, name


NO_FLAG_CASES = [("qwen3_moe", "bnf", "unpacked"), ("mixtral", "bnf-two-pass", "unpacked"),
                 ("qwen3_moe", "asft", "packed")]


@pytest.mark.parametrize("arch, method, layout", NO_FLAG_CASES, ids=["-".join(case) for case in NO_FLAG_CASES])
def test_without_the_flag_nothing_changes(moe, arch, method, layout):
    batches, models = moe
    batch, (policy, reference), settings = batches[layout], models[arch], SETTINGS[method]
    policy.config.output_router_logits = reference.config.output_router_logits = False
    try:
        with ForwardKwargs(policy) as policy_calls, ForwardKwargs(reference) as reference_calls:
            loss, metrics, grads = loss_and_grads(lambda: batch_loss(policy, batch, settings, reference=reference),
                                                  policy)
        assert policy_calls.seen == ["-"] and reference_calls.seen == (["-"] if settings.method.name == "bnf" else [])
        assert "aux_loss" not in metrics
        naive = loss_and_grads(lambda: (naive_loss(arch, policy, reference, batch, settings, with_aux=False),),
                               policy)
        torch.testing.assert_close(loss, naive[0], rtol=1e-5, atol=1e-6)
        assert set(grads) == set(naive[1])
        for name, grad in naive[1].items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    finally:
        policy.config.output_router_logits = reference.config.output_router_logits = True


@pytest.mark.parametrize("settings", [SETTINGS["bnf"], SETTINGS["asft"]], ids=["bnf", "asft"])
def test_step_normaliser_weights_the_aux_term_by_the_micro_batch_share(moe, settings):
    """Under gradient accumulation the method loss divides by the step's n; the aux term is weighted by the
    micro-batch's share of that n (TRL: the mean over equal micro-batches). BNF's single pass still sees its
    own predicted upstream gradient (backward checks it)."""
    batches, models = moe
    batch, (policy, reference) = batches["packed"], models["qwen3_moe"]
    policy.config.output_router_logits = reference.config.output_router_logits = True
    step_n = torch.tensor(2.5) * batch_normalizer(batch["pair_ids"], batch["sign"].shape[0])
    loss, metrics, grads = loss_and_grads(
        lambda: batch_loss(policy, batch, settings, reference=reference, normalizer=step_n), policy)
    naive = loss_and_grads(
        lambda: (naive_loss("qwen3_moe", policy, reference, batch, settings, with_aux=True, normalizer=step_n),),
        policy)
    torch.testing.assert_close(loss, naive[0], rtol=1e-5, atol=1e-6)
    for name, grad in naive[1].items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():  # the metric stays the unscaled aux loss
        torch.testing.assert_close(metrics["aux_loss"], model_aux_loss("qwen3_moe", policy, batch), rtol=1e-5,
                                   atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_and_unpacked_give_the_same_aux_loss(moe, arch):
    """Padding never counts: the packed rows' trailing padding is left out as the unpacked batch's mask does."""
    batches, models = moe
    policy = models[arch][0]
    policy.config.output_router_logits = True
    with torch.no_grad():
        metrics = {layout: batch_loss(policy, batches[layout], SETTINGS["asft"])[1] for layout in batches}
        packed = batches["packed"]
        unmasked = policy(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                          output_router_logits=True, use_cache=False).aux_loss
    assert bool((packed["response_index"] < 0).any())  # the packed rows do hold padding
    torch.testing.assert_close(metrics["packed"]["aux_loss"], metrics["unpacked"]["aux_loss"], rtol=1e-5, atol=1e-6)
    assert abs(unmasked.item() - metrics["packed"]["aux_loss"].item()) > 1e-4


def test_scoring_passes_record_no_router_logits(moe):
    """The precomputed-reference / shift-baseline scoring goes through `response_token_logps` without
    `router_aux`: the model is told not to record router logits, and the result keeps its three items."""
    batches, models = moe
    policy = models["qwen3_moe"][0]
    policy.config.output_router_logits = True
    with torch.no_grad(), ForwardKwargs(policy) as calls:
        out = response_token_logps(policy, batches["unpacked"])
    assert calls.seen == [False] and len(out) == 3


def test_coefficient_from_the_config():
    """`router_aux_loss_coef` comes from the config (as `model_config:` overrides set it); a config that asks for
    router logits without one (a custom architecture) is refused rather than trained with a guessed weight."""
    from transformers import PretrainedConfig

    class Custom(torch.nn.Module):
        def __init__(self, **config):
            super().__init__()
            self.config = PretrainedConfig(**config)

    assert router_aux_coef(Custom(output_router_logits=True, router_aux_loss_coef=0.05)) == 0.05
    assert router_aux_coef(Custom(output_router_logits=False, router_aux_loss_coef=0.05)) is None
    assert router_aux_coef(Custom()) is None
    with pytest.raises(ValueError, match="router_aux_loss_coef"):
        router_aux_coef(Custom(output_router_logits=True))


def test_train_logs_aux_loss(tiny_assets, tmp_path):
    """`axolotl train` of a tiny Qwen3-MoE with `model_config: {output_router_logits: true}` logs `aux_loss`."""
    from conftest import base_config, run_axolotl
    from transformers import AutoTokenizer

    from axolotl_bnf_plugin.summary import LOG_HISTORY_FILE

    model_dir = tmp_path / "moe"
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets / "model")
    tiny_moe("qwen3_moe", len(tokenizer), seed=0, router_logits=False).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    cfg = base_config(tiny_assets, tmp_path, "bnf", base_model=str(model_dir), max_steps=2,
                      model_config={"output_router_logits": True, "router_aux_loss_coef": 0.02})
    proc = run_axolotl("train", cfg, tmp_path)
    history = [json.loads(line) for line in (tmp_path / "run" / LOG_HISTORY_FILE).read_text().splitlines()]
    train_logs = [r for r in history if "loss" in r]
    assert len(train_logs) == 2 and all("aux_loss" in r and r["aux_loss"] > 0 for r in train_logs)
    assert "router load-balancing loss: on" in proc.stdout + proc.stderr
