"""`axolotl train` under FSDP2 and DeepSpeed ZeRO-3, launched as users launch it: 2 processes under torchrun,
Axolotl's `fsdp_config` keys and DeepSpeed JSON, accelerate's and Axolotl's own prepare code.

On GPUs the launch is the real one (2 GPUs needed). On a machine without GPUs, accelerate is made to take its
GPU code paths over gloo (`tests/launch_patches/sitecustomize.py`; the plugin is not touched), so CI runs the
same prepare code on CPU processes. Every run must really be sharded (each process prints what accelerate
prepared) and follow the 1-process trajectory step by step: 2 processes x micro-batch 2 see the same global
batches as 1 process x micro-batch 4.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import LORA_KEYS, base_config
from test_distributed import assert_same_run, run_torchrun, train

from axolotl_bnf_plugin.summary import LOG_HISTORY_FILE

needs_two_gpus_or_none = pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.device_count() < 2, reason="one GPU: a 2-process launch needs 2"
)
pytestmark = needs_two_gpus_or_none

# The keys Axolotl documents for FSDP2 (docs/multi-gpu.qmd), as a Llama config sets them.
FSDP2 = {"fsdp_version": 2, "fsdp_config": {"offload_params": False, "state_dict_type": "FULL_STATE_DICT",
                                            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                                            "transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
                                            "reshard_after_forward": True}}
# Axolotl's deepspeed_configs/zero3.json (bf16 / fp16 follow the run's own flags through "auto").
ZERO3_JSON = {
    "zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True, "sub_group_size": 0,
                          "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                          "stage3_param_persistence_threshold": "auto", "stage3_max_live_parameters": 0,
                          "stage3_max_reuse_distance": 0, "stage3_gather_16bit_weights_on_model_save": True},
    "bf16": {"enabled": "auto"},
    "fp16": {"enabled": "auto", "auto_cast": False, "loss_scale": 0, "initial_scale_power": 32,
             "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
    "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto", "wall_clock_breakdown": False,
}
PREPARED = re.compile(r"\[engines-on-cpu\] prepared \w+ under DistributedType\.(\w+): (\d+) parameters, "
                      r"(\d+) DTensor, (\d+) ZeRO-3")


def zero3(tmp_path: Path) -> dict:
    path = tmp_path / "zero3.json"
    path.write_text(json.dumps(ZERO3_JSON))
    return {"deepspeed": str(path)}


def engine_keys(engine: str, tmp_path: Path) -> dict:
    return {"ddp": {}, "fsdp2": FSDP2, "zero3": zero3(tmp_path) if engine == "zero3" else {}}[engine]


def assert_sharded(out: Path, engine: str) -> None:
    """Each process's model was prepared by the engine and every parameter is sharded (CPU launches only:
    on GPUs the launch is not instrumented)."""
    if torch.cuda.is_available():
        return
    prepared = PREPARED.findall((out / "launch.log").read_text())
    assert len(prepared) == 2, prepared
    for kind, total, dtensors, zero in prepared:
        if engine == "fsdp2":
            assert (kind, dtensors) == ("FSDP", total)
        else:
            assert (kind, zero) == ("DEEPSPEED", total)


_single_runs: dict = {}


def single_process_run(tiny_assets, tmp_path_factory, method, adapter):
    """The 1-process run every engine must follow (one per method and adapter, shared by the tests)."""
    key = (method, adapter)
    if key not in _single_runs:
        out = tmp_path_factory.mktemp(f"single-{method}-{'lora' if adapter else 'full'}")
        _single_runs[key] = train(tiny_assets, out, method, 1, micro_batch_size=4, **(LORA_KEYS if adapter else {}))
    return _single_runs[key]


@pytest.mark.parametrize("adapter", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("method", ["bnf", "asft"])
def test_fsdp2_follows_the_single_process_trajectory(tiny_assets, tmp_path, tmp_path_factory, method, adapter):
    """FSDP2 as accelerate's plugin and Axolotl's prepare shard it (every layer and the root, with
    reshard_after_forward): same losses, metrics and final weights as one process."""
    single = single_process_run(tiny_assets, tmp_path_factory, method, adapter)
    sharded = train(tiny_assets, tmp_path / "fsdp2", method, 2, micro_batch_size=2, **FSDP2,
                    **(LORA_KEYS if adapter else {}))
    assert_sharded(tmp_path / "fsdp2", "fsdp2")
    assert_same_run(single, sharded)
    if method == "bnf" and not adapter:
        assert_reference_sharded(tmp_path / "fsdp2")


def assert_reference_sharded(out: Path) -> None:
    """BNF's frozen reference holds no more on a process than the policy does: about half of the whole model
    on each of the 2 processes, not a replica."""
    from safetensors.torch import load_file

    whole = sum(t.numel() * 4 for t in load_file(str(out / "run" / "model.safetensors")).values()) / 2**20
    lines = re.findall(r"this process holds ([\d.]+) MiB of it \(of the policy: ([\d.]+) MiB\)",
                       (out / "launch.log").read_text())
    assert lines, "no line on the reference's sharding"
    for reference, policy in lines:
        assert float(reference) <= float(policy) < 0.6 * whole


@pytest.mark.parametrize("method", ["bnf", "asft"])
def test_fsdp2_with_cpu_ram_efficient_loading(tiny_assets, tmp_path, tmp_path_factory, method):
    """`cpu_ram_efficient_loading` (only the first process loads the weights; the engine broadcasts them as it
    shards): BNF's frozen reference is copied before that and sharded by the same engine, so it holds the
    initial weights on every process; the run follows the 1-process trajectory."""
    single = single_process_run(tiny_assets, tmp_path_factory, method, False)
    lazy = {"fsdp_version": 2, "fsdp_config": {**FSDP2["fsdp_config"], "cpu_ram_efficient_loading": True}}
    sharded = train(tiny_assets, tmp_path / "fsdp2", method, 2, micro_batch_size=2, **lazy)
    assert_sharded(tmp_path / "fsdp2", "fsdp2")
    assert_same_run(single, sharded)
    if method == "bnf":
        assert_reference_sharded(tmp_path / "fsdp2")


@pytest.mark.parametrize("adapter", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("method", ["bnf", "asft"])
def test_zero3_follows_the_single_process_trajectory(tiny_assets, tmp_path, tmp_path_factory, method, adapter):
    """DeepSpeed ZeRO-3 with Axolotl's zero3.json, through accelerate's DeepSpeed plugin: same losses, metrics and
    final weights as one process. BNF's frozen reference (full fine-tuning) is partitioned like the policy."""
    single = single_process_run(tiny_assets, tmp_path_factory, method, adapter)
    sharded = train(tiny_assets, tmp_path / "zero3", method, 2, micro_batch_size=2, **zero3(tmp_path),
                    **(LORA_KEYS if adapter else {}))
    assert_sharded(tmp_path / "zero3", "zero3")
    assert_same_run(single, sharded)
    if method == "bnf" and not adapter:
        assert_reference_sharded(tmp_path / "zero3")


