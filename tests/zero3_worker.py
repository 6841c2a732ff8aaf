"""Run by `test_zero3.py` under `torchrun --nproc_per_node 2` (DeepSpeed ZeRO-3 on CPU, gloo).

As `fsdp_worker.py` for FSDP2: each process scores half of a step's examples with the step's n; the full
gradients DeepSpeed assembles from its partitions must equal half the unsharded gradient of the whole step.
Writes one JSON record per case to argv[1].
"""
from __future__ import annotations

import copy
import json
import sys

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad
from fsdp_worker import build_policy, examples_and_tokenizer

from axolotl_bnf_plugin.data.collator import ResponseBatchCollator
from axolotl_bnf_plugin.losses import batch_normalizer
from axolotl_bnf_plugin.model_io import unwrap
from axolotl_bnf_plugin.tiny import build_model
from axolotl_bnf_plugin.trainer import DisabledAdapter, LossSettings, batch_loss

# (layout, method, adapter): a LoRA policy is BNF's reference with its adapter disabled (the ZeRO-3 setup the
# config admits for BNF); its lm_head is frozen and not adapted.
CASES = [("untied", "bnf", False), ("untied", "asft", False), ("tied", "bnf", False), ("tied", "asft", False),
         ("untied", "bnf", True), ("tied", "bnf", True)]
ZERO3 = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
         "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
         "optimizer": {"type": "SGD", "params": {"lr": 0.0}}, "zero_allow_untested_optimizer": True}


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

    whole = build_policy(tokenizer, layout, adapter, lora_head=False)
    partitioned = copy.deepcopy(whole)
    for part in parts:
        batch_loss(whole, part, settings, reference=reference_of(whole), normalizer=n_step)[0].backward()
    expected = {name: p.grad / world for name, p in whole.named_parameters() if p.grad is not None}

    engine, *_ = deepspeed.initialize(model=partitioned, config=copy.deepcopy(ZERO3),
                                      model_parameters=partitioned.parameters())
    losses, worst, missing = [], 0.0, []
    for step in range(2):  # a second step: the head is gathered again after ZeRO-3 partitioned it
        loss, _ = batch_loss(engine, parts[rank], settings, reference=reference_of(engine), normalizer=n_step)
        engine.backward(loss)
        losses.append(loss.item())
        if step == 0:
            for name, p in engine.module.named_parameters():
                grad = safe_get_full_grad(p)
                if name not in expected:
                    continue
                if grad is None:
                    missing.append(name)
                else:
                    worst = max(worst, (grad.float() - expected[name]).abs().max().item())
        engine.step()
    head = unwrap(engine).get_output_embeddings().weight
    return {"layout": layout, "method": method, "adapter": adapter, "max_abs_err": worst, "missing_grads": missing,
            "params_expected": len(expected), "steps_equal": losses[0] == losses[1],
            "head_partitioned": tuple(head.shape) != tuple(head.ds_shape)}


def main():
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    tokenizer, examples = examples_and_tokenizer()
    records = [run_case(*case, tokenizer, examples, rank, world) for case in CASES]
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(records, f)


if __name__ == "__main__":
    main()
