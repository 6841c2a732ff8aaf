"""FSDP2 (torch `fully_shard`, 2 processes, gloo on CPU): the fused op scores the whole output embedding,
gathered wherever FSDP2 put it, and the sharded gradients equal the unsharded ones.

Axolotl's own FSDP launch needs GPUs (accelerate has no CPU FSDP mode), so this drives FSDP2 directly on the
tiny model with `tests/fsdp_worker.py`; the cases are listed there.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_two_process_worker

WORKER = Path(__file__).with_name("fsdp_worker.py")


@pytest.fixture(scope="module")
def worker_output(tmp_path_factory):
    path = tmp_path_factory.mktemp("fsdp") / "records.json"
    return run_two_process_worker(WORKER, path), json.loads(Path(f"{path}.scoring.json").read_text())


@pytest.fixture(scope="module")
def records(worker_output):
    return worker_output[0]


def test_every_layout_and_method_ran(records):
    from fsdp_worker import CASES

    assert [(r["layout"], r["method"], r["adapter"]) for r in records] == [tuple(c) for c in CASES]


@pytest.mark.parametrize("index", range(19))
def test_sharded_gradients_equal_unsharded(records, index):
    record = records[index]
    assert record["missing_grads"] == [], record
    assert record["max_abs_err"] <= 1e-6, record
    if not record["adapter"]:
        assert record["head_grad_norm"] > 0, record  # the output embedding itself was trained
    assert record["steps_equal"], record  # the head is gathered again on the next step


def test_the_head_is_gathered_once_per_step_once_kept_through_backward(records):
    """accelerate's FSDP2 prepare reshards the root (which holds the head) after its forward, so the fused op
    gathers it a second time; kept gathered until its backward (`keep_head_gathered_through_backward`, as the
    trainer sets it), it is gathered once per step. BNF with LoRA adds a no-grad reference forward per step."""
    per_step = {(r["layout"], r["method"], r["adapter"]): r["head_gathers_per_step"] for r in records}
    assert per_step[("root_kept", "bnf", False)] == per_step[("root_kept", "asft", False)] == 1
    assert per_step[("root_resharded", "bnf", False)] > 1
    assert per_step[("root_kept", "bnf", True)] < per_step[("root_resharded", "bnf", True)]


def test_a_scoring_pass_leaves_units_that_keep_their_weights_sharded(worker_output):
    """With `reshard_after_forward: false` every unit stays gathered after a forward until its backward; a pass
    with no backward (the data scored once after the engine's prepare) is run resharding each unit after its
    forward, so that it does not leave a whole replica of the model on every process."""
    scoring = worker_output[1]
    assert scoring["gathered_without"] > 0
    assert scoring["gathered_with"] == 0