def test_zero3_continuing_an_adapter_follows_the_single_process_trajectory(tiny_assets, tmp_path):
    """BNF continuing an SFT adapter (`lora_model_dir`) under ZeRO-3: the reference is base + a frozen copy of the
    starting adapter, made before the engine partitions the model; rewards start at 0 and the run follows the
    1-process one."""
    from test_initial_policy import _adapter_dir

    adapter = {"lora_model_dir": str(_adapter_dir(tiny_assets, tmp_path / "sft_adapter")), **LORA_KEYS}
    single = train(tiny_assets, tmp_path / "single", "bnf", 1, micro_batch_size=4, **adapter)
    sharded = train(tiny_assets, tmp_path / "zero3", "bnf", 2, micro_batch_size=2, **zero3(tmp_path), **adapter)
    assert_sharded(tmp_path / "zero3", "zero3")
    assert abs(sharded[0][0]["rewards/margins"]) < 1e-4
    assert_same_run(single, sharded)


_scored_single_runs: dict = {}


@pytest.mark.parametrize("engine", ["fsdp2-lazy", "zero3"])
@pytest.mark.parametrize("method", ["bnf", "asft"])
def test_data_scored_once_after_the_engine_prepared_the_model(tiny_assets, tmp_path, tmp_path_factory, method, engine):
    """ZeRO-3 loads the policy partitioned, and FSDP2's cpu_ram_efficient_loading on the first process only: the
    passes that score the data once with the initial policy (BNF's precomputed reference, here with full
    fine-tuning; ASFT's shift baseline on the training set) run once the engine has prepared the model, every
    process taking part in every forward, and the run follows the 1-process one (losses, rewards, shifts)."""
    scoring = {"bnf_precompute_ref": True} if method == "bnf" else {"asft_shift_on_train": True}
    if method not in _scored_single_runs:
        out = tmp_path_factory.mktemp(f"single-scored-{method}")
        _scored_single_runs[method] = train(tiny_assets, out, method, 1, micro_batch_size=4, **scoring)
    single = _scored_single_runs[method]
    assert all(r.get("shift/chosen") is not None for r in single[0]), "the 1-process run logged no shift"
    lazy = {"fsdp_version": 2, "fsdp_config": {**FSDP2["fsdp_config"], "cpu_ram_efficient_loading": True}}
    keys = lazy if engine == "fsdp2-lazy" else zero3(tmp_path)
    sharded = train(tiny_assets, tmp_path / engine, method, 2, micro_batch_size=2, **keys, **scoring)
    assert_sharded(tmp_path / engine, engine.split("-")[0])
    assert "scored once the engine has prepared the model" in (tmp_path / engine / "launch.log").read_text()
    assert_same_run(single, sharded)


