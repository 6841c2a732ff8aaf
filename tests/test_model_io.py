"""The policy's per-token log-probs via final hidden states + output head equal the model's own logits,
across architectures that post-process logits, tied heads, head biases and PEFT adapters."""
from __future__ import annotations

import pytest
import torch
import transformers

from axolotl_bnf_plugin.model_io import check_head_matches, forward_hidden, output_head, response_token_logps

COMMON = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)


def _model(arch: str):
    torch.manual_seed(0)
    if arch == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON))
    if arch == "llama-tied":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON, tie_word_embeddings=True))
    if arch == "gemma2-softcap":
        cfg = transformers.Gemma2Config(**COMMON, head_dim=8, final_logit_softcapping=3.0, query_pre_attn_scalar=8)
        return transformers.Gemma2ForCausalLM(cfg)
    if arch == "cohere-scale":
        return transformers.CohereForCausalLM(transformers.CohereConfig(**COMMON, logit_scale=0.37))
    if arch == "granite-scaling":
        return transformers.GraniteForCausalLM(transformers.GraniteConfig(**COMMON, logits_scaling=4.0))
    if arch == "phi-bias":
        cfg = transformers.PhiConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=64)
        return transformers.PhiForCausalLM(cfg)
    raise ValueError(arch)


