"""The method comparison: the probe's math, its exactness in a real DPO run, config derivation, the command."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import AXOLOTL_ENV, base_config, run_axolotl

from axolotl_bnf_plugin.compare.configs import (
    PLUGIN_LINE,
    CompareConfigError,
    check_methods,
    derive_config,
    derive_configs,
)
from axolotl_bnf_plugin.kernels import token_logprobs
from axolotl_bnf_plugin.compare.probe import PROBE_EXAMPLES_FILE, PROBE_LOG_FILE, ProbeScores, probe_metrics, score_probe
from axolotl_bnf_plugin.telemetry import DOWN_TOLERANCE


# ------------------------------------------------------------------------------------------ naive scoring
@torch.no_grad()
def naive_response_scores(model, ids: list[int], prompt_len: int):
    """(log p, log Z, z_y) of a response's scored tokens from the model's full logits (plain PyTorch)."""
    logits = model(torch.tensor([ids])).logits[0, :-1].float()
    labels = torch.tensor(ids[1:])
    start = max(prompt_len, 1) - 1  # position t scores token t + 1; the prompt's tokens are not scored
    logits, labels = logits[start:], labels[start:]
    log_z = torch.logsumexp(logits, -1)
    z_y = logits.gather(1, labels[:, None])[:, 0]
    return torch.log_softmax(logits, -1).gather(1, labels[:, None])[:, 0], log_z, z_y


def naive_metrics(now_model, start_model, examples: list[dict]) -> dict[str, float]:
    """The probe's metrics, transcribed from their definitions (probe.probe_metrics' docstring)."""
    d_logp = {1: [], -1: []}
    d_z, d_lse, margins = {1: [], -1: []}, {1: [], -1: []}, []
    for example in examples:
        ratio = {}
        for ids, plen, sign in zip(example["response_input_ids"], example["response_prompt_len"], example["response_sign"]):
            lp1, lz1, z1 = naive_response_scores(now_model, ids, plen)
            lp0, lz0, z0 = naive_response_scores(start_model, ids, plen)
            d_logp[sign].append(float((lp1 - lp0).mean()))
            d_z[sign].append(float((z1 - z0).mean()))
            d_lse[sign].append(float((lz1 - lz0).mean()))
            ratio[sign] = float((lp1 - lp0).sum())
        margins.append(ratio[1] - ratio[-1])

    def mean(values):
        return sum(values) / len(values)

    return {
        "probe/chosen": mean(d_logp[1]),
        "probe/rejected": mean(d_logp[-1]),
        "probe/chosen_down_frac": mean([float(v < -DOWN_TOLERANCE) for v in d_logp[1]]),
        "probe/accuracy": mean([float(m > 0) for m in margins]),
        "probe/margin": mean(margins),
        "probe/chosen_logit": mean(d_z[1]),
        "probe/chosen_logZ": mean(d_lse[1]),
        "probe/rejected_logit": mean(d_z[-1]),
        "probe/rejected_logZ": mean(d_lse[-1]),
    }


class _Tok:
    pad_token_id, eos_token_id = 0, 3


def _pairs(rng: torch.Generator, n: int, vocab: int) -> list[dict]:
    examples = []
    for _ in range(n):
        prompt = torch.randint(4, vocab, (int(torch.randint(2, 6, (1,), generator=rng)),), generator=rng).tolist()
        shared = torch.randint(4, vocab, (3,), generator=rng).tolist()
        responses = [prompt + shared + torch.randint(4, vocab, (int(torch.randint(1, 5, (1,), generator=rng)),),
                                                     generator=rng).tolist() for _ in range(2)]
        examples.append({"response_input_ids": responses, "response_prompt_len": [len(prompt)] * 2,
                         "response_sign": [1, -1], "is_pair": True})
    return examples


# ------------------------------------------------------------------------------------------ unit tests
@pytest.mark.parametrize("softcap, scale", [(None, None), (3.0, 0.5)])
def test_fused_op_log_partition_equals_logsumexp(softcap, scale):
    torch.manual_seed(0)
    hidden, weight = torch.randn(13, 16), torch.randn(97, 16)
    labels = torch.randint(0, 97, (13,))
    labels[[2, 7]] = -100
    logp, _, lse = token_logprobs(hidden, weight, labels, chunk_size=4, softcap=softcap, scale=scale, impl="torch",
                                  return_lse=True)
    z = hidden @ weight.T * (scale or 1.0)
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    scored = labels != -100
    torch.testing.assert_close(lse[scored], torch.logsumexp(z, -1)[scored], rtol=1e-5, atol=1e-5)
    assert torch.all(lse[~scored] == 0)
    z_y = z[scored].gather(1, labels[scored][:, None])[:, 0]
    torch.testing.assert_close((logp + lse)[scored], z_y, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="return_lse"):
        token_logprobs(hidden, weight, labels, grad_rule="bnf", grad_inputs=(labels.float(), labels.float()),
                       return_lse=True)


def test_probe_scores_and_metrics_equal_full_logits():
    """score_probe (fused op, collator, eval mode) and probe_metrics against a naive full-logits transcription."""
    from axolotl_bnf_plugin.data.collator import ResponseBatchCollator
    from axolotl_bnf_plugin.tiny import build_model

    vocab = 61
    start, now = build_model(vocab, seed=0), build_model(vocab, seed=0)
    with torch.no_grad():  # a different policy: every weight moved a little
        for p in now.parameters():
            p.add_(0.05 * torch.randn_like(p))
    examples = _pairs(torch.Generator().manual_seed(0), 7, vocab)
    collator = ResponseBatchCollator(_Tok(), vocab_size=vocab)
    now.train()  # the probe scores in eval mode and restores the flag
    scores_now = score_probe(now, examples, collator, batch_size=3, device="cpu", chunk_size=5, impl="torch")
    assert now.training
    scores_start = score_probe(start, examples, collator, batch_size=4, device="cpu", impl="torch")
    row = 0
    for example in examples:
        for ids, plen in zip(example["response_input_ids"], example["response_prompt_len"]):
            logp, log_z, z_y = naive_response_scores(now, ids, plen)
            mask = scores_now.mask[row]
            assert int(mask.sum()) == len(logp)
            torch.testing.assert_close(scores_now.logp[row][mask], logp, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(scores_now.lse[row][mask], log_z, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(scores_now.label_logit[row][mask], z_y, rtol=1e-5, atol=1e-5)
            row += 1
    metrics = probe_metrics(scores_now, scores_start)
    expected = naive_metrics(now, start, examples)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-5), key
    # the logit view decomposes the likelihood view exactly
    assert metrics["probe/chosen"] == pytest.approx(metrics["probe/chosen_logit"] - metrics["probe/chosen_logZ"], abs=1e-6)
    zero = probe_metrics(scores_start, scores_start)
    assert zero["probe/chosen"] == 0 and zero["probe/accuracy"] == 0 and zero["probe/chosen_down_frac"] == 0


def test_probe_metrics_refuse_other_responses():
    a = ProbeScores(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), torch.tensor([1, -1]),
                    torch.tensor([0, 0]))
    b = ProbeScores(a.logp, a.lse, torch.tensor([[True, True, False], [True, True, True]]), a.sign, a.pair)
    with pytest.raises(ValueError, match="different responses"):
        probe_metrics(a, b)


# ------------------------------------------------------------------------------------------ config derivation
USER_CFG = {"base_model": "m", "datasets": [{"path": "d.jsonl", "type": "chatml.intel"}], "output_dir": "out",
            "max_steps": 5, "seed": 3, "rl_beta": 0.2, "dpo_label_smoothing": 0.1, "sample_packing": True}


def test_derived_configs_differ_in_the_method_only():
    configs = derive_configs(USER_CFG, ["dpo", "ipo", "simpo", "bnf", "asft", "dpo"], probe_size=16)
    assert list(configs) == ["dpo", "ipo", "simpo", "bnf", "asft"]
    for method, cfg in configs.items():
        assert cfg["output_dir"] == f"out/{method}"
        assert PLUGIN_LINE in cfg["plugins"] and cfg["bnf_compare_probe"] is True
        assert cfg["bnf_compare_probe_size"] == 16
        assert (cfg["base_model"], cfg["datasets"], cfg["max_steps"], cfg["seed"]) == ("m", USER_CFG["datasets"], 5, 3)
        assert "sample_packing" not in cfg
    assert configs["dpo"]["rl"] == "dpo" and configs["dpo"]["rl_beta"] == 0.2
    assert configs["dpo"]["dpo_label_smoothing"] == 0.1
    assert configs["ipo"]["rl"] == "dpo" and configs["ipo"]["dpo_loss_type"] == ["ipo"]
    assert configs["simpo"]["rl"] == "simpo" and configs["simpo"]["simpo_gamma"] == 0.5
    assert "dpo_label_smoothing" not in configs["simpo"]
    for method in ("bnf", "asft"):
        assert configs[method]["rl"] == method
        assert "rl_beta" not in configs[method] and "dpo_label_smoothing" not in configs[method]
    assert derive_config({**USER_CFG, "rl_beta": None}, "dpo")["rl_beta"] == 0.1
    assert USER_CFG["output_dir"] == "out" and "rl" not in USER_CFG  # the user's config is not changed


@pytest.mark.parametrize("cfg, methods, match", [
    ({**USER_CFG, "rl": "dpo"}, ["bnf"], r"sets `rl: dpo`.*remove the `rl:` key"),
    (USER_CFG, ["dpo", "sft"], r"unknown method 'sft'"),
    (USER_CFG, ["orpo"], r"'orpo' cannot be compared"),
    (USER_CFG, ["kto"], r"'kto' cannot be compared"),
    ({k: v for k, v in USER_CFG.items() if k != "output_dir"}, ["bnf"], r"no `output_dir:`"),
    ({**USER_CFG, "bnf_rl": "bnf"}, ["bnf"], r"`bnf_rl`"),
])
def test_refusals_name_the_key_or_method(cfg, methods, match):
    with pytest.raises(CompareConfigError, match=match):
        derive_configs(cfg, methods)


def test_check_methods_normalises_names():
    assert check_methods(["DPO", " bnf "]) == ["dpo", "bnf"]


# ------------------------------------------------------------------------------------------ end to end
def _probe_records(run_dir: Path) -> dict[int, dict]:
    lines = [json.loads(line) for line in (run_dir / PROBE_LOG_FILE).read_text().splitlines()]
    return {r["step"]: r for r in lines if "step" in r and not r.get("summary")}


def test_dpo_probe_equals_direct_scoring_of_its_checkpoints(tiny_assets, tmp_path):
    """Axolotl's own DPO trainer with the probe: the probe at step N equals a full-logits scoring of checkpoint-N."""
    from transformers import AutoModelForCausalLM

    cfg = base_config(tiny_assets, tmp_path, "dpo", rl_beta=0.1, max_steps=4, save_strategy="steps", save_steps=2,
                      bnf_compare_probe=True, bnf_compare_probe_size=6, learning_rate=5e-3)
    run_axolotl("train", cfg, tmp_path)
    run_dir = tmp_path / "run"
    records = _probe_records(run_dir)
    assert sorted(records) == [0, 1, 2, 3, 4]
    examples = [json.loads(line) for line in (run_dir / PROBE_EXAMPLES_FILE).read_text().splitlines()]
    assert len(examples) == 6
    start = AutoModelForCausalLM.from_pretrained(tiny_assets / "model").eval()
    for step in (2, 4):
        checkpoint = AutoModelForCausalLM.from_pretrained(run_dir / f"checkpoint-{step}").eval()
        expected = naive_metrics(checkpoint, start, examples)
        for key, value in expected.items():
            assert records[step][key] == pytest.approx(value, abs=2e-5), (step, key)
    assert records[4]["probe/chosen"] != pytest.approx(0.0, abs=1e-4)  # training moved the policy


