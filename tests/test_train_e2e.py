"""End to end: `axolotl train` / `axolotl preprocess` with the plugin on a tiny local model (CPU)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import LORA_KEYS, base_config, run_axolotl

from axolotl_bnf_plugin.callbacks import LOG_HISTORY_FILE

BNF_KEYS = {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "logps/rejected", "bnf/weight_chosen", "bnf/weight_rejected", "bnf/below_ref_frac_chosen",
            "bnf/below_ref_frac_rejected"}
ASFT_KEYS = {"asft/nll_loss", "asft/align_loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
             "rewards/accuracies", "logps/chosen", "logps/rejected", "log_odds_chosen"}


def _load_policy(assets, run_dir, lora: bool):
    from transformers import AutoModelForCausalLM

    if not lora:
        return AutoModelForCausalLM.from_pretrained(run_dir)
    from peft import PeftModel

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets / "model"), run_dir)


@torch.no_grad()
def _mean_logps(model, tokenizer, rows) -> tuple[float, float]:
    """Mean over pairs of log p(chosen | prompt) and of log p(rejected | prompt), from full logits."""
    sums = [0.0, 0.0]
    for row in rows:
        prompt = (f"<|im_start|>system\n{row['system']}<|im_end|>\n<|im_start|>user\n{row['question']}<|im_end|>\n"
                  "<|im_start|>assistant\n")
        for side, answer in enumerate((row["chosen"], row["rejected"])):
            p_len = len(tokenizer(prompt)["input_ids"])
            ids = torch.tensor([tokenizer(prompt + answer + "<|im_end|>")["input_ids"]])
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1).gather(1, ids[0, 1:, None])[:, 0]
            sums[side] += logp[p_len - 1:].sum().item()
    return sums[0] / len(rows), sums[1] / len(rows)


def _mean_margin(model, tokenizer, rows) -> float:
    """Mean over pairs of log p(chosen | prompt) - log p(rejected | prompt), from full logits."""
    chosen, rejected = _mean_logps(model, tokenizer, rows)
    return chosen - rejected


@pytest.mark.parametrize("method", ["bnf", "asft"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_train_raises_chosen_over_rejected(tiny_assets, tmp_path, method, lora):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra = dict(LORA_KEYS) if lora else {}
    if method == "asft":
        extra["asft_shift_on_train"] = True  # train-time shift/* (the default scores the eval set only)
    lr = 5e-3 if lora else 1e-3
    cfg = base_config(tiny_assets, tmp_path, method, learning_rate=lr, max_steps=10, **extra)
    proc = run_axolotl("train", cfg, tmp_path)
    run_dir = tmp_path / "run"

    history = [json.loads(line) for line in (run_dir / LOG_HISTORY_FILE).read_text().splitlines()]
    train_logs = [r for r in history if "loss" in r]
    assert len(train_logs) == 10, proc.stdout[-2000:]
    expected = BNF_KEYS if method == "bnf" else ASFT_KEYS
    assert expected <= set(train_logs[-1]), sorted(set(train_logs[-1]))
    # Telemetry: likelihood shifts (ASFT against a once-scored step-0 baseline), memory pre-flight and
    # per-phase memory, the method card, and plots written at the end.
    assert {"shift/chosen", "shift/rejected", "shift/chosen_down_frac", "skipped_steps"} <= set(train_logs[-1])
    assert abs(train_logs[0]["shift/chosen"]) < 1e-4  # the first step is scored at the starting weights
    assert train_logs[-1]["shift/chosen"] > train_logs[-1]["shift/rejected"]
    assert "memory/preflight_full_logits_bytes" in train_logs[0]
    assert any(k.startswith("memory/rss_forward") for k in train_logs[-1])
    card = "arXiv 2410.04834" if method == "bnf" else "arXiv 2409.10571"
    assert card in proc.stdout + proc.stderr
    assert (run_dir / "plots" / "loss.png").stat().st_size > 1000
    assert (run_dir / "plots" / "shift.png").stat().st_size > 1000
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train_logs)
    if method == "bnf":
        assert "reference: " in proc.stdout + proc.stderr
        # BNF's rewards are measured against the reference = the initial policy: zero at the first step.
        assert abs(train_logs[0]["rewards/margins"]) < 1e-4
        assert train_logs[-1]["rewards/margins"] > 0.1

    tokenizer = AutoTokenizer.from_pretrained(tiny_assets / "model")
    rows = [json.loads(line) for line in (tiny_assets / "pairs_intel.jsonl").read_text().splitlines()[:16]]
    before = _mean_margin(AutoModelForCausalLM.from_pretrained(tiny_assets / "model"), tokenizer, rows)
    after = _mean_margin(_load_policy(tiny_assets, run_dir, lora), tokenizer, rows)
    assert after > before + 0.5, (before, after)


def test_eval_split_logs_eval_metrics(tiny_assets, tmp_path):
    """ASFT by default scores the eval set once for its shift baseline and never the training set."""
    cfg = base_config(tiny_assets, tmp_path, "asft", val_set_size=0.25, eval_steps=4, max_steps=4)
    proc = run_axolotl("train", cfg, tmp_path)
    out = proc.stdout + proc.stderr
    history = [json.loads(line) for line in (tmp_path / "run" / LOG_HISTORY_FILE).read_text().splitlines()]
    evals = [r for r in history if "eval_loss" in r]
    assert evals, history
    assert {"eval_rewards/accuracies", "eval_asft/nll_loss", "eval_log_odds_chosen"} <= set(evals[-1])
    assert {"eval_shift/chosen", "eval_shift/rejected", "eval_shift/chosen_down_frac"} <= set(evals[-1])
    assert not any("shift/chosen" in r for r in history if "loss" in r)
    assert "initial-policy log-probs (eval): not cached" in out and "scoring 16 examples" in out
    assert "initial-policy log-probs (train)" not in out


def test_preprocess_then_train_reuses_prepared_data(tiny_assets, tmp_path):
    cfg = base_config(tiny_assets, tmp_path, "bnf", max_steps=2)
    pre = run_axolotl("preprocess", cfg, tmp_path)
    assert "rows by outcome" in pre.stdout + pre.stderr
    prepared = list((tmp_path / "prepared").iterdir())
    assert any(p.is_dir() for p in prepared), prepared
    train = run_axolotl("train", cfg, tmp_path)
    out = train.stdout + train.stderr
    assert "Loading prepared dataset from disk" in out
    assert "rows by outcome" not in out


@pytest.mark.parametrize("packing", [False, True], ids=["unpacked", "packed"])
@pytest.mark.parametrize("method", ["bnf", "asft"])
def test_mixed_pairwise_unpaired_sft_run(tiny_assets, tmp_path, method, packing):
    datasets = [
        {"path": str(tiny_assets / "pairs_intel.jsonl"), "ds_type": "json"},
        {"path": str(tiny_assets / "unpaired.jsonl"), "ds_type": "json"},
        {"path": str(tiny_assets / "sft_alpaca.jsonl"), "ds_type": "json", "type": "bnf.sft"},
    ]
    extra = {"sample_packing": True, "sequence_len": 256} if packing else {}
    cfg = base_config(tiny_assets, tmp_path, method, datasets=datasets, max_steps=6, **extra)
    proc = run_axolotl("train", cfg, tmp_path)
    out = proc.stdout + proc.stderr
    assert "detected: pairwise, prompt from 'question'" in out
    assert "detected: unpaired, prompt from 'prompt'" in out
    assert "type bnf.sft: positives-only alpaca" in out
    assert "rows by outcome" in out
    history = [json.loads(line) for line in (tmp_path / "run" / LOG_HISTORY_FILE).read_text().splitlines()]
    train_logs = [r for r in history if "loss" in r]
    assert len(train_logs) == 6
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train_logs)
    # Unpaired and positives-only rows make chosen responses outnumber rejected ones.
    assert {"rewards/chosen", "rewards/rejected", "logps/chosen"} <= set(train_logs[-1])


def test_precomputed_reference_run_matches_live_reference_run(tiny_assets, tmp_path):
    """Same seed and data: training with bnf_precompute_ref follows the live-reference loss trajectory,
    holds no reference copy, and a second run reuses the cached reference log-probs."""
    def losses(run_dir):
        history = [json.loads(line) for line in (run_dir / LOG_HISTORY_FILE).read_text().splitlines()]
        return [r["loss"] for r in history if "loss" in r], [r["rewards/margins"] for r in history if "loss" in r]

    live_cfg = base_config(tiny_assets, tmp_path / "live", "bnf", max_steps=6)
    run_axolotl("train", live_cfg, tmp_path / "live")
    pre_cfg = base_config(tiny_assets, tmp_path / "pre", "bnf", max_steps=6, bnf_precompute_ref=True)
    first = run_axolotl("train", pre_cfg, tmp_path / "pre")
    out = first.stdout + first.stderr
    assert "scoring" in out and "frozen copy" not in out
    live_loss, live_margin = losses(tmp_path / "live" / "run")
    pre_loss, pre_margin = losses(tmp_path / "pre" / "run")
    assert len(live_loss) == len(pre_loss) == 6
    for a, b in zip(live_loss + live_margin, pre_loss + pre_margin):
        assert a == pytest.approx(b, rel=1e-3, abs=1e-4), (live_loss, pre_loss)
    second = run_axolotl("train", pre_cfg, tmp_path / "pre")
    assert "initial-policy log-probs (train): cache reused" in second.stdout + second.stderr
    # The checkpoint overwritten at the same path (an SFT run writing its output again): scored afresh.
    from transformers import AutoModelForCausalLM

    model_dir = tmp_path / "pre" / "model"
    model = AutoModelForCausalLM.from_pretrained(tiny_assets / "model")
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (tiny_assets / "model" / name).exists():
            (model_dir / name).parent.mkdir(parents=True, exist_ok=True)
            (model_dir / name).write_bytes((tiny_assets / "model" / name).read_bytes())
    model.save_pretrained(model_dir)
    moved = {**pre_cfg, "base_model": str(model_dir)}
    run_axolotl("train", moved, tmp_path / "pre")
    model.lm_head.weight.data.mul_(1 / 1.5)
    model.save_pretrained(model_dir)  # the same path, other weights
    third = run_axolotl("train", moved, tmp_path / "pre")
    assert "initial-policy log-probs (train): not cached" in third.stdout + third.stderr


def test_precompute_ref_with_asft_is_rejected(tiny_assets, tmp_path):
    proc = run_axolotl("train", base_config(tiny_assets, tmp_path, "asft", bnf_precompute_ref=True), tmp_path,
                       check=False)
    assert proc.returncode != 0
    assert "bnf_precompute_ref applies to rl: bnf only" in proc.stdout + proc.stderr


@pytest.mark.parametrize("method", ["bnf", "asft"])
def test_gradient_accumulation_invariance(tiny_assets, tmp_path, method):
    """micro_batch 4 x accumulation 1 and micro_batch 1 x accumulation 4 give the same weights (fp32),
    on mixed pairwise + unpaired data, where each micro-batch has a different n."""
    from safetensors.torch import load_file

    datasets = [{"path": str(tiny_assets / "pairs_intel.jsonl"), "ds_type": "json"},
                {"path": str(tiny_assets / "unpaired.jsonl"), "ds_type": "json"}]
    weights = {}
    for mbs, ga in ((4, 1), (1, 4)):
        out = tmp_path / f"mbs{mbs}_ga{ga}"
        cfg = base_config(tiny_assets, out, method, datasets=datasets, micro_batch_size=mbs,
                          gradient_accumulation_steps=ga, max_steps=2, optimizer="sgd", learning_rate=0.05)
        run_axolotl("train", cfg, out)
        weights[(mbs, ga)] = load_file(str(out / "run" / "model.safetensors"))
    initial = load_file(str(tiny_assets / "model" / "model.safetensors"))
    a, b = weights[(4, 1)], weights[(1, 4)]
    moved = max((a[k].float() - initial[k].float()).abs().max().item() for k in a)
    assert moved > 1e-3  # the runs did train
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)


def _poisoned_model(tiny_assets, out):
    """The tiny model with a NaN input embedding for "<unk>": any example containing it gives a NaN loss."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_assets / "model")
    model = AutoModelForCausalLM.from_pretrained(tiny_assets / "model")
    with torch.no_grad():
        model.get_input_embeddings().weight[tokenizer.unk_token_id] = float("nan")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def poisoned_data(tiny_assets, tmp_path, poisoned_rows) -> tuple[Path, Path]:
    """(pairs whose `poisoned_rows` end their chosen answer with "<unk>", the model with a NaN "<unk>" row)."""
    rows = [json.loads(line) for line in (tiny_assets / "pairs_intel.jsonl").read_text().splitlines()]
    for i in poisoned_rows:
        rows[i]["chosen"] = rows[i]["chosen"] + " <unk>"
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data, _poisoned_model(tiny_assets, tmp_path / "model")