def poisoned_run(tiny_assets, tmp_path, engine, poisoned_rows, method="asft", **overrides):
    """Train with the "<unk>" input embedding set to NaN and "<unk>" appended to the chosen answers of
    `poisoned_rows`: a micro-batch holding one of them has a non-finite loss and gradient."""
    from test_train_e2e import poisoned_data

    data, model_dir = poisoned_data(tiny_assets, tmp_path, poisoned_rows)
    cfg = base_config(tiny_assets, tmp_path, method, base_model=str(model_dir), micro_batch_size=1, max_steps=6,
                      datasets=[{"path": str(data), "ds_type": "json", "type": "chatml.intel"}],
                      shuffle_merged_datasets=False, bnf_max_bad_steps=3, optimizer="sgd", learning_rate=0.05,
                      **engine_keys(engine, tmp_path), **overrides)
    return run_torchrun(cfg, tmp_path, 2, check=False)


@pytest.mark.parametrize("engine", ["ddp", "fsdp2", "zero3"])
def test_a_non_finite_step_is_skipped_on_every_process_and_group(tiny_assets, tmp_path, engine):
    """One example with a NaN loss: its step is skipped on both processes and for every parameter group (ZeRO-3
    with Axolotl's `sub_group_size: 0` steps each parameter as a group of its own), every other step is taken,
    and no weight is NaN. Under DeepSpeed the engine steps inside `backward`, before the Trainer's optimizer
    step, so the decision must be taken there."""
    from safetensors.torch import load_file

    proc = poisoned_run(tiny_assets, tmp_path, engine, poisoned_rows=[3], lr_scheduler="linear")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    if engine != "ddp":
        assert_sharded(tmp_path, engine)
    assert "non-finite loss or gradient: optimiser step skipped" in out
    history = [json.loads(line) for line in (tmp_path / "run" / LOG_HISTORY_FILE).read_text().splitlines()]
    steps = [r for r in history if "loss" in r]
    assert len(steps) == 6
    # Exactly one step was skipped: the bad one, not also the next good one.
    assert steps[-1]["skipped_steps"] == 1
    # The learning-rate schedule (linear decay: a new rate every step) did not advance for the skipped step: the
    # step after it runs at the rate the skipped step would have used (each record logs the rate its step used).
    bad = next(i for i, r in enumerate(steps) if r["skipped_steps"] == 1)
    rates = [r["learning_rate"] for r in steps]
    held = [i for i in range(1, 6) if rates[i] == rates[i - 1]]
    assert held == ([bad + 1] if bad < 5 else []), (bad, rates)
    weights = load_file(str(tmp_path / "run" / "model.safetensors"))
    unk = 4
    for name, tensor in weights.items():
        finite = torch.isfinite(tensor.float())
        if "embed_tokens" in name:  # only the poisoned row itself may stay NaN
            finite[unk] = True
        assert finite.all(), name


@pytest.mark.parametrize("engine", ["fsdp2", "zero3"])
def test_consecutive_non_finite_steps_stop_the_run(tiny_assets, tmp_path, engine):
    proc = poisoned_run(tiny_assets, tmp_path, engine, poisoned_rows=list(range(64)))
    assert proc.returncode != 0
    assert "3 consecutive optimiser steps had a non-finite loss or gradient" in proc.stdout + proc.stderr


def test_deepspeed_skips_a_step_whose_gradient_alone_is_bad(tmp_path):
    """A finite loss with a NaN gradient on one process (`tests/guard_worker.py`, ZeRO-3 engines stepped as
    accelerate steps them, without and with accumulation): only the gradient check over both processes sees
    it. The step is skipped through DeepSpeed's own overflow path (the engine counts it), the steps before and
    after it are taken, and every weight stays finite."""
    from conftest import run_two_process_worker

    records = run_two_process_worker(Path(__file__).with_name("guard_worker.py"), tmp_path / "guard.json")
    assert [r["case"] for r in records] == ["zero3", "zero3-accumulate"]
    for record in records:
        moved = record["moved"]
        assert moved[1] == 0.0 and min(moved[0], moved[2], moved[3]) > 0, record
        assert (record["skipped"], record["engine_skipped"], record["consecutive"]) == (1, 1, 0), record
        assert record["finite"], record