def test_compare_command_end_to_end(tiny_assets, tmp_path):
    cfg = base_config(tiny_assets, tmp_path, "dpo", max_steps=3, logging_steps=1, bnf_compare_probe_size=8)
    del cfg["rl"], cfg["plugins"]
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, **AXOLOTL_ENV}
    proc = subprocess.run([sys.executable, "-m", "axolotl_bnf_plugin.compare", str(path), "--methods", "dpo", "bnf"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = Path(cfg["output_dir"])
    for name in ("compare_table.md", "compare_table.json", "compare_likelihood.png", "compare_logits.png"):
        assert (out / name).stat().st_size > 200, name
    rows = json.loads((out / "compare_table.json").read_text())
    assert [r["method"] for r in rows] == ["dpo", "bnf"]
    table = (out / "compare_table.md").read_text()
    assert table in proc.stdout
    for row in rows:
        run_dir = out / row["method"]
        derived = yaml.safe_load((out / "compare_configs" / f"{row['method']}.yml").read_text())
        assert derived["output_dir"] == str(run_dir) and derived["bnf_compare_probe"] is True
        last = _probe_records(run_dir)[3]
        for key in ("probe/accuracy", "probe/chosen", "probe/rejected", "probe/chosen_down_frac", "probe/chosen_logit"):
            assert row[key] == last[key], (row["method"], key)
        assert f"{last['probe/chosen']:+.4f}" in table and f"{last['probe/rejected']:+.4f}" in table
        assert row["steps"] == 3 and row["seconds_per_step"] > 0 and row["peak_memory_MiB"] > 0
    # the same initial policy scored the same pairs in both runs
    baselines = [torch.load(out / m / "probe_baseline.pt") for m in ("dpo", "bnf")]
    for key in ("logp", "lse", "mask"):
        assert torch.equal(baselines[0][key], baselines[1][key]), key


def test_compare_refuses_a_config_with_rl(tmp_path):
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump({**USER_CFG, "rl": "dpo"}))
    proc = subprocess.run([sys.executable, "-m", "axolotl_bnf_plugin.compare", str(path)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "`rl: dpo`" in proc.stderr
