"""The model-family matrix: tiny random models of the causal-LM families the plugin serves, built locally from
transformers' config classes on the toy tokenizer (`tiny.FAMILY_SPECS`).

In process, for every family: the plugin's per-token log-probs of collated batches, packed (position ids
restarting per response, no attention mask) and unpacked, equal `log_softmax` of the model's own full logits
gathered at the labels, and BNF and ASFT losses give finite, non-zero gradients to the output embedding
(the input embedding where the two are tied). End to end (`axolotl train`): every family with BNF and with
ASFT, one of the two with LoRA and the other with full fine-tuning; each run trains, logs the method's
metrics, and raises the chosen-over-rejected margin of the model it saved (tied embeddings stay tied).
Families whose logits go through a transform the fused op does not apply are refused, at config time and at
first use, naming the family and the reason.
"""
from __future__ import annotations

import copy
import functools
import json

import pytest
import torch
import transformers

from axolotl_bnf_plugin.config import PluginConfigError, translate_raw_config
from axolotl_bnf_plugin.data.adapters import Candidate
from axolotl_bnf_plugin.data.collator import ResponseBatchCollator, response_rows
from axolotl_bnf_plugin.data.examples import candidate_example
from axolotl_bnf_plugin.data.tokenize import LengthPolicy
from axolotl_bnf_plugin.model_io import (
    capture_final_hidden,
    check_head_matches,
    output_head,
    response_token_logps,
    unsupported_head_reason,
)
from axolotl_bnf_plugin.tiny import FAMILY_SPECS, build_family_model, build_tokenizer, save_family_model, toy_pairs
from axolotl_bnf_plugin.step_loss import LossSettings, batch_loss

