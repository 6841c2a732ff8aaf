"""FSDP2 with a bf16 mixed-precision policy, as accelerate builds it from `mixed_precision: bf16`
(`MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`, every unit and the root resharded after forward):
the fused op scores with the head FSDP2 gathered and cast, inside the same unit's forward-to-backward window
(`keep_head_gathered_through_backward`), and a step gives the loss and gradients of the same model run in bf16
without FSDP. One process: on a GPU over NCCL with the Triton kernels (the GPU suite runs this file), elsewhere
over gloo with the PyTorch rows. The multi-process engine runs (`test_engines.py`) are fp32: this is their bf16
path on the device's own stack.
"""
from __future__ import annotations

import copy
import socket

import pytest
import torch
import torch.distributed as dist
from test_packing import setup  # noqa: F401  (fixture)

from axolotl_bnf_plugin.data.collator import ResponseBatchCollator
from axolotl_bnf_plugin.initial_policy import FrozenCopy
from axolotl_bnf_plugin.model_io import keep_head_gathered_through_backward
from axolotl_bnf_plugin.step_loss import LossSettings, batch_loss

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def one_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already up in this process")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl" if DEVICE.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _step(model, reference, batch, method):
    model.zero_grad(set_to_none=True)
    loss, _ = batch_loss(model, batch, LossSettings(method), reference=reference)
    loss.backward()
    grads = {n: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
             for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach().float(), {n: g.float() for n, g in grads.items()}


@pytest.mark.parametrize("method", ["bnf", "asft"])
def test_a_bf16_mixed_precision_step_equals_the_bf16_model(setup, one_process_group, method):  # noqa: F811
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    tokenizer, examples, policy, reference = setup
    batch = {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in ResponseBatchCollator(tokenizer)(examples).items()}
    frozen = FrozenCopy(copy.deepcopy(reference).to(DEVICE, torch.bfloat16)) if method == "bnf" else None
    expected_loss, expected = _step(copy.deepcopy(policy).to(DEVICE, torch.bfloat16), frozen, batch, method)

    sharded = copy.deepcopy(policy).to(DEVICE)  # fp32 weights; FSDP2 computes with bf16 copies
    policy_mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    mesh = init_device_mesh(DEVICE.type, (1,))
    for layer in sharded.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy_mp, reshard_after_forward=True)
    fully_shard(sharded, mesh=mesh, mp_policy=policy_mp, reshard_after_forward=True)
    assert keep_head_gathered_through_backward(sharded) == [sharded]  # the root holds the head
    for _ in range(2):  # the second step gathers the head again after FSDP2's backward resharded it
        loss, grads = _step(sharded, frozen, batch, method)
        torch.testing.assert_close(loss, expected_loss, rtol=2e-2, atol=2e-3)
        assert grads.keys() == expected.keys()
        for name, grad in grads.items():
            assert torch.isfinite(grad).all(), name
            scale = expected[name].abs().max().clamp(min=1e-6)
            assert (grad - expected[name]).abs().max() <= 3e-2 * scale, name
    assert sharded.lm_head.weight.grad.dtype == torch.float32  # reduced in fp32 onto the fp32 shard
