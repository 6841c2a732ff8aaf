"""Run by `test_fsdp.py` under `torchrun --nproc_per_node 2` (gloo, CPU): FSDP2 gradients of both losses.

For each place FSDP2 can put the output embedding, the gathered gradients must equal the unsharded
expectation of `sharded_step.ShardedStep`. Writes one JSON record per case to argv[1].
"""
from __future__ import annotations

import sys

import torch.distributed as dist
from sharded_step import ShardedStep, run_cases
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from axolotl_bnf_plugin.model_io import unwrap

# (layout, method, adapter): where the output embedding lives under FSDP2, and whether BNF's reference is the
# policy with its LoRA adapter (on lm_head too) disabled (same FSDP modules, scored under no_grad in the step).
# "root_resharded": the head in the root unit, sharded with reshard_after_forward=True as accelerate's FSDP2
# plugin and Axolotl pass it to every fully_shard: the head is a shard again when the loss needs it.
CASES = [("root", "bnf", False), ("root", "asft", False), ("own_unit", "bnf", False), ("own_unit", "asft", False),
         ("tied", "bnf", False), ("tied", "asft", False), ("own_unit", "bnf", True), ("root", "bnf", True),
         ("root_resharded", "bnf", False), ("root_resharded", "asft", False), ("root_resharded", "bnf", True)]


def shard(model, layout: str, mesh) -> None:
    base = unwrap(model)
    for layer in base.model.layers:
        fully_shard(layer, mesh=mesh)
    if layout == "own_unit":
        fully_shard(base.get_output_embeddings(), mesh=mesh)
    elif layout == "tied":
        fully_shard([base.get_input_embeddings(), base.get_output_embeddings()], mesh=mesh)
    fully_shard(model, mesh=mesh, **({"reshard_after_forward": True} if layout == "root_resharded" else {}))


def run_case(layout, method, adapter, tokenizer, examples, rank, world):
    step = ShardedStep.build(method, adapter, layout == "tied", True, tokenizer, examples, world)
    sharded = step.policy
    shard(sharded, layout, init_device_mesh("cpu", (world,)))
    losses = []
    for _ in range(2):  # a second step: the head is gathered again after FSDP resharded it
        sharded.zero_grad()
        loss, _ = step.loss(sharded, step.parts[rank])
        loss.backward()
        losses.append(loss.item())
    worst, missing = 0.0, []
    for name, p in sharded.named_parameters():
        if name in step.expected:
            if p.grad is None:
                missing.append(name)
            else:
                worst = max(worst, (p.grad.full_tensor() - step.expected[name]).abs().max().item())
    head_grad = unwrap(sharded).get_output_embeddings().weight.grad
    return {"layout": layout, "method": method, "adapter": adapter, "max_abs_err": worst,
            "missing_grads": missing, "params_expected": len(step.expected),
            "head_grad_norm": None if head_grad is None else head_grad.full_tensor().norm().item(),
            "steps_equal": losses[0] == losses[1]}


def main():
    dist.init_process_group("gloo")
    run_cases(CASES, run_case, sys.argv[1])
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
