"""The core runs without Axolotl: with `axolotl`, `trl` and `datasets` unimportable (`without_axolotl`), the
fused op, the methods, the batch loss, the reference, the collator and the modules they import load, and a BNF
and an ASFT step on a tiny transformers model give a finite loss and a gradient.

Axolotl is imported by the plugin, the trainer and the data loader only; a module-level import of it (or of
TRL or datasets) on the path of any module below fails this test.
"""
from __future__ import annotations

import json

from without_axolotl import UNAVAILABLE, run_without_axolotl

CORE_MODULES = (
    "axolotl_bnf_plugin",
    "axolotl_bnf_plugin.kernels",
    "axolotl_bnf_plugin.methods",
    "axolotl_bnf_plugin.step_loss",
    "axolotl_bnf_plugin.initial_policy",
    "axolotl_bnf_plugin.reference",
    "axolotl_bnf_plugin.data.collator",
    "axolotl_bnf_plugin.numerics",
    "axolotl_bnf_plugin.model_io",
    "axolotl_bnf_plugin.tiny",
)

STEPS = f"""
import importlib
import json

import torch

for name in {CORE_MODULES!r}:
    importlib.import_module(name)

from axolotl_bnf_plugin.data.collator import REF_LOGPS, ResponseBatchCollator
from axolotl_bnf_plugin.initial_policy import live_reference
from axolotl_bnf_plugin.reference import initial_policy_logps
from axolotl_bnf_plugin.step_loss import LossSettings, batch_loss
from axolotl_bnf_plugin.tiny import build_model

model = build_model(vocab_size=32, hidden_size=32, layers=1)  # a LlamaConfig model, pad 0 / eos 3


class Tokenizer:  # all the collator asks of a tokenizer
    pad_token_id, eos_token_id = 0, 3


collator = ResponseBatchCollator(Tokenizer(), vocab_size=32)
# Two preference pairs (chosen first) and one unpaired response; 3 prompt tokens each.
examples = [
    {{"response_input_ids": [[1, 5, 6, 7, 8, 9, 3], [1, 5, 6, 10, 11, 3]], "response_prompt_len": [3, 3],
      "response_sign": [1, -1], "is_pair": True}},
    {{"response_input_ids": [[1, 12, 13, 14, 15, 3], [1, 12, 13, 16, 17, 18, 19, 3]], "response_prompt_len": [3, 3],
      "response_sign": [1, -1], "is_pair": True}},
    {{"response_input_ids": [[1, 20, 21, 22, 23, 3]], "response_prompt_len": [3], "response_sign": [-1],
      "is_pair": False}},
]


def step(settings, batch, **kwargs):
    model.zero_grad()
    loss, metrics = batch_loss(model, batch, settings, **kwargs)
    loss.backward()
    grads = {{name: p.grad.abs().sum().item() for name, p in model.named_parameters()}}
    finite = all(torch.isfinite(p.grad).all().item() for p in model.parameters())
    return {{"loss": loss.item(), "grads": grads, "finite_grads": finite, "metrics": sorted(metrics)}}


out = {{}}
out["bnf"] = step(LossSettings("bnf"), collator(examples), reference=live_reference(model))
# The initial policy's log-probs scored once by `reference` (a plain list of examples: no `datasets`) give
# the same loss as the live reference.
refs = initial_policy_logps(model, examples, collator, batch_size=2, device="cpu")
scored = [dict(example, **{{REF_LOGPS: ref}}) for example, ref in zip(examples, refs)]
out["bnf_precomputed"] = step(LossSettings("bnf"), collator(scored))
out["asft"] = step(LossSettings("asft"), collator(examples))
out["loaded"] = sorted(name for name in sys.modules if name.partition(".")[0] in {UNAVAILABLE!r})
try:
    import axolotl  # noqa: F401
    out["axolotl_importable"] = True
except ImportError:
    out["axolotl_importable"] = False
print("RESULT " + json.dumps(out))
"""


def test_core_trains_bnf_and_asft_with_axolotl_trl_and_datasets_unavailable():
    proc = run_without_axolotl(STEPS)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert out["axolotl_importable"] is False and out["loaded"] == []
    for method in ("bnf", "bnf_precomputed", "asft"):
        result = out[method]
        assert result["loss"] == result["loss"] and abs(result["loss"]) < float("inf"), (method, result["loss"])
        assert result["finite_grads"], method
        # Every parameter the scored tokens reach gets a gradient: the head, the embedding, each layer.
        grads = result["grads"]
        assert grads["lm_head.weight"] > 0 and grads["model.embed_tokens.weight"] > 0, (method, grads)
        assert all(value > 0 for name, value in grads.items() if "layers.0." in name), (method, grads)
    assert "rewards/margins" in out["bnf"]["metrics"] and "asft/align_loss" in out["asft"]["metrics"]
    assert abs(out["bnf_precomputed"]["loss"] - out["bnf"]["loss"]) < 1e-5
    assert out["bnf_precomputed"]["grads"]["lm_head.weight"] > 0