FAMILIES = list(FAMILY_SPECS)
TIED = {"qwen2", "gemma2", "gemma3", "cohere", "starcoder2"}
TRANSFORMED = {"gemma2", "gemma3", "cohere", "granite"}  # soft-capped or scaled logits
# Larger than the usual 0.02, so that the random models' logits are O(1): soft-capping and logit scales
# then change the log-probs visibly, and scoring without them would fail the comparison.
INIT = 0.2


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: with several threads, PyTorch's thread pool costs ten times the arithmetic on a
    busy machine (measured: the in-process matrix 62 s with 2 threads, 6 s with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    rows = toy_pairs(6, seed=5)
    tokenizer = build_tokenizer(rows)
    policy = LengthPolicy(256, "drop")

    def chat(row):
        return [{"role": "system", "content": row["system"]}, {"role": "user", "content": row["question"]}]

    def answer(text):
        return {"role": "assistant", "content": text}

    candidates = [
        Candidate(chat(rows[0]), [(answer(rows[0]["chosen"]), 1), (answer(rows[0]["rejected"]), -1)], True),
        Candidate(chat(rows[1]), [(answer(rows[1]["rejected"]), -1)], False),
        Candidate(chat(rows[2]), [(answer(rows[2]["chosen"]), 1), (answer(rows[2]["rejected"][:25]), -1)], True),
        Candidate(chat(rows[3]), [(answer(rows[3]["chosen"] * 2), 1)], False),
    ]
    examples = [candidate_example(c, tokenizer, tokenizer.chat_template, policy) for c in candidates]
    assert all(e["bnf_status"] == "kept" for e in examples)
    collate = ResponseBatchCollator(tokenizer, pad_to_multiple_of=8)
    unpacked = collate(examples)
    packed = collate([examples[:2], examples[2:]])
    assert "attention_mask" not in packed and packed["input_ids"].shape[0] == 2
    return tokenizer, unpacked, packed


@functools.lru_cache(maxsize=None)
def _model(family: str, vocab_size: int):
    return build_family_model(family, vocab_size, seed=1, initializer_range=INIT)


@torch.no_grad()
def _own_logps(model, batch) -> torch.Tensor:
    """`[R, L]`: log_softmax of the model's own full logits at position t, gathered at label t + 1."""
    kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    logits = model(**kwargs, logits_to_keep=0, use_cache=False).logits.float()
    targets = batch["labels"][:, 1:]
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return torch.cat([logp, logp.new_zeros(logp.shape[0], 1)], 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_logps_equal_the_models_own_logits_packed_and_unpacked(data, family):
    tokenizer, unpacked, packed = data
    model = _model(family, len(tokenizer)).eval()
    head = output_head(model)
    assert (head.weight is model.get_input_embeddings().weight) == (family in TIED)
    per_layout = {}
    for layout, batch in (("unpacked", unpacked), ("packed", packed)):
        with torch.no_grad():
            logp, _, mask = response_token_logps(model, batch, chunk_size=16, check_head=True, impl="torch")
        own = _own_logps(model, batch)
        assert mask.any()
        torch.testing.assert_close(logp[mask], own[mask], atol=2e-5, rtol=1e-5, msg=f"{family} {layout}")
        per_layout[layout] = response_rows(batch, logp)
    # The two layouts score the same tokens with the same values: packing keeps the responses apart.
    (mask_u, rows_u), (mask_p, rows_p) = per_layout["unpacked"], per_layout["packed"]
    width = min(mask_u.shape[1], mask_p.shape[1])
    assert torch.equal(mask_u[:, :width], mask_p[:, :width]) and not mask_u[:, width:].any()
    torch.testing.assert_close(rows_p[:, :width][mask_p[:, :width]], rows_u[:, :width][mask_u[:, :width]],
                               atol=2e-5, rtol=1e-5)
    if family in TRANSFORMED:  # the comparison would fail without the family's logit transform
        with torch.no_grad(), capture_final_hidden(model) as captured:
            model(input_ids=unpacked["input_ids"], attention_mask=unpacked["attention_mask"], logits_to_keep=1)
        raw = torch.nn.functional.linear(captured[0], head.weight, head.bias).float()
        targets = unpacked["labels"][:, 1:].clamp(min=0)
        plain = torch.log_softmax(raw[:, :-1], -1).gather(-1, targets[..., None])[..., 0]
        mask = unpacked["labels"][:, 1:] != -100
        assert (plain - _own_logps(model, unpacked)[:, :-1])[mask].abs().max() > 0.05


@pytest.mark.parametrize("family", FAMILIES)
def test_bnf_and_asft_give_head_gradients(data, family):
    tokenizer, unpacked, packed = data
    model = _model(family, len(tokenizer)).train()
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    head_weight = output_head(model).weight
    embed_weight = model.get_input_embeddings().weight
    for settings, batch, ref in ((LossSettings("bnf", impl="torch"), unpacked, reference),
                                 (LossSettings("asft", impl="torch"), packed, None)):
        model.zero_grad(set_to_none=True)
        loss, _ = batch_loss(model, batch, settings, reference=ref, check_head=True)
        assert torch.isfinite(loss), (family, settings.method)
        loss.backward()
        for name, weight in (("output embedding", head_weight), ("input embedding", embed_weight)):
            assert weight.grad is not None, (family, settings.method, name)
            assert torch.isfinite(weight.grad).all(), (family, settings.method, name)
            assert weight.grad.abs().max() > 0, (family, settings.method, name)
    model.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------------ refusals
def _unmodelled(kind: str, vocab_size: int):
    torch.manual_seed(0)
    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=3,
                  initializer_range=INIT)
    if kind == "recurrent_gemma":
        config = transformers.RecurrentGemmaConfig(**common, lru_width=32, attention_window_size=16,
                                                   logits_soft_cap=2.0, block_types=["recurrent", "attention"])
        return transformers.RecurrentGemmaForCausalLM(config).float(), "logits_soft_cap"
    if kind == "falcon_h1":
        config = transformers.FalconH1Config(**common, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8,
                                             mamba_d_state=8, mamba_chunk_size=8, lm_head_multiplier=0.3)
        return transformers.FalconH1ForCausalLM(config).float(), "lm_head_multiplier"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["recurrent_gemma", "falcon_h1"])
