"""The initial policy: BNF's reference and ASFT's shift baseline are the policy as training starts.

- Continuing an SFT adapter (`lora_model_dir`): the reference is base + that adapter, not the bare base, so
  rewards and shifts are zero at the first step.
- Reference and baseline passes run in eval mode (no dropout) and give the policy back in its own mode.
- The once-only scoring pass is split across processes and equals a one-process scoring on every rank.
- The cached scores are keyed on the weights (an overwritten checkpoint is rescored), the adapter and data.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import LORA_KEYS, base_config, run_axolotl, run_two_process_worker

from axolotl_bnf_plugin.summary import LOG_HISTORY_FILE


def _lora(model, dropout: float = 0.0, seed: int = 0):
    """A LoRA policy whose adapter already changes the model (B != 0), as after an SFT run."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # lora_A's initialisation
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                  target_modules=["q_proj", "v_proj", "up_proj"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    return peft_model


def _examples(tokenizer, n: int):
    from axolotl_bnf_plugin.data.adapters import Candidate
    from axolotl_bnf_plugin.data.examples import candidate_example
    from axolotl_bnf_plugin.data.tokenize import LengthPolicy
    from axolotl_bnf_plugin.tiny import toy_pairs

    out = []
    for i, row in enumerate(toy_pairs(n, seed=5)):
        responses = [(" " + row["chosen"], 1), (" " + row["rejected"], -1)] if i % 3 else [(" " + row["chosen"], 1)]
        example = candidate_example(Candidate(row["question"], responses, i % 3 != 0), tokenizer, None,
                                    LengthPolicy(256, "drop"))
        out.append({k: v for k, v in example.items() if k != "bnf_status"})
    return out


@pytest.fixture(scope="module")
def tiny(tiny_assets):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_assets / "model")
    return tokenizer, AutoModelForCausalLM.from_pretrained(tiny_assets / "model").float()


def _batch(tokenizer, examples):
    from axolotl_bnf_plugin.data.collator import ResponseBatchCollator

    return ResponseBatchCollator(tokenizer)(examples)