def _batch(rows=3, length=11, vocab=97):
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, vocab, (rows, length), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 8:] = 0  # right padding on one row
    labels = input_ids.clone()
    labels[:, :4] = -100  # prompt
    labels[attention_mask == 0] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _naive(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logp_all = torch.log_softmax(logits[:, :-1], -1)
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    logp = logp_all.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * mask
    neg_entropy = (logp_all.exp() * logp_all).sum(-1) * mask
    return logp, neg_entropy, mask


@pytest.mark.parametrize("arch", ["llama", "llama-tied", "gemma2-softcap", "cohere-scale", "granite-scaling", "phi-bias"])
def test_fused_logps_match_model_logits(arch):
    model = _model(arch).float()
    batch = _batch()
    logp, neg_entropy, mask = response_token_logps(model, batch, chunk_size=5, check_head=True)
    ref_logp, ref_neg_entropy, ref_mask = _naive(model, batch)
    assert torch.equal(mask[:, :-1], ref_mask) and not mask[:, -1].any()
    torch.testing.assert_close(logp[:, :-1], ref_logp, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(neg_entropy[:, :-1], ref_neg_entropy, atol=2e-5, rtol=1e-5)

    # Gradients w.r.t. every parameter agree with autograd through the full logits.
    weights = torch.randn_like(ref_logp)
    grads = torch.autograd.grad((logp[:, :-1] * weights).sum(), [p for p in model.parameters()], allow_unused=True)
    ref_grads = torch.autograd.grad((ref_logp * weights).sum(), [p for p in model.parameters()], allow_unused=True)
    for g, r in zip(grads, ref_grads):
        if r is None:
            assert g is None or torch.count_nonzero(g) == 0
        else:
            torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-3)


def test_tied_head_is_the_input_embedding():
    model = _model("llama-tied")
    assert output_head(model).weight is model.get_input_embeddings().weight


def test_transform_read_from_config():
    assert output_head(_model("gemma2-softcap")).transform.softcap == 3.0
    assert output_head(_model("cohere-scale")).transform.scale == pytest.approx(0.37)
    assert output_head(_model("granite-scaling")).transform.scale == pytest.approx(0.25)
    assert output_head(_model("llama")).transform.scale is None


def test_lora_on_lm_head_and_disabled_adapter():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_model("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # make the adapter non-trivial
            torch.nn.init.normal_(param, std=0.5)
    batch = _batch()
    logp, _, _ = response_token_logps(model, batch, chunk_size=4, check_head=True)
    torch.testing.assert_close(logp[:, :-1], _naive(model, batch)[0], atol=2e-5, rtol=1e-5)
    with model.disable_adapter():
        base_logp, _, _ = response_token_logps(model, batch, chunk_size=4)
        torch.testing.assert_close(base_logp[:, :-1], _naive(model, batch)[0], atol=2e-5, rtol=1e-5)
    assert not torch.allclose(base_logp, logp)
    # The adapter's lm_head LoRA weights receive gradient through the fused op.
    logp.sum().backward()
    head_lora = [p for n, p in model.named_parameters() if "lm_head" in n and "lora_A" in n]
    assert head_lora and head_lora[0].grad is not None and head_lora[0].grad.abs().sum() > 0


def test_head_check_catches_unknown_logit_processing():
    model = _model("llama")
    batch = _batch()
    hidden, last_logits = forward_hidden(model, batch)
    head = output_head(model)
    check_head_matches(model, hidden, last_logits, head)  # consistent: no error
    with pytest.raises(RuntimeError, match="differs from the model's logits"):
        check_head_matches(model, hidden, last_logits * 2.0, head)


def test_no_full_logits_are_computed():
    """The model is asked for its last position only; the fused op does the rest."""
    model = _model("llama")
    seen = []
    model.lm_head.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    response_token_logps(model, _batch(rows=3, length=11))
    assert seen == [torch.Size([3, 1, 97])]


@pytest.mark.parametrize("arch", ["llama", "llama-tied", "gemma2-softcap", "cohere-scale", "phi-bias"])
def test_a_head_loaded_per_call_is_called_once_per_forward(arch):
    """A head that its module's call loads (accelerate's hook on an offloaded head, as ZeRO-3's pre-forward hook
    gathers one) is called once per forward, by the fused op, not also by the model for its last-position
    logits; the head check (first step) still uses the model's own logits. Values and gradients are those of
    the plain model."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    class CountingLoad(ModelHook):
        def __init__(self):
            self.loads = 0

        def pre_forward(self, module, *args, **kwargs):
            self.loads += 1
            return args, kwargs

    model, batch = _model(arch).float(), _batch()
    ref_logp, _, _ = _naive(model, batch)
    hook = CountingLoad()
    add_hook_to_module(model.get_output_embeddings(), hook)
    logp, _, _ = response_token_logps(model, batch, chunk_size=5)
    assert hook.loads == 1
    torch.testing.assert_close(logp[:, :-1], ref_logp, atol=2e-5, rtol=1e-5)
    weights = torch.randn_like(ref_logp)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad((logp[:, :-1] * weights).sum(), params, allow_unused=True)
    ref_grads = torch.autograd.grad((_naive(model, batch)[0] * weights).sum(), params, allow_unused=True)
    for g, r in zip(grads, ref_grads):
        if r is not None:
            torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-3)
    from axolotl_bnf_plugin.model_io import _head_not_called

    head = model.get_output_embeddings()
    with _head_not_called(model):  # a forward that reads the head's attributes (Mamba casts to its dtype)
        assert model.get_output_embeddings() is not head
        assert model.get_output_embeddings().weight is head.weight and not list(model.lm_head.parameters())
    before = hook.loads
    response_token_logps(model, batch, chunk_size=5, check_head=True)
    assert hook.loads == before + 2
    assert model.get_output_embeddings()._hf_hook is hook  # the head is back in place, hook and all


def test_partitioned_output_embedding_is_refused_not_sliced():
    """A weight that is not the whole `[V, H]` head (a ZeRO-3 partition outside its module's call) must
    never be scored as if it were."""
    model = _model("llama")
    model.lm_head.weight.data = torch.empty(0)  # what ZeRO-3 leaves in a partitioned parameter
    with pytest.raises(NotImplementedError, match="sharded"):
        output_head(model)


def test_flat_parameter_view_of_the_head_is_refused():
    """FSDP1 leaves a resharded parameter as a 1-D view of its local shard: never score it."""
    model = _model("llama")
    flat = model.lm_head.weight.detach().reshape(-1)[: model.lm_head.weight.numel() // 2]
    model.lm_head.weight = torch.nn.Parameter(flat.clone())
    with pytest.raises(NotImplementedError, match=r"sharded \(Parameter of shape"):
        output_head(model)


def test_a_zero3_partition_reports_its_whole_shape_to_the_preflight():
    """ZeRO-3 leaves each rank a `(0,)` partition of the head with the whole shape in `ds_shape`: the memory
    pre-flight reads that (it divided by the local row count, 0, while the trainer was built)."""
    from axolotl_bnf_plugin.model_io import head_shape
    from axolotl_bnf_plugin.telemetry import preflight

    partition = torch.nn.Parameter(torch.empty(0, dtype=torch.bfloat16))
    partition.ds_shape = torch.Size([128256, 4096])
    vocab, hidden = head_shape(partition)
    assert (vocab, hidden) == (128256, 4096) and head_shape(torch.empty(7, 3)) == (7, 3)
    report = preflight(8192, vocab, partition.dtype, with_reference=True, impl="triton", hidden_size=hidden)
    assert report["memory/preflight_full_logits_bytes"] == 2 * 8192 * 128256 * 2
    assert report["memory/preflight_chunk_rows"] == 2048  # the CUDA chunk for a trained head at this shape
    with pytest.raises(ValueError, match="vocab_size must be >= 1"):
        preflight(8192, partition.shape[0], partition.dtype, with_reference=True)