@pytest.mark.parametrize("poisoned_rows,expect_stop", [([3], False), (list(range(64)), True)],
                         ids=["one-bad-example", "all-bad"])
def test_non_finite_steps_are_skipped_then_stop(tiny_assets, tmp_path, poisoned_rows, expect_stop):
    from safetensors.torch import load_file

    data, model_dir = poisoned_data(tiny_assets, tmp_path, poisoned_rows)
    cfg = base_config(tiny_assets, tmp_path, "bnf", base_model=str(model_dir), micro_batch_size=1, max_steps=8,
                      datasets=[{"path": str(data), "ds_type": "json", "type": "chatml.intel"}],
                      shuffle_merged_datasets=False, bnf_max_bad_steps=3)
    proc = run_axolotl("train", cfg, tmp_path, check=False)
    out = proc.stdout + proc.stderr
    if expect_stop:
        assert proc.returncode != 0
        assert "3 consecutive optimiser steps had a non-finite loss or gradient" in out
        return
    assert proc.returncode == 0, out[-3000:]
    assert "non-finite loss or gradient: optimiser step skipped (examples [3])" in out
    history = [json.loads(line) for line in (tmp_path / "run" / LOG_HISTORY_FILE).read_text().splitlines()]
    assert [r for r in history if "loss" in r][-1]["skipped_steps"] == 1
    weights = load_file(str(tmp_path / "run" / "model.safetensors"))
    unk = 4
    for name, tensor in weights.items():
        finite = torch.isfinite(tensor)
        if "embed_tokens" in name:  # only the poisoned row itself may stay NaN
            finite[unk] = True
        assert finite.all(), name


