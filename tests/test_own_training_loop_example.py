"""`examples/own_training_loop.py` (docs/kernel.md: the plugin in your own training loop) runs with Axolotl,
TRL and datasets unimportable, and its plain PyTorch loop trains: on the toy pairs BNF raises the
chosen-over-rejected margin at every step, and ASFT lowers its loss at every step (what holds over the first
steps at the script's default learning rate, for every seed tried). BNF's precomputed reference log-probs give
the same run as its frozen copy of the model.
"""
from __future__ import annotations

import re

import pytest
from without_axolotl import REPO, run_script_without_axolotl

SCRIPT = REPO / "examples" / "own_training_loop.py"
STEPS = 6
STEP_LINE = re.compile(r"^step +(\d+)  loss (\S+)  margin (\S+)$", re.M)
FINAL_LINE = re.compile(r"^after \d+ steps: margin (\S+)$", re.M)


def _run(*args: str) -> tuple[list[float], list[float]]:
    """(losses, margins) of a run: a margin per step measured before its update, and one after the last."""
    proc = run_script_without_axolotl(SCRIPT, "--steps", str(STEPS), "--device", "cpu", *args)
    assert proc.returncode == 0, proc.stderr[-4000:]
    steps = STEP_LINE.findall(proc.stdout)
    assert [int(step) for step, _, _ in steps] == list(range(1, STEPS + 1)), proc.stdout
    final = FINAL_LINE.search(proc.stdout)
    assert final, proc.stdout
    return [float(loss) for _, loss, _ in steps], [float(m) for _, _, m in steps] + [float(final.group(1))]


@pytest.fixture(scope="module")
def bnf_run():
    return _run("--method", "bnf")


def test_bnf_raises_the_chosen_over_rejected_margin_at_every_step(bnf_run):
    _, margins = bnf_run
    assert all(after > before for before, after in zip(margins, margins[1:])), margins


def test_bnf_with_precomputed_reference_log_probs_trains_as_with_a_frozen_copy(bnf_run):
    losses, margins = _run("--method", "bnf", "--reference", "precomputed")
    assert losses == pytest.approx(bnf_run[0], abs=2e-4) and margins == pytest.approx(bnf_run[1], abs=2e-4)


def test_asft_lowers_its_loss_at_every_step():
    losses, _ = _run("--method", "asft")
    assert all(after < before for before, after in zip(losses, losses[1:])), losses
