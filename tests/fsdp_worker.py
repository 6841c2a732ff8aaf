"""Run by `test_fsdp.py` under `torchrun --nproc_per_node 2` (gloo, CPU): FSDP2 gradients of both losses.

For each place FSDP2 can put the output embedding, the gathered gradients must equal the unsharded
expectation of `sharded_step.ShardedStep`. Writes one JSON record per case to argv[1].
"""
from __future__ import annotations

import contextlib
import json
import sys

import torch
import torch.distributed as dist
from sharded_step import ShardedStep, run_cases
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from axolotl_bnf_plugin.model_io import keep_head_gathered_through_backward, resharded_after_each_forward, unwrap

# (layout, method, adapter): where the output embedding lives under FSDP2, and whether BNF's reference is the
# policy with its LoRA adapter (on lm_head too) disabled (same FSDP modules, scored under no_grad in the step).
# "root_resharded": the head in the root unit, sharded with reshard_after_forward=True as accelerate's FSDP2
# plugin and Axolotl pass it to every fully_shard: the head is a shard again when the loss needs it.
# "root_kept": resharded as above, then `keep_head_gathered_through_backward` (what the trainer does after
# accelerate's prepare): the root is gathered once per step. "own_unit_kept" / "tied_kept": the head in a unit of
# its own, the root resharded after forward and then kept (the final norm's backward needs the root's weights).
# "lora_units": Axolotl's FSDP2 prepare, which shards a LoRA layer's matrices on the head as units of their own.
CASES = [("root", "bnf", False), ("root", "asft", False), ("own_unit", "bnf", False), ("own_unit", "asft", False),
         ("tied", "bnf", False), ("tied", "asft", False), ("own_unit", "bnf", True), ("root", "bnf", True),
         ("root_resharded", "bnf", False), ("root_resharded", "asft", False), ("root_resharded", "bnf", True),
         ("root_kept", "bnf", False), ("root_kept", "asft", False), ("root_kept", "bnf", True),
         ("own_unit_kept", "bnf", False), ("own_unit_kept", "asft", False), ("tied_kept", "asft", False),
         ("lora_units", "bnf", True), ("lora_units", "asft", True)]


def shard(model, layout: str, mesh) -> None:
    base = unwrap(model)
    head = base.get_output_embeddings()
    for layer in base.model.layers:
        fully_shard(layer, mesh=mesh)
    if layout.startswith("own_unit"):
        fully_shard(head, mesh=mesh)
    elif layout.startswith("tied"):
        fully_shard([base.get_input_embeddings(), head], mesh=mesh)
    elif layout == "lora_units":
        for name in head.active_adapters:
            fully_shard(head.lora_A[name], mesh=mesh)
            fully_shard(head.lora_B[name], mesh=mesh)
    kept = layout.endswith("_kept") or layout == "lora_units"
    fully_shard(model, mesh=mesh, **({"reshard_after_forward": True} if layout.startswith("root_") or kept else {}))
    if kept:
        keep_head_gathered_through_backward(model)


class HeadGathers:
    """Counts the all-gathers that include the output embedding's weight."""

    def __init__(self, model):
        import torch.distributed.fsdp._fully_shard._fsdp_param_group as param_group

        self.module, self.count = param_group, 0
        self.original = param_group.foreach_all_gather
        head = unwrap(model).get_output_embeddings().weight

        def counting(fsdp_params, *args, **kwargs):
            self.count += any(p.sharded_param is head for p in fsdp_params)
            return self.original(fsdp_params, *args, **kwargs)

        param_group.foreach_all_gather = counting

    def close(self):
        self.module.foreach_all_gather = self.original


def run_case(layout, method, adapter, tokenizer, examples, rank, world):
    step = ShardedStep.build(method, adapter, layout == "tied", True, tokenizer, examples, world)
    sharded = step.policy
    shard(sharded, layout, init_device_mesh("cpu", (world,)))
    losses = []
    gathers = HeadGathers(sharded)
    for _ in range(2):  # a second step: the head is gathered again after FSDP resharded it
        sharded.zero_grad()
        loss, _ = step.loss(sharded, step.parts[rank])
        loss.backward()
        losses.append(loss.item())
    gathers.close()
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
            "steps_equal": losses[0] == losses[1], "head_gathers_per_step": gathers.count / 2}


def scoring_leaves_the_model_sharded(path: str) -> None:
    """Every unit kept gathered after its forward (`reshard_after_forward=False`): a no-grad pass (scoring the
    data once) leaves the layers gathered, unless run under `resharded_after_each_forward`. Writes, for a pass
    without and with it, how many parameters are left gathered (not DTensors)."""
    from sharded_step import build_policy, examples_and_tokenizer
    from torch.distributed.tensor import DTensor

    from axolotl_bnf_plugin.data.collator import ResponseBatchCollator
    from axolotl_bnf_plugin.model_io import response_token_logps

    tokenizer, examples = examples_and_tokenizer()
    batch = ResponseBatchCollator(tokenizer)(examples[:2])
    gathered = []
    for context in (contextlib.nullcontext, resharded_after_each_forward):
        model = build_policy(tokenizer, tied=False, adapter=False, lora_head=False)
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh, reshard_after_forward=False)
        fully_shard(model, mesh=mesh, reshard_after_forward=False)
        with torch.no_grad(), context(model) if context is resharded_after_each_forward else context():
            response_token_logps(model, batch)
        gathered.append(sum(not isinstance(p, DTensor) for p in model.parameters()))
    if dist.get_rank() == 0:
        with open(path, "w") as f:
            json.dump({"gathered_without": gathered[0], "gathered_with": gathered[1]}, f)


def main():
    dist.init_process_group("gloo")
    run_cases(CASES, run_case, sys.argv[1])
    scoring_leaves_the_model_sharded(sys.argv[1] + ".scoring.json")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