@pytest.mark.parametrize("precompute", [False, True], ids=["live-ref", "precomputed-ref"])
def test_resume_reaches_the_same_weights_and_metrics(tiny_assets, tmp_path, precompute):
    """Stopped after a checkpoint and resumed with resume_from_checkpoint = uninterrupted (fp32, same seed)."""
    from safetensors.torch import load_file

    common = dict(max_steps=6, save_strategy="steps", save_steps=3, lr_scheduler="constant",
                  bnf_precompute_ref=precompute, micro_batch_size=2)
    straight = base_config(tiny_assets, tmp_path / "straight", "bnf", **common)
    run_axolotl("train", straight, tmp_path / "straight")
    first = base_config(tiny_assets, tmp_path / "resumed", "bnf", **{**common, "max_steps": 3})
    run_axolotl("train", first, tmp_path / "resumed")
    checkpoint = tmp_path / "resumed" / "run" / "checkpoint-3"
    assert checkpoint.is_dir()
    second = base_config(tiny_assets, tmp_path / "resumed", "bnf", **common, resume_from_checkpoint=str(checkpoint))
    run_axolotl("train", second, tmp_path / "resumed")

    a = load_file(str(tmp_path / "straight" / "run" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "run" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)

    def logs(run):
        history = [json.loads(line) for line in (run / LOG_HISTORY_FILE).read_text().splitlines()]
        return {r["step"]: r for r in history if "loss" in r}

    straight_logs, resumed_logs = logs(tmp_path / "straight" / "run"), logs(tmp_path / "resumed" / "run")
    assert set(resumed_logs) == set(range(1, 7)) == set(straight_logs)
    for step in range(1, 7):
        for key in ("loss", "rewards/margins", "logps/chosen", "bnf/weight_rejected"):
            assert resumed_logs[step][key] == pytest.approx(straight_logs[step][key], rel=1e-4, abs=1e-5), (step, key)


def test_eval_on_held_out_pairs_while_training_on_unpaired_data(tiny_assets, tmp_path):
    """Implicit-reward accuracy on held-out pairs, comparable with DPO runs, from an unpaired-only run."""
    cfg = base_config(tiny_assets, tmp_path, "bnf", max_steps=4, eval_steps=4,
                      datasets=[{"path": str(tiny_assets / "unpaired.jsonl"), "ds_type": "json"}],
                      test_datasets=[{"path": str(tiny_assets / "pairs_intel.jsonl"), "ds_type": "json",
                                      "type": "chatml.intel", "split": "train"}])
    run_axolotl("train", cfg, tmp_path)
    history = [json.loads(line) for line in (tmp_path / "run" / LOG_HISTORY_FILE).read_text().splitlines()]
    train = [r for r in history if "loss" in r]
    evals = [r for r in history if "eval_loss" in r]
    assert evals and "eval_rewards/accuracies" in evals[-1] and "eval_rewards/margins" in evals[-1]
    # Training batches hold no pairs, so no (meaningless) train accuracy is logged at all.
    assert "rewards/accuracies" not in train[-1] and "rewards/chosen" in train[-1]
