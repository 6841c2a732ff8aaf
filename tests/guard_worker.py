"""Run by `test_engines.py` under `torchrun --nproc_per_node 2` (DeepSpeed on CPU, gloo): the step guard on real
ZeRO engines, stepped as accelerate steps them (the engine's `step()` right after `backward`, inside
accelerate's `backward`).

Each case trains a tiny model for steps good, bad, good, good, where the bad step has a finite loss and a NaN
gradient on one process only (so only the gradient check, over all processes, can see it). Writes one JSON
record per case to argv[1].
"""
from __future__ import annotations

import json
import sys

import deepspeed
import torch
import torch.distributed as dist

from axolotl_bnf_plugin.numerics import StepGuard

# (name, DeepSpeed config): Axolotl's zero3.json layout (each parameter its own sub-group), without and with
# accumulation over 2 micro-batches (the bad micro-batch first: the next one adds onto its gradients). ZeRO-1/2
# do not step on CPU processes (DeepSpeed 0.18's all-gather into split views fails under gloo).
BASE = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
        "zero_allow_untested_optimizer": True}
CASES = [
    ("zero3", {**BASE, "gradient_accumulation_steps": 1,
               "zero_optimization": {"stage": 3, "sub_group_size": 0, "stage3_param_persistence_threshold": 0}}),
    ("zero3-accumulate", {**BASE, "gradient_accumulation_steps": 2,
                          "zero_optimization": {"stage": 3, "sub_group_size": 0,
                                                "stage3_param_persistence_threshold": 0}}),
]


def any_process(flag) -> bool:
    value = torch.as_tensor(flag).float().reshape(1)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def local_weights(engine) -> torch.Tensor:
    """This process's partition of every parameter (what its optimiser updates)."""
    return torch.cat([p.ds_tensor.detach().reshape(-1).clone() for p in engine.module.parameters()])


def largest_change(before: torch.Tensor, after: torch.Tensor) -> float:
    change = (after - before).abs().max().reshape(1)
    dist.all_reduce(change, op=dist.ReduceOp.MAX)
    return change.item()


def run_case(name, config, rank):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    engine, *_ = deepspeed.initialize(model=model, config=json.loads(json.dumps(config)),
                                      model_parameters=model.parameters())
    guard = StepGuard(max_bad_steps=3)
    guard.wrap_zero_optimizer(engine.optimizer, distributed_any=any_process)
    accumulate = config["gradient_accumulation_steps"]
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(rank))
    moved = []
    for step, bad in enumerate([False, True, False, False]):
        before = local_weights(engine)
        for micro in range(accumulate):
            out = engine(x).sum()
            loss = out * 1e-3
            if bad and rank == 1 and micro == 0:
                # Finite loss, NaN gradient: d sqrt(|u|) / du at u = 0 is inf, times d|u| / du = 0.
                loss = loss + torch.sqrt((out - out.detach()).abs())
                assert torch.isfinite(loss)
            guard.observe(loss, torch.tensor([step]))
            engine.backward(loss)
            engine.step()  # what accelerate's DeepSpeedEngineWrapper.backward does; a no-op until the boundary
        moved.append(largest_change(before, local_weights(engine)))
    weights = local_weights(engine)
    return {"case": name, "moved": moved, "skipped": guard.skipped, "engine_skipped": engine.skipped_steps,
            "finite": not any_process(~torch.isfinite(weights).all()), "consecutive": guard.consecutive}


def main():
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    records = [run_case(name, config, rank) for name, config in CASES]
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(records, f)


if __name__ == "__main__":
    main()
