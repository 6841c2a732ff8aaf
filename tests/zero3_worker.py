"""Run by `test_zero3.py` under `torchrun --nproc_per_node 2` (DeepSpeed ZeRO-3 on CPU, gloo).

The full gradients DeepSpeed assembles from its partitions must equal the unsharded expectation of
`sharded_step.ShardedStep`. Writes one JSON record per case to argv[1].
"""
from __future__ import annotations

import copy
import sys

import deepspeed
from deepspeed.utils import safe_get_full_grad
from sharded_step import ShardedStep, run_cases

from axolotl_bnf_plugin.model_io import unwrap

# (layout, method, adapter): a LoRA policy is BNF's reference with its adapter disabled (the ZeRO-3 setup the
# config admits for BNF); its lm_head is frozen and not adapted.
CASES = [("untied", "bnf", False), ("untied", "asft", False), ("tied", "bnf", False), ("tied", "asft", False),
         ("untied", "bnf", True), ("tied", "bnf", True)]
ZERO3 = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
         "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
         "optimizer": {"type": "SGD", "params": {"lr": 0.0}}, "zero_allow_untested_optimizer": True}


def run_case(layout, method, adapter, tokenizer, examples, rank, world):
    step = ShardedStep.build(method, adapter, layout == "tied", False, tokenizer, examples, world)
    engine, *_ = deepspeed.initialize(model=step.policy, config=copy.deepcopy(ZERO3),
                                      model_parameters=step.policy.parameters())
    losses, worst, missing = [], 0.0, []
    for index in range(2):  # a second step: the head is gathered again after ZeRO-3 partitioned it
        loss, _ = step.loss(engine, step.parts[rank])
        engine.backward(loss)
        losses.append(loss.item())
        if index == 0:
            for name, p in engine.module.named_parameters():
                if name not in step.expected:
                    continue
                grad = safe_get_full_grad(p)
                if grad is None:
                    missing.append(name)
                else:
                    worst = max(worst, (grad.float() - step.expected[name]).abs().max().item())
        engine.step()
    head = unwrap(engine).get_output_embeddings().weight
    return {"layout": layout, "method": method, "adapter": adapter, "max_abs_err": worst, "missing_grads": missing,
            "params_expected": len(step.expected), "steps_equal": losses[0] == losses[1],
            "head_partitioned": tuple(head.shape) != tuple(head.ds_shape)}


def main():
    deepspeed.init_distributed(dist_backend="gloo")
    run_cases(CASES, run_case, sys.argv[1])


if __name__ == "__main__":
    main()
