"""The roofline model of the fused op (benchmarks/roofline.py): exact flop counts, chunk sizes taken from the
package's schedule, time bounds, byte comparisons, and the measured-row join."""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from axolotl_bnf_plugin.kernels.schedule import (COMPUTE_BOUND_ROWS, DEFAULT_WORKSPACE_BYTES, default_chunk_size,
                                                 vocab_slice_cols)

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "roofline.py"
_spec = importlib.util.spec_from_file_location("roofline", SCRIPT)
rl = importlib.util.module_from_spec(_spec)
sys.modules["roofline"] = rl
_spec.loader.exec_module(rl)

BF16 = torch.bfloat16
MIB = 2**20
# Default shapes plus ragged ones (N not a multiple of the chunk, V not a multiple of the slice).
SHAPES = rl.DEFAULT_SHAPES + [(1000, 512, 32003), (5000, 2048, 151936), (70000, 4096, 128256)]


def _flops_factor(name: str, liger_reduction: str = "none") -> int:
    if name == "liger flce":
        return 8 if liger_reduction == "none" else 6
    return 8 if "two-pass" in name else 6


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("liger_reduction", ["none", "mean"])
def test_flops_are_exactly_6_or_8_nhv(shape, liger_reduction):
    N, H, V = shape
    for s in rl.schedules(N, H, V, BF16, liger_reduction=liger_reduction):
        assert s.flops == _flops_factor(s.name, liger_reduction) * N * H * V, s.name


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("liger_reduction", ["none", "mean"])
def test_frozen_weight_flops_drop_the_weight_products(shape, liger_reduction):
    """A frozen head: ours build d hidden in the forward (4NHV, as naive); Liger drops its d weight GEMM."""
    N, H, V = shape
    for s in rl.schedules(N, H, V, BF16, liger_reduction=liger_reduction, frozen_weight=True):
        expected = _flops_factor(s.name, liger_reduction) - 2 if s.name == "liger flce" else 4
        assert s.flops == expected * N * H * V, s.name
        assert not any("d weight" in p.name for p in s.phases) and "fp32 [V,H]" not in s.temporaries, s.name
        assert s.model_flops(N, H, V) == 4 * N * H * V


def _rows(H, V, ws=DEFAULT_WORKSPACE_BYTES, weight_grad=True):
    return default_chunk_size(V, BF16, ws, "triton", "cuda", hidden_size=H if weight_grad else 0)


def _cols(N, H, V, ws=DEFAULT_WORKSPACE_BYTES):
    return vocab_slice_cols(N, V, BF16, "triton", "cuda", ws, chunk_size=_rows(H, V, ws), hidden_size=H)


def test_row_chunked_fallback_backward_also_counts_8_nhv():
    N, H, V, ws = 16384, 128, 128256, 16 * MIB
    assert _cols(N, H, V, ws) is None
    s = rl.two_pass(N, H, V, BF16, ws)
    assert s.flops == 8 * N * H * V
    assert s.temporaries == {"block": _rows(H, V, ws) * V * 2, "fp32 [V,H]": V * H * 4}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("workspace", [DEFAULT_WORKSPACE_BYTES, 128 * MIB, 1024 * MIB])
def test_chunk_sizes_come_from_the_package_schedule(shape, workspace):
    N, H, V = shape
    C, S = _rows(H, V, workspace), _cols(N, H, V, workspace)
    sp, tp = rl.single_pass(N, H, V, BF16, workspace), rl.two_pass(N, H, V, BF16, workspace)
    assert sp.extra == {"C": C, "chunks": math.ceil(N / C)} and tp.extra == {"C": C, "S": S}
    calls = {name: row[0] for name, row in sp.by_phase(rl.GPU("x", 1, 1)).items()}
    assert calls["logits GEMM h_c @ W^T"] == calls["d weight addmm into fp32 [V,H]"] == math.ceil(N / C)
    if S is not None:
        calls = {name: row[0] for name, row in tp.by_phase(rl.GPU("x", 1, 1)).items()}
        assert calls["bwd logits GEMM hidden @ W_s^T"] == math.ceil(V / S)
        assert calls["fwd logits GEMM h_c @ W^T"] == math.ceil(N / C)


