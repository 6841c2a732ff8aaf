"""`num_epochs` without `max_steps`: one pass over the training data per epoch, on any number of processes.

The step count is asserted against the row count of the data file (never against the plugin's own step
formula), and the examples each step processed are counted by the trainer (`examples_seen`, summed over
processes), so a run that stops after half the data, or runs into a second epoch, fails.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import base_config
from test_distributed import run_torchrun

from axolotl_bnf_plugin.summary import LOG_HISTORY_FILE


def _rows(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip())


def _train_records(out: Path) -> list[dict]:
    history = [json.loads(line) for line in (out / "run" / LOG_HISTORY_FILE).read_text().splitlines()]
    return [r for r in history if "loss" in r]


@pytest.mark.parametrize("processes", [1, 2])
def test_one_epoch_sees_every_example_once(tiny_assets, tmp_path, processes):
    """64 pairs, micro-batch 4 on each of P processes: 64 / (4 P) optimiser steps, 64 examples, epoch 1.0."""
    data = tiny_assets / "pairs_intel.jsonl"
    rows, micro_batch = _rows(data), 4
    cfg = base_config(tiny_assets, tmp_path, "bnf", max_steps=None, num_epochs=1, micro_batch_size=micro_batch,
                      bnf_precompute_ref=True)
    run_torchrun(cfg, tmp_path, processes)
    records = _train_records(tmp_path)
    assert rows % (micro_batch * processes) == 0  # no partial batch: one pass is exactly this many steps
    assert len(records) == rows // (micro_batch * processes)
    assert records[-1]["examples_seen"] == rows
    assert records[-1]["epoch"] == pytest.approx(1.0)


def test_two_epochs_on_two_processes_see_every_example_twice(tiny_assets, tmp_path):
    """Unpaired rows (one response each) with gradient accumulation: 2 epochs x 64 rows / (2 x 2 x 2) steps."""
    data = tiny_assets / "unpaired.jsonl"
    rows = _rows(data)
    cfg = base_config(tiny_assets, tmp_path, "asft", datasets=[{"path": str(data), "ds_type": "json"}],
                      max_steps=None, num_epochs=2, micro_batch_size=2, gradient_accumulation_steps=2,
                      bnf_shift_metrics=False)
    run_torchrun(cfg, tmp_path, 2)
    records = _train_records(tmp_path)
    assert len(records) == 2 * rows // (2 * 2 * 2)
    assert records[-1]["examples_seen"] == 2 * rows
    assert records[-1]["epoch"] == pytest.approx(2.0)


def test_packed_epoch_on_two_processes_sees_every_example_once(tiny_assets, tmp_path):
    """With sample packing the number of bins depends on the lengths, so the assertion is on the data: every
    example is processed once, and training ends with the epoch (not after part of it, not in a second)."""
    data = tiny_assets / "pairs_intel.jsonl"
    rows = _rows(data)
    cfg = base_config(tiny_assets, tmp_path, "asft", max_steps=None, num_epochs=1, micro_batch_size=2,
                      sample_packing=True, sequence_len=256, bnf_shift_metrics=False)
    proc = run_torchrun(cfg, tmp_path, 2)
    records = _train_records(tmp_path)
    assert records[-1]["examples_seen"] == rows
    assert records[-1]["epoch"] == pytest.approx(1.0, abs=1e-6)
    assert "bin(s) repeated" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("world", [1, 2, 8])
@pytest.mark.parametrize("packing", [False, True], ids=["unpacked", "packed"])
def test_step_estimate_covers_one_pass_for_any_world_size(tiny_assets, tmp_path, monkeypatch, world, packing):
    """Axolotl's own config normalisation for a W-process launch, then the plugin's data loading: the steps
    it plans times the global batch cover the rows once (and not a W-th of them)."""
    from axolotl.utils.config import normalize_config, validate_config
    from axolotl.utils.dict import DictDefault

    from axolotl_bnf_plugin.config import translate_raw_config
    from axolotl_bnf_plugin.data.loader import load_bnf_datasets

    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("RANK", "0")
    raw = base_config(tiny_assets, tmp_path, "bnf", max_steps=None, num_epochs=1, micro_batch_size=2,
                      gradient_accumulation_steps=2, **({"sample_packing": True, "sequence_len": 256} if packing else {}))
    translate_raw_config(raw)
    from axolotl.integrations.base import PluginManager

    PluginManager.get_instance().register("axolotl_bnf_plugin.BNFPlugin")
    cfg = validate_config(DictDefault(raw))
    normalize_config(cfg)
    assert cfg.batch_size == 2 * 2 * world  # what Axolotl itself made of the launch
    meta = load_bnf_datasets(cfg)
    rows = _rows(tiny_assets / "pairs_intel.jsonl")
    if packing:
        # Each step packs micro_batch x sequence_len tokens per process; the plan must cover all the tokens
        # of the data once (bins at least half full): neither a W-th of them, nor W times.
        tokens = sum(meta.train_dataset["length"])
        per_step = 2 * 256 * 2 * world
        assert math.ceil(tokens / per_step) <= meta.total_num_steps <= math.ceil(2 * tokens / per_step) + 1
    else:
        assert meta.total_num_steps == math.ceil(rows / (2 * 2 * world))
