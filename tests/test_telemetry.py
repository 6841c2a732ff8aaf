"""Likelihood-shift metrics, the displacement warning, the memory pre-flight and the method card."""
from __future__ import annotations

import pytest
import torch

from axolotl_bnf_plugin.kernels import default_chunk_size
from axolotl_bnf_plugin.telemetry import DisplacementMonitor, method_card, preflight, shift_metrics
from axolotl_bnf_plugin.methods.asft import ASFT
from axolotl_bnf_plugin.methods.bnf import BNF
from axolotl_bnf_plugin.step_loss import LossSettings


def test_shift_metrics_by_hand():
    now = torch.tensor([[-1.0, -2.0, 0.0], [-3.0, -3.0, -3.0], [-0.5, 0.0, 0.0], [-9.0, 0.0, 0.0]])
    start = torch.tensor([[-1.5, -1.0, 0.0], [-2.0, -2.0, -5.0], [-1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [0, 0, 0]])
    sign = torch.tensor([1, -1, 1, 1])  # the last chosen row has no scored token: left out
    m = shift_metrics(now, start, mask, sign)
    # chosen rows: ((-1+1.5) + (-2+1)) / 2 = -0.25 and (-0.5+1) / 1 = 0.5; rejected: (-1 -1 +2) / 3 = 0
    assert float(m["shift/chosen"]) == pytest.approx((-0.25 + 0.5) / 2)
    assert float(m["shift/rejected"]) == pytest.approx(0.0)
    assert float(m["shift/chosen_down_frac"]) == pytest.approx(0.5)
    assert int(m.counts["shift/chosen"]) == 2 and int(m.counts["shift/rejected"]) == 1
    # Float noise between two scorings of the same weights is not a fall.
    noise = shift_metrics(start + 1e-6 * torch.randn_like(start), start, mask, sign)
    assert float(noise["shift/chosen_down_frac"]) == 0.0


def test_displacement_warns_once_on_a_falling_trajectory():
    monitor = DisplacementMonitor(patience=3)
    messages = [monitor.update(v) for v in [0.0, -0.1, -0.2, -0.3, -0.4, -0.5]]
    fired = [i for i, m in enumerate(messages) if m]
    assert fired == [3]  # after three consecutive falls, once
    assert "likelihood displacement" in messages[3] and "+0.0000 -> -0.3000" in messages[3]


@pytest.mark.parametrize("trajectory", [[0.0, 0.1, 0.2, 0.3, 0.4, 0.5], [0.0, -0.1, -0.2, 0.1, -0.1, -0.2, 0.3],
                                        [0.0, 0.0, 0.0, 0.0, 0.0]])
def test_displacement_stays_quiet_without_a_sustained_fall(trajectory):
    monitor = DisplacementMonitor(patience=3)
    assert not any(monitor.update(v) for v in trajectory)


def test_preflight_equals_the_formula():
    tokens, vocab = 4 * 2 * 512, 151936
    got = preflight(tokens, vocab, torch.bfloat16, with_reference=True)
    assert got["memory/preflight_full_logits_bytes"] == 2 * tokens * vocab * 2  # policy + reference, bf16
    chunk = default_chunk_size(vocab, torch.bfloat16)
    assert got["memory/preflight_chunk_rows"] == chunk
    assert got["memory/preflight_fused_workspace_bytes"] == chunk * vocab * (2 + 4 + 4)  # bf16 block, fp32 upcast, scratch
    no_ref = preflight(tokens, vocab, torch.float32, with_reference=False, chunk_size=64)
    assert no_ref["memory/preflight_full_logits_bytes"] == tokens * vocab * 4
    assert no_ref["memory/preflight_fused_workspace_bytes"] == 64 * vocab * (4 + 4)  # fp32 block + fp32 scratch
    # Triton on CUDA holds the bf16 block alone: five times the rows in the same workspace.
    triton = preflight(tokens, vocab, torch.bfloat16, with_reference=True, impl="triton")
    assert triton["memory/preflight_chunk_rows"] == default_chunk_size(vocab, torch.bfloat16, impl="triton")
    assert triton["memory/preflight_chunk_rows"] >= 4 * chunk
    assert triton["memory/preflight_fused_workspace_bytes"] == triton["memory/preflight_chunk_rows"] * vocab * 2


def test_method_card_names_method_formula_paper_and_reference():
    bnf = method_card(LossSettings(BNF(length_norm="batch_min")), "a frozen copy of the initial policy", "on", False)
    assert "2410.04834" in bnf and "q = min(p/p_ref, 1)" in bnf and "batch_min" in bnf and "frozen copy" in bnf
    asft = method_card(LossSettings(ASFT(lam=0.5)), "none", "eval only", True)
    assert "Aligned Supervised Fine-Tuning" in asft and "not Anchored SFT" in asft and "lambda=0.5" in asft and "shift metrics: eval only" in asft
    assert "reference-free" in asft and "sample packing: on" in asft

