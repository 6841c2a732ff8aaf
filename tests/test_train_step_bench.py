"""`benchmarks/train_step_bench.py` times what it says it times: on its tiny smoke shapes (CPU, fp32), the BNF
single pass, the BNF two-pass step and BNF on precomputed reference log-probs make the same parameter update
on the same batch, through the op with and without BNF's gradient rule; packed and unpacked batches make the
same update; the naive DPO step starts at log 2 against its reference and moves the parameters."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load_bench():
    spec = importlib.util.spec_from_file_location("train_step_bench", ROOT / "benchmarks" / "train_step_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_bench()
MODEL = "llama3-8b"
VOCAB = bench.SMOKE_SHAPES[MODEL]["vocab_size"]


@pytest.fixture
def grad_rules(monkeypatch):
    """The `grad_rule` of every fused-op call that builds a gradient (the reference's scoring runs under no_grad)."""
    from axolotl_bnf_plugin import model_io

    seen = []
    original = model_io.token_logprobs

    def spy(*args, **kwargs):
        if torch.is_grad_enabled():
            seen.append(kwargs.get("grad_rule"))
        return original(*args, **kwargs)

    monkeypatch.setattr(model_io, "token_logprobs", spy)
    return seen


def update(method: str, tuning: str, packed: bool, pairs: int = 2) -> tuple[float, dict[str, torch.Tensor]]:
    """(loss, parameter change) of one SGD step (lr 1: the change is minus the gradient) from the same seed."""
    torch.manual_seed(0)
    model = bench.build_model(MODEL, 2, torch.device("cpu"), torch.float32, seed=0, smoke=True)
    if tuning == "lora":
        model = bench.add_lora(model, r=4)  # fresh (B = 0): BNF's reference is the policy, adapter disabled
    examples = bench.make_examples(pairs, 12, 10, VOCAB, seed=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    case = bench.Case(model, method, examples, packed, VOCAB, torch.device("cpu"), lr=1.0, optimizer="sgd")
    loss = case.step()
    after = dict(model.named_parameters())
    return loss, {n: after[n].detach() - p for n, p in before.items()}


def assert_same_update(a: dict, b: dict, rtol=1e-4, atol=1e-7):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def _moved(delta: dict) -> int:
    return sum(int(d.abs().max() > 0) for d in delta.values())


@pytest.mark.parametrize("tuning", ["full", "lora"])
def test_bnf_single_pass_two_pass_and_precomputed_make_the_same_update(tuning, grad_rules):
    from axolotl_bnf_plugin.methods.bnf import BNF_GRAD_RULE

    loss_single, single = update("bnf", tuning, packed=False)
    assert grad_rules == [BNF_GRAD_RULE]
    loss_two, two_pass = update("bnf-two-pass", tuning, packed=False)
    assert grad_rules[1:] == [None]
    loss_pre, precomputed = update("bnf-precomputed", tuning, packed=False)
    assert grad_rules[2:] == [BNF_GRAD_RULE]

    if tuning == "full":
        assert _moved(single) == len(single), "every parameter gets a gradient, the head's too"
    else:  # a fresh adapter: B = 0, so only the B matrices get a gradient in the first step
        assert not any("lm_head" in n for n in single), "LoRA: the head is frozen"
        b = [n for n in single if ".lora_B." in n]
        assert len(b) == 2 * 7 and all(single[n].abs().max() > 0 for n in b)
    assert loss_two == pytest.approx(loss_single, rel=1e-5, abs=1e-7)
    assert loss_pre == pytest.approx(loss_single, rel=1e-5, abs=1e-7)
    assert_same_update(single, two_pass)
    assert_same_update(single, precomputed)


def test_packed_and_unpacked_batches_make_the_same_update():
    loss_unpacked, unpacked = update("bnf", "full", packed=False)
    loss_packed, packed = update("bnf", "full", packed=True)
    assert loss_packed == pytest.approx(loss_unpacked, rel=1e-5, abs=1e-7)
    assert_same_update(unpacked, packed, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("tuning", ["full", "lora"])
def test_naive_dpo_starts_at_log_2_and_moves_the_parameters(tuning):
    loss, delta = update("dpo-naive", tuning, packed=False)
    assert loss == pytest.approx(math.log(2), abs=1e-6)  # the policy is its reference at step 0
    assert _moved(delta) > 0 and all(torch.isfinite(d).all() for d in delta.values())
    loss_packed, delta_packed = update("dpo-naive", tuning, packed=True)
    assert loss_packed == pytest.approx(loss, abs=1e-6)
    assert_same_update(delta, delta_packed, rtol=1e-3, atol=1e-6)


def test_batches_are_laid_out_as_described():
    examples = bench.make_examples(3, 12, 10, VOCAB, seed=1)
    unpacked, _ = bench.collate(examples, packed=False, vocab=VOCAB)
    packed, _ = bench.collate(examples, packed=True, vocab=VOCAB)
    assert tuple(unpacked["input_ids"].shape) == (6, 22) and "attention_mask" in unpacked
    assert tuple(packed["input_ids"].shape) == (1, 6 * 22) and "attention_mask" not in packed
    assert unpacked["scored_index"].numel() == packed["scored_index"].numel() == 6 * 10
    assert unpacked["sign"].tolist() == [1, -1] * 3 and unpacked["pair_ids"].tolist() == [0, 0, 1, 1, 2, 2]
    lengths = [e["length"] for e in examples]
    assert bench._first_fit(lengths, 3 * max(lengths)) == [[0, 1, 2]]
    assert bench.pack(examples)[0] == [examples]


def test_table_from_rows(tmp_path):
    meta = {"model": MODEL, "device": "NVIDIA H100 80GB HBM3", "device_type": "cuda", "dtype": "bfloat16",
            "torch": "2.11", "transformers": "5.17", "peft": "0.18", "layers": 2, "pairs": 4, "prompt_len": 512,
            "response_len": 512, "warmup": 2, "steps": 3, "lora_r": 16, "smoke": False}
    rows = [{**meta, "tuning": "full", "layout": "packed", "method": "dpo-naive", "s_per_step": 0.5,
             "tokens_per_s": 16384.0, "peak_mib": 40960.0, "static_mib": 20480.0},
            {**meta, "tuning": "full", "layout": "packed", "method": "bnf", "s_per_step": 0.25,
             "tokens_per_s": 32768.0, "peak_mib": 30720.0, "static_mib": 20480.0},
            {**meta, "tuning": "lora", "layout": "packed", "method": "asft", "error": "OOM"}]
    path = tmp_path / "rows.jsonl"
    for row in rows:
        bench.append_jsonl(str(path), row)
    text = bench.markdown(bench.read_rows(str(path)))
    assert "NVIDIA H100 80GB HBM3" in text and "Llama-3-8B layer shapes (hidden 4096" in text
    assert "| full | packed | BNF single pass | 0.250 | 32768 | 30.00 | 20.00 | 10.00 | -25% |" in text
    assert "| lora | packed | ASFT | OOM |" in text
