"""A model spread over several devices in one process (`device_map`, as accelerate dispatches it; Axolotl's
default with one process on a machine with several GPUs): the fused op runs on the output embedding's
device and its results come back to the batch's, so the loss and every gradient equal a one-device run. An
lm_head offloaded to the CPU or disk is loaded by accelerate's hook for the op, inside the head's own call.
"""
from __future__ import annotations

import copy

import pytest
import torch
from test_packing import setup  # noqa: F401  (fixture)

from axolotl_bnf_plugin.data.collator import ResponseBatchCollator
from axolotl_bnf_plugin.initial_policy import FrozenCopy
from axolotl_bnf_plugin.step_loss import LossSettings, batch_loss


def _step(model, reference, batch, impl="torch"):
    model.zero_grad(set_to_none=True)
    loss, _ = batch_loss(model, batch, LossSettings("bnf", impl=impl), reference=reference)
    loss.backward()
    return loss.detach().cpu(), {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None}


def test_an_offloaded_head_is_loaded_by_its_hook_and_trains_like_one_device(setup, tmp_path):  # noqa: F811
    """`lm_head` offloaded to disk (its weight is `meta` between calls): the op runs inside the head's own call,
    where accelerate's hook loads it, and gives the loss and gradients of the model kept whole."""
    from accelerate import dispatch_model

    tokenizer, examples, policy, reference = setup
    batch = ResponseBatchCollator(tokenizer)(examples)
    expected = _step(copy.deepcopy(policy), FrozenCopy(reference), batch)
    device_map = {"model": "cpu", "lm_head": "disk"}
    model = dispatch_model(copy.deepcopy(policy), device_map=device_map, offload_dir=str(tmp_path / "policy"))
    frozen = dispatch_model(copy.deepcopy(reference), device_map=device_map, offload_dir=str(tmp_path / "ref"))
    assert model.lm_head.weight.device.type == "meta"
    loss, grads = _step(model, FrozenCopy(frozen), batch)
    torch.testing.assert_close(loss, expected[0], rtol=1e-5, atol=1e-6)
    assert grads.keys() == {k for k in expected[1] if "lm_head" not in k}  # an offloaded weight gets no gradient
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_head_on_meta_without_a_hook_is_refused_naming_device_map(setup):  # noqa: F811
    tokenizer, examples, policy, _ = setup
    model = copy.deepcopy(policy)
    model.lm_head.to("meta")
    with pytest.raises(RuntimeError, match="device_map that offloads lm_head"):
        batch_loss(model, ResponseBatchCollator(tokenizer)(examples), LossSettings("asft"))


def _split_maps():
    if not torch.cuda.is_available():
        return []
    maps = [pytest.param({"model": "cpu", "lm_head": 0}, id="decoder-cpu-head-gpu"),
            pytest.param({"model": 0, "lm_head": "cpu"}, id="decoder-gpu-head-cpu")]
    if torch.cuda.device_count() > 1:
        maps.append(pytest.param({"model": 0, "lm_head": 1}, id="two-gpus"))
    return maps


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("device_map", _split_maps())
def test_a_split_model_trains_like_one_device(setup, device_map):  # noqa: F811
    """BNF (policy and its frozen reference both dispatched): loss and gradients equal the CPU model's."""
    from accelerate import dispatch_model

    tokenizer, examples, policy, reference = setup
    batch = ResponseBatchCollator(tokenizer)(examples)
    expected = _step(copy.deepcopy(policy), FrozenCopy(reference), batch)
    split = dispatch_model(copy.deepcopy(policy), device_map=device_map)
    split_reference = FrozenCopy(dispatch_model(copy.deepcopy(reference), device_map=device_map))
    first = torch.device("cuda", 0) if device_map["model"] == 0 else torch.device("cpu")
    impl = "auto" if split.lm_head.weight.device.type == "cuda" else "torch"
    batch = {k: v.to(first) if torch.is_tensor(v) else v for k, v in batch.items()}
    loss, grads = _step(split, split_reference, batch, impl=impl)
    torch.testing.assert_close(loss, expected[0], rtol=1e-4, atol=1e-5)
    assert grads.keys() == expected[1].keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[1][name], rtol=1e-3, atol=1e-5, msg=name)