def _full_logit_logps(model, batch) -> torch.Tensor:
    """Per-position label log-probs `[rows, T]` from the model's own full logits (position t scores t + 1)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    labels = torch.cat([batch["labels"][:, 1:], torch.full_like(batch["labels"][:, :1], -100)], 1)
    logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return torch.where(labels != -100, logp, torch.zeros_like(logp))


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_continued_adapter_reference_is_the_starting_policy_in_eval_mode(tiny, dropout):
    """A LoRA policy that starts away from its base: the live reference scores base + starting adapter
    (not the base), in eval mode, stays frozen while the adapter trains, and leaves the policy's modes and
    trainable parameters as they were."""
    from axolotl_bnf_plugin.initial_policy import AdapterSnapshot, live_reference
    from axolotl_bnf_plugin.step_loss import LossSettings, live_reference_logps

    tokenizer, base = tiny
    policy = _lora(copy.deepcopy(base), dropout=dropout)
    batch = _batch(tokenizer, _examples(tokenizer, 4))
    policy.eval()
    with torch.no_grad():
        expected = _full_logit_logps(policy, batch)
        with policy.disable_adapter():
            bare = _full_logit_logps(policy, batch)
    policy.train()
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    reference = live_reference(policy)
    assert isinstance(reference, AdapterSnapshot)
    assert {n for n, p in policy.named_parameters() if p.requires_grad} == trainable

    settings = LossSettings("bnf")
    scored = batch["labels"][:, 1:] != -100
    for _ in range(2):
        got = live_reference_logps(policy, batch, settings, reference)
        torch.testing.assert_close(got[:, :-1][scored], expected[:, :-1][scored], rtol=1e-5, atol=1e-5)
        assert (got[:, :-1][scored] - bare[:, :-1][scored]).abs().max() > 1e-2  # the adapter matters
        assert all(m.training for m in policy.modules())
        assert {n for n, p in policy.named_parameters() if p.requires_grad} == trainable
        with torch.no_grad():  # the adapter trains on; the reference must not follow it
            for name, param in policy.named_parameters():
                if param.requires_grad:
                    param.add_(0.05)
    with torch.no_grad():
        for module in policy.modules():
            module.training = False
        moved = _full_logit_logps(policy, batch)
    assert (moved[:, :-1][scored] - expected[:, :-1][scored]).abs().max() > 1e-2


def test_fresh_adapter_reference_is_the_disabled_adapter(tiny):
    """A fresh LoRA (B = 0) is the identity: no second copy, the adapter is disabled for the reference."""
    from peft import LoraConfig, get_peft_model

    from axolotl_bnf_plugin.initial_policy import DisabledAdapter, FrozenCopy, live_reference

    _, base = tiny
    assert isinstance(live_reference(get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj"]))),
                      DisabledAdapter)
    assert isinstance(live_reference(copy.deepcopy(base)), FrozenCopy)


def test_eval_mode_restores_each_module(tiny):
    from axolotl_bnf_plugin.initial_policy import eval_mode

    _, base = tiny
    model = copy.deepcopy(base).train()
    model.model.layers[0].eval()  # a mixed state, as a user's frozen sub-module would be
    before = [m.training for m in model.modules()]
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == before


def _adapter_dir(tiny_assets: Path, out: Path) -> Path:
    """An SFT-like LoRA adapter for the tiny model, with the same shape Axolotl's LORA_KEYS would give."""
    from transformers import AutoModelForCausalLM

    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(tiny_assets / "model")
    config = LoraConfig(r=LORA_KEYS["lora_r"], lora_alpha=LORA_KEYS["lora_alpha"], lora_dropout=0.0,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    peft_model.save_pretrained(out)
    return out


@pytest.mark.parametrize("method,extra", [("bnf", {}), ("bnf", {"bnf_precompute_ref": True}),
                                          ("asft", {"asft_shift_on_train": True})],
                         ids=["bnf-live", "bnf-precomputed", "asft"])
def test_continuing_an_sft_adapter_starts_with_zero_rewards_and_shifts(tiny_assets, tmp_path, method, extra):
    """`lora_model_dir` (SFT then preference): rewards/* and shift/* are 0 at the first step, because the
    reference / baseline is base + the SFT adapter; the saved adapter is the trained one alone."""
    from safetensors.torch import load_file

    adapter = _adapter_dir(tiny_assets, tmp_path / "sft_adapter")
    cfg = base_config(tiny_assets, tmp_path, method, max_steps=3, learning_rate=5e-3, lora_model_dir=str(adapter),
                      **LORA_KEYS, **extra)
    run_axolotl("train", cfg, tmp_path)
    history = [json.loads(line) for line in (tmp_path / "run" / LOG_HISTORY_FILE).read_text().splitlines()]
    first, last = [r for r in history if "loss" in r][0], [r for r in history if "loss" in r][-1]
    for name in ("shift/chosen", "shift/rejected") + (("rewards/chosen", "rewards/margins") if method == "bnf" else ()):
        assert abs(first[name]) < 1e-4, (name, first[name])
    assert abs(last["shift/chosen"] - last["shift/rejected"]) > 1e-4  # the run did move the policy
    saved = load_file(str(tmp_path / "run" / "adapter_model.safetensors"))
    assert saved and not any("bnf_initial_policy" in k for k in saved)
    assert not (tmp_path / "run" / "bnf_initial_policy").exists()
    started = load_file(str(adapter / "adapter_model.safetensors"))
    assert any(not torch.equal(saved[k], started[k]) for k in started if k in saved)


def test_scoring_pass_is_split_across_processes(tiny, tiny_assets, tmp_path):
    """2 processes, 13 examples in batches of 3 (blocks of 3 and 2 batches): every rank ends with all the
    scores, identical across ranks and equal to one process scoring everything. Both run 3 forwards (the
    short block repeats a batch): under FSDP2 / ZeRO-3 every forward gathers layers on all processes."""
    from datasets import Dataset

    from axolotl_bnf_plugin.data.collator import ResponseBatchCollator
    from axolotl_bnf_plugin.reference import initial_policy_logps

    tokenizer, model = tiny
    examples = _examples(tokenizer, 13)
    data = tmp_path / "examples.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in examples))
    records = run_two_process_worker(Path(__file__).with_name("scoring_worker.py"), tmp_path / "out.json",
                                     BNF_TINY_ASSETS=str(tiny_assets), BNF_EXAMPLES=str(data))
    single = initial_policy_logps(model, Dataset.from_json(str(data)), ResponseBatchCollator(tokenizer), 3, "cpu")
    assert [r["rank"] for r in records] == [0, 1]
    assert [r["forwards"] for r in records] == [3, 3]
    assert records[0]["logps"] == records[1]["logps"]
    got = records[0]["logps"]
    assert [[len(r) for r in e] for e in got] == [[len(r) for r in e] for e in single]
    flat = lambda x: torch.tensor([v for e in x for r in e for v in r])  # noqa: E731
    torch.testing.assert_close(flat(got), flat(single), rtol=1e-5, atol=1e-5)


def test_cached_scores_are_keyed_on_weights_adapter_and_data(tiny, tiny_assets, tmp_path):
    """The cache key changes when the checkpoint at the same path is overwritten, when the adapter's
    starting weights change, and when the data changes; it does not change for an identical reload."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from axolotl_bnf_plugin.reference import cache_key

    tokenizer, _ = tiny
    path = tmp_path / "model"
    AutoModelForCausalLM.from_pretrained(tiny_assets / "model").save_pretrained(path)
    tokenizer.save_pretrained(path)
    data = Dataset.from_list(_examples(tokenizer, 6))
    key = cache_key(data, AutoModelForCausalLM.from_pretrained(path))
    assert cache_key(data, AutoModelForCausalLM.from_pretrained(path)) == key
    assert cache_key(data.select(range(5)), AutoModelForCausalLM.from_pretrained(path)) != key

    trained = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        for param in trained.parameters():
            param.add_(1e-3)
    trained.save_pretrained(path)  # overwritten in place: same path, new weights
    assert cache_key(data, AutoModelForCausalLM.from_pretrained(path)) != key

    fresh = cache_key(data, _lora(AutoModelForCausalLM.from_pretrained(path), seed=0))
    assert fresh == cache_key(data, _lora(AutoModelForCausalLM.from_pretrained(path), seed=0))
    assert fresh != cache_key(data, _lora(AutoModelForCausalLM.from_pretrained(path), seed=1))