def test_unmodelled_logit_transform_is_refused_not_scored(data, kind):
    """Scored with its plain head, such a model would get log-probs that are not its own; the plugin refuses
    it at first use, naming the family and the config key, instead of training on them."""
    tokenizer, unpacked, _ = data
    model, key = _unmodelled(kind, len(tokenizer))
    with torch.no_grad(), capture_final_hidden(model) as captured:
        own = model(input_ids=unpacked["input_ids"], attention_mask=unpacked["attention_mask"]).logits.float()
    plain = model.get_output_embeddings()(captured[0]).float()
    assert plain.shape != own.shape or (plain - own).abs().max() > 1e-2  # a refusal is what is needed
    with pytest.raises(NotImplementedError, match=rf"'{kind}' model.*{key}"):
        response_token_logps(model, unpacked)
    with pytest.raises(NotImplementedError, match=key):
        batch_loss(model, unpacked, LossSettings("asft", impl="torch"), check_head=True)


def test_unmodelled_logit_transform_is_refused_at_config_time(tmp_path):
    """`rl: bnf / asft` with such a base model fails when the config is read (the plugin's `register`),
    before any data or weights are loaded."""
    soft_capped = tmp_path / "recurrent_gemma"
    transformers.RecurrentGemmaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      logits_soft_cap=30.0).save_pretrained(soft_capped)
    with pytest.raises(PluginConfigError, match=r"'recurrent_gemma' model: it soft-caps its logits with "
                                                r"`logits_soft_cap` \(RecurrentGemma\) = 30\.0"):
        translate_raw_config({"rl": "bnf", "base_model": str(soft_capped)})
    multiplied = tmp_path / "falcon_h1"
    transformers.FalconH1Config(lm_head_multiplier=0.5).save_pretrained(multiplied)
    with pytest.raises(PluginConfigError, match=r"'falcon_h1' model: it multiplies its logits by `lm_head_multiplier`"):
        translate_raw_config({"rl": "asft", "base_model": str(multiplied)})
    # An identity multiplier (set through Axolotl's `model_config:` overrides) is no transform: accepted.
    identity = {"rl": "asft", "base_model": str(multiplied), "model_config": {"lm_head_multiplier": 1.0}}
    assert translate_raw_config(identity) == "asft"
    truncated = tmp_path / "inkling_text"
    transformers.InklingTextConfig(vocab_size=64, unpadded_vocab_size=60).save_pretrained(truncated)
    with pytest.raises(PluginConfigError, match=r"'inkling_text' model: its logits keep only the first 60 of the 64"):
        translate_raw_config({"rl": "bnf", "base_model": str(truncated)})
    served = tmp_path / "gemma2"
    transformers.Gemma2Config(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              final_logit_softcapping=30.0).save_pretrained(served)
    assert translate_raw_config({"rl": "bnf", "base_model": str(served)}) == "bnf"
    assert "output_logit_soft_cap" in unsupported_head_reason(transformers.xLSTMConfig(output_logit_soft_cap=15.0))


def test_non_linear_prediction_head_is_refused_at_the_first_check(data):
    """A head with layers between the decoder's output and the output embedding (BERT's dense + activation +
    layer norm, here as a causal LM) has no config key to read: the trainer's first-step head check refuses it."""
    tokenizer, unpacked, _ = data
    torch.manual_seed(0)
    model = transformers.BertLMHeadModel(transformers.BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        is_decoder=True)).float()
    with pytest.raises(RuntimeError, match=r"BertLMHeadModel: lm_head\(final hidden state\) differs from the model's"):
        batch_loss(model, unpacked, LossSettings("asft", impl="torch"), check_head=True)


def test_logits_narrower_than_the_output_embedding_are_refused_by_the_check():
    model = build_family_model("llama", 50, seed=0)
    hidden = torch.randn(2, 3, 32)
    head = output_head(model)
    logits = torch.nn.functional.linear(hidden[:, -1:], head.weight)
    check_head_matches(model, hidden, logits, head)
    with pytest.raises(RuntimeError, match="logits have 40 columns but its output embedding has 50 rows"):
        check_head_matches(model, hidden, logits[..., :40], head)