def test_single_pass_accumulator_traffic_is_per_chunk():
    H = 4096
    for N, V in [(16384, 128256), (32768, 128256), (16384, 151936), (32768, 151936)]:
        for mib in (256, 1024):
            s = rl.single_pass(N, H, V, BF16, mib * MIB)
            addmm = [p for p in s.phases if p.name == "d weight addmm into fp32 [V,H]"]
            assert sum(p.calls for p in addmm) == math.ceil(N / _rows(H, V, mib * MIB))
            # Each addmm reads and writes the whole fp32 [V, H]; the rest of its bytes is the block and h_c.
            assert all(p.bytes == p.flops // (2 * V * H) * (V * 2 + H * 2) + 2 * V * H * 4 for p in addmm)
    # A larger workspace than the compute-bound chunk needs halves the chunks, and the accumulator traffic.
    a, b = (rl.single_pass(16384, H, 128256, BF16, m * MIB).extra["chunks"] for m in (1024, 2048))
    assert a == 2 * b


@pytest.mark.parametrize("gpu_name", ["H100", "H200"])
@pytest.mark.parametrize("shape", rl.DEFAULT_SHAPES + [(16384, 8192, 262144), (32768, 5120, 262144)])
def test_the_single_pass_gemms_are_compute_bound_at_the_default_chunk(gpu_name, shape):
    """The accumulator's 8 V H bytes per chunk stay below the GEMM's 2 C V H flops: the default chunk grows
    past the 256 MiB block where the vocabulary is large (512 rows at V = 262144) up to COMPUTE_BOUND_ROWS."""
    N, H, V = shape
    gpu = rl.GPU(gpu_name, *rl.GPUS[gpu_name])
    phases = rl.single_pass(N, H, V, BF16).by_phase(gpu)
    for name, (calls, flops, by, seconds, compute, memory) in phases.items():
        if "GEMM" in name or "addmm" in name:
            assert compute >= memory, (name, compute, memory)
    assert _rows(H, V) >= min(COMPUTE_BOUND_ROWS, N)
    before = DEFAULT_WORKSPACE_BYTES // (V * 2)  # rows in the 256 MiB block alone
    if before < 1180:  # the H100's bound
        addmm = rl.Phase("d weight addmm", 2 * before * V * H, before * (V + H) * 2 + 8 * V * H, 1, True)
        assert addmm.times(gpu)[1] > addmm.times(gpu)[0] or gpu_name == "H200"


@pytest.mark.parametrize("gpu_name", list(rl.GPUS))
@pytest.mark.parametrize("efficiency", [1.0, 0.7])
def test_predicted_time_is_at_least_both_roofs(gpu_name, efficiency):
    peak, bw = rl.GPUS[gpu_name]
    gpu, additive = rl.GPU(gpu_name, peak, bw, efficiency), rl.GPU(gpu_name, peak, bw, efficiency, overlap=False)
    for N, H, V in SHAPES:
        for s in rl.schedules(N, H, V, BF16):
            t = s.seconds(gpu)
            assert t >= s.flops / (peak * 1e12) * (1 - 1e-12)
            assert t >= s.bytes / (bw * 1e12) * (1 - 1e-12)
            assert t <= s.flops / (peak * efficiency * 1e12) + s.bytes / (bw * 1e12) + 1e-12
            assert s.seconds(additive) >= t


def test_naive_moves_more_bytes_than_the_fused_schedules_at_llama3_vocab():
    H, V = 4096, 128256
    for N in (4096, 16384, 32768):
        by = {s.name: s.bytes for s in rl.schedules(N, H, V, BF16)}
        assert by["naive"] > by["two-pass op (ours)"] and by["naive"] > by["bnf two-pass (ours)"]
        # The single pass re-reads W and reads + writes the fp32 [V, H] once per row chunk: with one chunk it
        # moves less than naive; at the default workspace that per-chunk traffic exceeds naive's [N, V]
        # traffic, but it overlaps GEMM compute, so the single pass is still predicted the fastest.
        one_chunk = rl.single_pass(N, H, V, BF16, workspace=N * V * 2 + MIB)
        assert one_chunk.extra["chunks"] == 1 and one_chunk.bytes < by["naive"]
        h200 = rl.GPU("H200", *rl.GPUS["H200"])
        times = {s.name: s.seconds(h200) for s in rl.schedules(N, H, V, BF16)}
        single = ("bnf single pass (ours)", "asft single pass (ours)")
        assert times[single[0]] == times[single[1]] < min(t for k, t in times.items() if k not in single)


def test_temporaries_match_the_ops_bound():
    N, H, V = 16384, 4096, 128256
    C, S = _rows(H, V), _cols(N, H, V)
    assert rl.single_pass(N, H, V, BF16).temporaries == {"block": C * V * 2, "fp32 [V,H]": V * H * 4}
    assert rl.two_pass(N, H, V, BF16).temporaries == {"block": N * S * 2, "fp32 [N,H]": N * H * 4}
    # The block grows past the workspace only up to a quarter of the fp32 [V, H] accumulator it serves.
    assert C * V * 2 <= max(DEFAULT_WORKSPACE_BYTES, V * H) and N * S * 2 <= max(DEFAULT_WORKSPACE_BYTES, V * H)
    assert sum(rl.naive(N, H, V, BF16).temporaries.values()) == 12 * N * V


def test_liger_chunk_follows_its_formula():
    # inc = ceil(V / H) = 32; ceil(16384 / 32) = 512 (a power of two already); never more than N.
    assert rl.liger_chunk(16384, 4096, 128256) == 512
    assert rl.liger_chunk(4096, 4096, 151936) == 128  # inc 38: ceil(4096 / 38) = 108 -> 128
    assert rl.liger_chunk(20, 4096, 4096) == 20
    assert "fp32 [V,H]" in rl.liger(4096, 4096, 128256, BF16).temporaries  # accum_dtype=fp32, as benchmarked
    assert "fp32 [V,H]" not in rl.liger(4096, 4096, 128256, BF16, accum="bf16").temporaries


def _run(*args) -> str:
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_measured_rows_are_printed_beside_their_schedule(tmp_path):
    rows = [{"N": 4096, "H": 4096, "V": 128256, "method": "bnf single pass (ours)", "ms": 23.45, "peak_mib": 2310.0},
            {"N": 4096, "H": 4096, "V": 128256, "method": "two-pass op (ours)", "ms": 27.5, "peak_mib": 330.0},
            {"N": 4096, "H": 4096, "V": 128256, "method": "naive", "skipped": "out of memory"},
            {"N": 4096, "H": 4096, "V": 128256, "method": "liger flce", "ms": 50.0, "peak_mib": 2100.0, "flops_factor": 6},
            {"N": 4096, "H": 4096, "V": 128256, "method": "torch lce", "ms": 40.0, "peak_mib": 900.0},
            {"N": 16384, "H": 4096, "V": 128256, "method": "naive", "ms": 99.0, "peak_mib": 24000.0}]
    path = tmp_path / "results.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = _run("--measured", str(path), "--shapes", "4096x4096x128256", "--workspaces", "256")
    line = next(l for l in out.splitlines() if l.startswith("| bnf single pass (ours) |"))
    assert line.endswith("| 23.45 | 2310 |")
    assert next(l for l in out.splitlines() if l.startswith("| two-pass op (ours) |")).endswith("| 27.50 | 330 |")
    assert next(l for l in out.splitlines() if l.startswith("| naive |")).endswith("| - | - |")
    # A Liger release that builds the gradient in forward (6NHV) is flagged against the modelled path.
    assert "| 50.00 | 2100 | measured as 6NHV, modelled as 8NHV |" in out
    assert "measured without a model: torch lce 40.00 ms" in out
    assert "99.00" not in out  # another shape's row is not joined here
    # kernel_bench's JSON list, with its hyphenated names, is read too.
    listed = tmp_path / "results.json"
    listed.write_text(json.dumps([{**rows[0], "method": "bnf single-pass (ours)"}]))
    assert rl.load_measured(listed)[(4096, 4096, 128256, rl.norm("bnf single pass (ours)"))]["ms"] == 23.45


def test_default_run_prints_every_shape_and_the_workspace_section():
    out = _run()
    for N, H, V in rl.DEFAULT_SHAPES:
        assert f"### N={N} H={H} V={V} on H200" in out
        assert f"#### single pass vs workspace, N={N} H={H} V={V}" in out
    assert out.count("| bnf single pass (ours) |") == len(rl.DEFAULT_SHAPES)
    out = _run("--gpu", "H100", "--phases", "--shapes", "4096x4096x128256", "--peak-tflops", "800", "--bandwidth-tbs", "3")
    chunks = math.ceil(4096 / _rows(4096, 128256))
    assert "800 TFLOP/s, 3 TB/s" in out and f"| d weight addmm into fp32 [V,H] | {chunks} |" in out
    assert "bnf single pass (ours): bandwidth-bound kernels: stats kernel, rule, d logits kernel in place" in out
