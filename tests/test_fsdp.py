"""FSDP2 (torch `fully_shard`, 2 processes, gloo on CPU): the fused op scores the whole output embedding,
gathered wherever FSDP2 put it, and the sharded gradients equal the unsharded ones.

Axolotl's own FSDP launch needs GPUs (accelerate has no CPU FSDP mode), so this drives FSDP2 directly on the
tiny model with `tests/fsdp_worker.py`; the cases are listed there.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_two_process_worker

WORKER = Path(__file__).with_name("fsdp_worker.py")


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return run_two_process_worker(WORKER, tmp_path_factory.mktemp("fsdp") / "records.json")


def test_every_layout_and_method_ran(records):
    from fsdp_worker import CASES

    assert [(r["layout"], r["method"], r["adapter"]) for r in records] == [tuple(c) for c in CASES]


@pytest.mark.parametrize("index", range(11))
def test_sharded_gradients_equal_unsharded(records, index):
    record = records[index]
    assert record["missing_grads"] == [], record
    assert record["max_abs_err"] <= 1e-6, record
    if not record["adapter"]:
        assert record["head_grad_norm"] > 0, record  # the output embedding itself was trained
    assert record["steps_equal"], record  # the head is gathered again on the next step