# ---------------------------------------------------------------------------------------- end to end
def _e2e_cases() -> list[tuple[str, str, str]]:
    """Every family with both methods, full fine-tuning for one and LoRA for the other (which method gets LoRA
    alternates from family to family), so each method runs full and LoRA across the set. CI runs each family's
    BNF case on one environment and its ASFT case on the other (tests/ci_subset.txt)."""
    cases = []
    for index, family in enumerate(FAMILIES):
        lora_method = ("asft", "bnf")[index % 2]
        cases += [(family, method, "lora" if method == lora_method else "full") for method in ("bnf", "asft")]
    return cases


E2E = _e2e_cases()


@pytest.mark.parametrize("family,method,adapter", E2E, ids=[f"{f}-{m}-{a}" for f, m, a in E2E])
def test_axolotl_train(tiny_assets, tmp_path, family, method, adapter):
    from conftest import LORA_KEYS, base_config, run_axolotl
    from test_train_e2e import ASFT_KEYS, BNF_KEYS, _mean_logps
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from axolotl_bnf_plugin.callbacks import LOG_HISTORY_FILE

    model_dir = save_family_model(family, tiny_assets / "model", tmp_path / "model", seed=0)
    lora = adapter == "lora"
    extra = dict(LORA_KEYS) if lora else {}
    cfg = base_config(tiny_assets, tmp_path, method, base_model=str(model_dir), max_steps=10,
                      learning_rate=5e-3 if lora else 1e-3, **extra)
    proc = run_axolotl("train", cfg, tmp_path)
    out = proc.stdout + proc.stderr
    run_dir = tmp_path / "run"
    history = [json.loads(line) for line in (run_dir / LOG_HISTORY_FILE).read_text().splitlines()]
    train_logs = [r for r in history if "loss" in r]
    assert len(train_logs) == 10, out[-3000:]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train_logs)
    assert (BNF_KEYS if method == "bnf" else ASFT_KEYS) <= set(train_logs[-1]), sorted(train_logs[-1])
    if method == "bnf":
        assert abs(train_logs[0]["rewards/margins"]) < 1e-4  # the reference is the initial policy
        assert train_logs[-1]["rewards/margins"] > 0

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in (tiny_assets / "pairs_intel.jsonl").read_text().splitlines()[:16]]
    start = AutoModelForCausalLM.from_pretrained(model_dir)
    if lora:
        from peft import PeftModel

        trained = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), run_dir)
    else:
        trained = AutoModelForCausalLM.from_pretrained(run_dir)
        if family in TIED:
            assert trained.get_output_embeddings().weight is trained.get_input_embeddings().weight
            moved = trained.get_input_embeddings().weight - start.get_input_embeddings().weight
            assert moved.abs().max() > 1e-4
    (chosen_0, rejected_0), (chosen_1, rejected_1) = _mean_logps(start, tokenizer, rows), _mean_logps(trained, tokenizer, rows)
    if method == "bnf":
        assert chosen_1 - rejected_1 > chosen_0 - rejected_0 + 0.1, (chosen_0, rejected_0, chosen_1, rejected_1)
    else:
        # A random tiny model is near uniform (log p ~ -6 per token): ASFT's alignment term on a rejected response
        # then carries a weight of about its likelihood, so ten steps of ASFT are SFT on the chosen responses
        # (docs/methods.md), and what must move is the chosen likelihood (the margin, on the shared tokens, may not;
        # test_train_e2e checks it on the standard tiny model). Also the loss fell.
        assert chosen_1 > chosen_0 + 0.1, (chosen_0, rejected_0, chosen_1, rejected_1)
        assert train_logs[-1]["loss"] < train_logs[0]["loss"], (train_logs[0]["loss"], train_logs[-1]["loss"])
