"""The data, models and unsharded expectation shared by `fsdp_worker.py` and `zero3_worker.py`.

A step's examples are split evenly over the processes, each scoring its part with the step's n; the engine
averages gradients over processes, so each process must end with half (1 / world) of the gradient the
unsharded model gets from the whole step.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model

from axolotl_bnf_plugin.data.adapters import Candidate
from axolotl_bnf_plugin.data.collator import ResponseBatchCollator
from axolotl_bnf_plugin.data.examples import candidate_example
from axolotl_bnf_plugin.data.tokenize import LengthPolicy
from axolotl_bnf_plugin.methods import batch_normalizer
from axolotl_bnf_plugin.tiny import build_model, build_tokenizer, toy_pairs
from axolotl_bnf_plugin.initial_policy import DisabledAdapter
from axolotl_bnf_plugin.step_loss import LossSettings, batch_loss


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


def build_policy(tokenizer, tied: bool, adapter: bool, lora_head: bool):
    torch.manual_seed(0)
    model = build_model(len(tokenizer), seed=1, tie=tied).float()
    if adapter:
        targets = ["q_proj", "v_proj"] + (["lm_head"] if lora_head else [])
        config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, init_lora_weights=False)
        model = get_peft_model(model, config)
    return model


@dataclass
class ShardedStep:
    """One step's parts, the loss settings, BNF's reference and the gradient each process must reach."""

    method: str
    adapter: bool
    settings: LossSettings
    parts: list
    n_step: float
    frozen_reference: torch.nn.Module
    expected: dict
    policy: torch.nn.Module  # an untouched copy of the initial policy, for the engine to shard

    @classmethod
    def build(cls, method, adapter, tied, lora_head, tokenizer, examples, world):
        collate = ResponseBatchCollator(tokenizer)
        half = len(examples) // world
        parts = [collate(examples[r * half:(r + 1) * half]) for r in range(world)]
        n_step = sum(float(batch_normalizer(p["pair_ids"], p["sign"].shape[0])) for p in parts)
        frozen = build_model(len(tokenizer), seed=2).float().eval().requires_grad_(False)
        whole = build_policy(tokenizer, tied, adapter, lora_head)
        step = cls(method, adapter, LossSettings(method), parts, n_step, frozen, {}, copy.deepcopy(whole))
        for part in parts:
            step.loss(whole, part)[0].backward()
        step.expected = {name: p.grad / world for name, p in whole.named_parameters() if p.grad is not None}
        return step

    def loss(self, model, part):
        reference = None
        if self.method == "bnf":
            reference = DisabledAdapter(model) if self.adapter else self.frozen_reference
        return batch_loss(model, part, self.settings, reference=reference, normalizer=self.n_step)


def run_cases(cases, run_case, path: str) -> None:
    """Run every case on every process (the process group is up); rank 0 writes the records to `path`."""
    rank, world = dist.get_rank(), dist.get_world_size()
    tokenizer, examples = examples_and_tokenizer()
    records = [run_case(*case, tokenizer, examples, rank, world) for case in cases]
    if rank == 0:
        with open(path, "w") as f:
            json.dump(records, f)
