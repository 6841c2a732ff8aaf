"""DeepSpeed ZeRO-3 (2 processes, gloo on CPU): the fused op scores the whole output embedding, gathered
by ZeRO-3 itself, and the gradients DeepSpeed assembles equal the unpartitioned ones.

Axolotl's DeepSpeed launch needs GPUs (accelerate has no CPU DeepSpeed mode), so this drives a ZeRO-3 engine
directly on the tiny model with `tests/zero3_worker.py`; the cases are listed there.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_two_process_worker

WORKER = Path(__file__).with_name("zero3_worker.py")


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero3") / "records.json"
    # gloo on CPU, also on a GPU machine
    return run_two_process_worker(WORKER, out, DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")


def test_every_case_ran_with_a_partitioned_head(records):
    from zero3_worker import CASES

    assert [(r["layout"], r["method"], r["adapter"]) for r in records] == [tuple(c) for c in CASES]
    assert all(r["head_partitioned"] for r in records)  # outside its call, the head really is partitioned


@pytest.mark.parametrize("index", range(6))
def test_partitioned_gradients_equal_unpartitioned(records, index):
    record = records[index]
    assert record["missing_grads"] == [], record
    assert record["max_abs_err"] <= 1e-6, record
    assert record["steps_equal"], record  # the head is gathered again on the next step
