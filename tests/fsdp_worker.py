"""Run by `test_fsdp.py` under `torchrun --nproc_per_node 2` (gloo, CPU): FSDP2 gradients of both losses.

Each process scores its own half of a step's examples with the step's n; FSDP2 reduce-scatters (averages)
the gradients. The gathered gradients must equal half the gradient of the whole step computed without
FSDP, for each place FSDP2 can put the output embedding. Writes one JSON record per case to argv[1].
"""
from __future__ import annotations

import copy
import json
import sys

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from axolotl_bnf_plugin.data.adapters import Candidate
from axolotl_bnf_plugin.data.collator import ResponseBatchCollator
from axolotl_bnf_plugin.data.examples import candidate_example
from axolotl_bnf_plugin.data.tokenize import LengthPolicy
from axolotl_bnf_plugin.losses import batch_normalizer
from axolotl_bnf_plugin.model_io import unwrap
from axolotl_bnf_plugin.tiny import build_model, build_tokenizer, toy_pairs
from axolotl_bnf_plugin.trainer import DisabledAdapter, LossSettings, batch_loss

# (layout, method, adapter): where the output embedding lives under FSDP2, and whether BNF's reference is the
# policy with its LoRA adapter disabled (same FSDP modules, scored under no_grad in the same step).
CASES = [("root", "bnf", False), ("root", "asft", False), ("own_unit", "bnf", False), ("own_unit", "asft", False),
         ("tied", "bnf", False), ("tied", "asft", False), ("own_unit", "bnf", True), ("root", "bnf", True)]


def examples_and_tokenizer():
    rows = toy_pairs(8, seed=3)
    tokenizer = build_tokenizer(rows)
    policy = LengthPolicy(256, "drop")
    out = []
    for i, row in enumerate(rows):
        prompt = [{"role": "user", "content": row["question"]}]
        answers = [({"role": "assistant", "content": row["chosen"] * (1 + i % 2)}, 1),
                   ({"role": "assistant", "content": row["rejected"]}, -1)]
        paired = i % 3 != 2
        out.append(candidate_example(Candidate(prompt, answers if paired else answers[1:], paired),
                                     tokenizer, tokenizer.chat_template, policy))
    return tokenizer, out


def build_policy(tokenizer, layout: str, adapter: bool, lora_head: bool = True):
    torch.manual_seed(0)
    model = build_model(len(tokenizer), seed=1, tie=layout == "tied").float()
    if adapter:
        targets = ["q_proj", "v_proj"] + (["lm_head"] if lora_head else [])
        config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, init_lora_weights=False)
        model = get_peft_model(model, config)
    return model


def shard(model, layout: str, mesh) -> None:
    base = unwrap(model)
    for layer in base.model.layers:
        fully_shard(layer, mesh=mesh)
    if layout == "own_unit":
        fully_shard(base.get_output_embeddings(), mesh=mesh)
    elif layout == "tied":
        fully_shard([base.get_input_embeddings(), base.get_output_embeddings()], mesh=mesh)
    fully_shard(model, mesh=mesh)


def run_case(layout, method, adapter, tokenizer, examples, rank, world):
    settings = LossSettings(method)
    collate = ResponseBatchCollator(tokenizer)
    half = len(examples) // world
    parts = [collate(examples[r * half:(r + 1) * half]) for r in range(world)]
    n_step = sum(float(batch_normalizer(p["pair_ids"], p["sign"].shape[0])) for p in parts)
    frozen = build_model(len(tokenizer), seed=2).float().eval().requires_grad_(False)

    def reference_of(model):
        if method != "bnf":
            return None
        return DisabledAdapter(model) if adapter else frozen

    whole = build_policy(tokenizer, layout, adapter)
    sharded = copy.deepcopy(whole)
    for part in parts:
        batch_loss(whole, part, settings, reference=reference_of(whole), normalizer=n_step)[0].backward()
    expected = {name: p.grad / world for name, p in whole.named_parameters() if p.grad is not None}

    shard(sharded, layout, init_device_mesh("cpu", (world,)))
    losses = []
    for _ in range(2):  # a second step: the head is gathered again after FSDP resharded it
        sharded.zero_grad()
        loss, _ = batch_loss(sharded, parts[rank], settings, reference=reference_of(sharded), normalizer=n_step)
        loss.backward()
        losses.append(loss.item())
    worst, missing = 0.0, []
    for name, p in sharded.named_parameters():
        if name in expected:
            if p.grad is None:
                missing.append(name)
            else:
                worst = max(worst, (p.grad.full_tensor() - expected[name]).abs().max().item())
    head_grad = unwrap(sharded).get_output_embeddings().weight.grad
    return {"layout": layout, "method": method, "adapter": adapter, "max_abs_err": worst,
            "missing_grads": missing, "params_expected": len(expected),
            "head_grad_norm": None if head_grad is None else head_grad.full_tensor().norm().item(),
            "steps_equal": losses[0] == losses[1]}


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    tokenizer, examples = examples_and_tokenizer()
    records = [run_case(*case, tokenizer, examples, rank, world) for case in CASES]
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(records, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
