"""A bytes-and-flops (roofline) model of the fused linear + per-token log-prob op and its alternatives.

    python benchmarks/roofline.py                                   # H200, the default shapes, bf16
    python benchmarks/roofline.py --gpu H100 --phases --shapes 16384x4096x128256
    python benchmarks/roofline.py --gpu H200-measured --measured results.jsonl
    python benchmarks/roofline.py --peak-tflops 700 --bandwidth-tbs 4.0 --gemm-efficiency 0.8 --l2-hit

Each schedule is a list of phases (kernels), each with its flops and the HBM bytes it must move
(compulsory traffic: every operand read once, every result written once). A phase takes
    time(phase) = max(flops / (peak_flops * gemm_efficiency), bytes / bandwidth)
(the efficiency factor, default 1.0 = ideal, applies to GEMMs only) and a schedule takes the sum of
its phases: kernels run one after another, each limited by compute or by memory. TFLOP/s counts
6*N*H*V for every schedule (as benchmarks/kernel_bench.py does), so recomputation shows as lost speed.

Chunk sizes come from `axolotl_bnf_plugin.kernels.schedule` (impl "triton", device "cuda"), as the op
takes them: C = default_chunk_size(V, hidden_size=H) (grown towards COMPUTE_BOUND_ROWS when d weight
accumulates over row chunks), k = ceil(N / C) row chunks; S = vocab_slice_cols(N, V, chunk_size=C,
hidden_size=H) vocabulary columns per slice. d = bytes per element of the dtype. Per row chunk of c rows
(per slice of s columns):
- `bnf single pass (ours)`: GEMM h_c @ W^T (2cHV; W + h_c in, block out); the statistics kernel (one read
  of the block), the rule on c-long vectors, the d logits kernel (one read, one write in place); d hidden
  = block @ W (2cVH; block + W in, c*H*d out); d weight addmm into an fp32 [V, H] (2cVH; block + h_c in,
  the accumulator read and written: 2*V*H*4, which makes small chunks bandwidth-bound). Once: zero the
  accumulator; in backward scale it into the dtype in one pass (V*H*4 + V*H*d) and d hidden in its dtype
  (2*N*H*d, fp32 arithmetic). 6*N*H*V flops.
- `two-pass op (ours)`: forward GEMM + a statistics kernel (one read) per row chunk. Backward, vocab
  sliced: block = hidden @ W_s^T (2NHs; N*H*d + s*H*d in, N*s*d out); d logits in place (read + write);
  d weight slice = block^T @ hidden (2sNH; written once in the dtype); d hidden addmm into an fp32
  [N, H] (2NsH; block + W_s in, accumulator read + written); then zero-init and a cast of the fp32
  [N, H]. When S is None the backward is row chunked like the single pass. 8*N*H*V flops.
- `bnf two-pass (ours)`: the two-pass op plus the BNF loss on N-long vectors (no flops counted).
- `--frozen-weight` (LoRA: d hidden only): both of ours run the same schedule, per row chunk the GEMM, the
  statistics and d logits kernels (for a unit upstream gradient, or the rule's) and d hidden = block @ W
  written once in the dtype; backward scales its rows through fp32. 4*N*H*V.
  Naive and Liger drop their d weight GEMM (4*N*H*V and, Liger with reduction="none", 6*N*H*V).
- `naive`: logits in the dtype, an fp32 copy, log_softmax (reads twice), gather; backward: scatter into
  zeros, log_softmax backward (3 fp32 reads, 1 write), cast to the dtype, two GEMMs reading the grad.
  6*N*H*V flops; three fp32 [N, V] are alive at the backward's peak.
- `liger flce`: Liger-Kernel's ops/fused_linear_cross_entropy.py (read at commit 00eba63), called as
  kernel_bench.py does (reduction="none", accum_dtype=torch.float32). Rows chunked: inc = ceil(V / H), chunk =
  min(next_pow2(ceil(N / inc)), N) (a block about the size of the hidden states), into one reused
  buffer. With reduction="none" its gradient needs the per-token upstream gradient, so the forward runs
  GEMM + CE kernel (one read) per chunk, and backward re-enters it: GEMM, CE kernel writing the grad in
  place (two reads, one write), an out-of-place multiply by the upstream gradient (a second block),
  d hidden = grad @ W into a zeroed [N, H], d weight addmm into a zeroed fp32 [V, H], cast at the end
  (`--liger-accum bf16`: accumulated in the weight dtype, accum_dtype=None): 8*N*H*V. `--liger-reduction mean` models the other path
  (and releases before the reduction="none" fix): gradients built in forward (6*N*H*V), scaled in
  backward by element_mul kernels over d hidden and d weight.
Temporaries: the memory a schedule holds beyond its inputs and gradient outputs, at its peak.
`--measured` reads kernel_bench rows (a JSON list, or JSON objects one per line, with keys N, H, V,
method, ms, peak_mib; rows without ms are left out) and prints each measured time beside the schedule of
the same name and shape, flagging a row whose `flops_factor` differs from the modelled flops.
"""
from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import dataclass, field

import torch

from axolotl_bnf_plugin.kernels.schedule import DEFAULT_WORKSPACE_BYTES, default_chunk_size, vocab_slice_cols

GPUS = {"H100": (989.0, 3.35), "H200": (989.0, 4.8), "H200-measured": (790.0, 4.3)}  # TFLOP/s, TB/s
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_SHAPES = [(n, 4096, v) for v in (128256, 151936) for n in (4096, 16384, 32768)]
MIB = 2**20
ALIASES = {"fused (ours)": "two pass op (ours)"}  # kernel_bench's earlier name for the op alone


@dataclass
class Phase:
    name: str
    flops: int  # per call
    bytes: int  # per call
    calls: int = 1
    gemm: bool = False

    def times(self, gpu: GPU) -> tuple[float, float]:
        """(compute, memory) seconds over all calls."""
        peak = gpu.peak_tflops * 1e12 * (gpu.gemm_efficiency if self.gemm else 1.0)
        return self.calls * self.flops / peak, self.calls * self.bytes / (gpu.bandwidth_tbs * 1e12)

    def seconds(self, gpu: GPU) -> float:
        return max(self.times(gpu)) if gpu.overlap else sum(self.times(gpu))


@dataclass
class GPU:
    name: str
    peak_tflops: float
    bandwidth_tbs: float
    gemm_efficiency: float = 1.0
    overlap: bool = True  # False: flops/peak + bytes/bandwidth, a pessimistic bound


@dataclass
class Schedule:
    name: str
    phases: list[Phase]
    temporaries: dict[str, int]  # what is alive at the peak -> bytes
    chunking: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def flops(self) -> int:
        return sum(p.flops * p.calls for p in self.phases)

    @property
    def bytes(self) -> int:
        return sum(p.bytes * p.calls for p in self.phases)

    def seconds(self, gpu: GPU) -> float:
        return sum(p.seconds(gpu) for p in self.phases)

    def model_flops(self, N, H, V) -> int:
        """The common count the TFLOP/s columns use: 6*N*H*V, or 4*N*H*V with no d weight work at all."""
        return (6 if any("d weight" in p.name for p in self.phases) else 4) * N * H * V

    def by_phase(self, gpu: GPU) -> dict[str, list[float]]:
        """Phase name -> [calls, flops, bytes, seconds, compute s, memory s], summed over chunk sizes."""
        out: dict[str, list[float]] = {}
        for p in self.phases:
            row = out.setdefault(p.name, [0, 0, 0, 0.0, 0.0, 0.0])
            for i, x in enumerate((p.calls, p.flops * p.calls, p.bytes * p.calls, p.seconds(gpu), *p.times(gpu))):
                row[i] += x
        return out


def split(total: int, size: int) -> list[tuple[int, int]]:
    """[(size, count)] covering `total` in pieces of `size`, the last one possibly shorter."""
    size = min(size, total)
    pieces = [(size, total // size)]
    return pieces + [(total % size, 1)] if total % size else pieces


def _row_chunked_grads(N, H, V, d, rows, reads, kernel) -> list[Phase]:
    """Per row chunk: GEMM, a row kernel (`reads` reads of the block + one write), d hidden GEMM, d weight
    addmm into an fp32 [V, H]; the accumulator zeroed first."""
    phases = [Phase("zero fp32 [V,H] accumulator", 0, V * H * 4)]
    for c, calls in split(N, rows):
        block = c * V * d
        phases += [Phase("logits GEMM h_c @ W^T", 2 * c * H * V, V * H * d + c * H * d + block, calls, True),
                   Phase(kernel, 0, (reads + 1) * block, calls),
                   Phase("d hidden GEMM block @ W", 2 * c * V * H, block + V * H * d + c * H * d, calls, True),
                   Phase("d weight addmm into fp32 [V,H]", 2 * c * V * H, block + c * H * d + 2 * V * H * 4, calls, True)]
    return phases


def chunk_rows(H, V, dtype, workspace, weight_grad=True) -> int:
    """The op's rows per block (`kernels.token_logprobs` on CUDA with Triton)."""
    return default_chunk_size(V, dtype, workspace, "triton", "cuda", hidden_size=H if weight_grad else 0)


def single_pass(N, H, V, dtype, workspace=DEFAULT_WORKSPACE_BYTES, l2_hit=False,
                name="bnf single pass (ours)") -> Schedule:
    d, C = dtype.itemsize, chunk_rows(H, V, dtype, workspace)
    phases = _row_chunked_grads(N, H, V, d, C, 2, "stats kernel, rule, d logits kernel in place")
    phases += [Phase("scale d weight fp32 -> dtype (one pass)", 0, V * H * 4 + V * H * d),
               Phase("scale d hidden in its dtype (fp32 math)", 0, 2 * N * H * d)]
    temps = {"block": min(C, N) * V * d, "fp32 [V,H]": V * H * 4}
    return Schedule(name, phases, temps, f"C={C} rows x {math.ceil(N / C)} chunks", {"C": C, "chunks": math.ceil(N / C)})


def two_pass(N, H, V, dtype, workspace=DEFAULT_WORKSPACE_BYTES, l2_hit=False, name="two-pass op (ours)") -> Schedule:
    d, C = dtype.itemsize, chunk_rows(H, V, dtype, workspace)
    S = vocab_slice_cols(N, V, dtype, "triton", "cuda", workspace, chunk_size=C, hidden_size=H)
    phases = []
    for c, calls in split(N, C):
        phases += [Phase("fwd logits GEMM h_c @ W^T", 2 * c * H * V, V * H * d + c * H * d + c * V * d, calls, True),
                   Phase("fwd stats kernel", 0, c * V * d, calls)]
    fwd_block = min(C, N) * V * d
    if S is None:  # too few columns fit: row-chunked backward
        phases += _row_chunked_grads(N, H, V, d, C, 1, "bwd d logits kernel in place")
        phases += [Phase("cast d weight fp32 -> dtype", 0, V * H * 4 + V * H * d)]
        temps, chunking = {"block": fwd_block, "fp32 [V,H]": V * H * 4}, f"C={C} rows; bwd row chunks"
    else:
        phases.append(Phase("zero fp32 [N,H] accumulator", 0, N * H * 4))
        for s, calls in split(V, S):
            block = N * s * d
            phases += [Phase("bwd logits GEMM hidden @ W_s^T", 2 * N * H * s, N * H * d + s * H * d + block, calls, True),
                       Phase("bwd d logits kernel in place", 0, 2 * block, calls),
                       Phase("d weight slice GEMM block^T @ hidden", 2 * s * N * H, block + N * H * d + s * H * d, calls, True),
                       Phase("d hidden addmm into fp32 [N,H]", 2 * N * s * H, block + s * H * d + 2 * N * H * 4, calls, True)]
        phases.append(Phase("cast d hidden fp32 -> dtype", 0, N * H * 4 + N * H * d))
        bwd = {"block": N * min(S, V) * d, "fp32 [N,H]": N * H * 4}
        temps = bwd if sum(bwd.values()) >= fwd_block else {"block": fwd_block}
        chunking = f"C={C} rows fwd; S={S} cols x {math.ceil(V / S)} slices bwd"
    if name.startswith("bnf"):
        phases.append(Phase("BNF loss on N-long vectors", 0, 16 * N * 4))
    return Schedule(name, phases, temps, chunking, {"C": C, "S": S})


def frozen_head(N, H, V, dtype, workspace=DEFAULT_WORKSPACE_BYTES, l2_hit=False, name="two-pass op (ours)") -> Schedule:
    """Ours with a frozen weight: d hidden built in the forward, rows scaled in backward."""
    d, C = dtype.itemsize, chunk_rows(H, V, dtype, workspace, weight_grad=False)
    phases = []
    for c, calls in split(N, C):
        block = c * V * d
        phases += [Phase("logits GEMM h_c @ W^T", 2 * c * H * V, V * H * d + c * H * d + block, calls, True),
                   Phase("stats kernel, d logits kernel in place", 0, 3 * block, calls),
                   Phase("d hidden GEMM block @ W", 2 * c * V * H, block + V * H * d + c * H * d, calls, True)]
    phases.append(Phase("bwd scale d hidden rows (fp32 math)", 0, 2 * N * H * d))
    if name.startswith("bnf"):
        phases.append(Phase("BNF loss on N-long vectors", 0, 16 * N * 4))
    return Schedule(name, phases, {"block": min(C, N) * V * d, "[N,H] d hidden": N * H * d},
                    f"C={C} rows x {math.ceil(N / C)} chunks", {"C": C, "chunks": math.ceil(N / C)})


def _without_weight_grad(s: Schedule) -> Schedule:
    """A schedule less its d weight work (a frozen weight)."""
    phases = [p for p in s.phases if "d weight" not in p.name]
    temps = {k: v for k, v in s.temporaries.items() if k != "fp32 [V,H]"}
    return Schedule(s.name, phases, temps, s.chunking, s.extra)


def naive(N, H, V, dtype) -> Schedule:
    d, NV = dtype.itemsize, N * V
    phases = [Phase("logits GEMM hidden @ W^T", 2 * N * H * V, N * H * d + V * H * d + NV * d, 1, True),
              Phase("cast logits to fp32", 0, NV * d + NV * 4),
              Phase("log_softmax fp32", 0, 2 * NV * 4 + NV * 4),
              Phase("gather backward (zeros + scatter)", 0, NV * 4),
              Phase("log_softmax backward", 0, 3 * NV * 4 + NV * 4),
              Phase("cast grad to dtype", 0, NV * 4 + NV * d),
              Phase("d hidden GEMM grad @ W", 2 * N * V * H, NV * d + V * H * d + N * H * d, 1, True),
              Phase("d weight GEMM grad^T @ hidden", 2 * N * V * H, NV * d + N * H * d + V * H * d, 1, True)]
    return Schedule("naive", phases, {"3 fp32 [N,V]": 3 * NV * 4}, "whole [N, V]")


def liger_chunk(N, H, V) -> int:
    inc = math.ceil(V / H)
    return min(2 ** math.ceil(math.log2(math.ceil(N / inc))), N)


def liger(N, H, V, dtype, reduction="none", accum="fp32", l2_hit=False) -> Schedule:
    d, c0 = dtype.itemsize, liger_chunk(N, H, V)
    a = 4 if accum == "fp32" else d
    recompute = reduction == "none"
    phases = [Phase("zero d hidden [N,H] and d weight [V,H]", 0, N * H * d + V * H * a)]
    for c, calls in split(N, c0):
        block, gemm = c * V * d, (2 * c * H * V, V * H * d + c * H * d + c * V * d)
        if recompute:
            phases += [Phase("fwd logits GEMM", *gemm, calls, True), Phase("fwd CE kernel (no grad)", 0, block, calls)]
        phases += [Phase("logits GEMM" + (" (recomputed)" if recompute else ""), *gemm, calls, True),
                   Phase("CE kernel: loss + grad in place", 0, ((1 if l2_hit else 2) + 1) * block, calls)]
        if recompute:
            phases.append(Phase("grad * upstream (out of place)", 0, 2 * block, calls))
        phases += [Phase("d hidden GEMM grad @ W", 2 * c * V * H, block + V * H * d + c * H * d, calls, True),
                   Phase(f"d weight addmm into {accum} [V,H]", 2 * c * V * H, block + c * H * d + 2 * V * H * a, calls, True)]
    if accum == "fp32":
        phases.append(Phase("cast d weight fp32 -> dtype", 0, V * H * 4 + V * H * d))
    if not recompute:
        phases.append(Phase("element_mul d hidden, d weight by grad_output", 0, 2 * N * H * d + 2 * V * H * d))
    temps = {"block": min(c0, N) * V * d}
    if recompute:
        temps["scaled block"] = min(c0, N) * V * d
    if accum == "fp32":
        temps["fp32 [V,H]"] = V * H * 4
    return Schedule("liger flce", phases, temps, f"{c0} rows x {math.ceil(N / c0)} chunks")


def schedules(N, H, V, dtype, workspace=DEFAULT_WORKSPACE_BYTES, l2_hit=False, liger_reduction="none",
              liger_accum="fp32", frozen_weight=False) -> list[Schedule]:
    if frozen_weight:
        ours = [frozen_head(N, H, V, dtype, workspace, l2_hit, name) for name in
                ("bnf single pass (ours)", "two-pass op (ours)", "bnf two-pass (ours)", "asft single pass (ours)",
                 "asft two-pass (ours)")]
        return ours + [_without_weight_grad(naive(N, H, V, dtype)),
                       _without_weight_grad(liger(N, H, V, dtype, liger_reduction, liger_accum, l2_hit))]
    # ASFT's single pass has BNF's schedule when its responses fit a block (blocks cut at response
    # boundaries hold at most the chunk's rows: a few more, smaller blocks at worst).
    return [single_pass(N, H, V, dtype, workspace, l2_hit), two_pass(N, H, V, dtype, workspace, l2_hit),
            two_pass(N, H, V, dtype, workspace, l2_hit, name="bnf two-pass (ours)"),
            single_pass(N, H, V, dtype, workspace, l2_hit, name="asft single pass (ours)"),
            two_pass(N, H, V, dtype, workspace, l2_hit, name="asft two-pass (ours)"), naive(N, H, V, dtype),
            liger(N, H, V, dtype, liger_reduction, liger_accum, l2_hit)]


def norm(method: str) -> str:
    key = re.sub(r"\s+", " ", method.lower().replace("-", " ")).strip()
    return norm(ALIASES[method.lower()]) if method.lower() in ALIASES else key


def load_measured(path) -> dict[tuple, dict]:
    """(N, H, V, normalised method) -> row; rows without a time (skipped) are left out."""
    text = open(path, encoding="utf-8").read().strip()
    rows = json.loads(text) if text.startswith("[") else [json.loads(l) for l in text.splitlines() if l.strip()]
    return {(r["N"], r["H"], r["V"], norm(r["method"])): r for r in rows if r.get("ms") is not None}


def pct(sched: Schedule, N, H, V, gpu: GPU) -> float:
    return 100 * sched.model_flops(N, H, V) / sched.seconds(gpu) / (gpu.peak_tflops * 1e12)


def shape_table(N, H, V, scheds: list[Schedule], gpu: GPU, measured=None) -> list[str]:
    head = ("| schedule | chunking | predicted ms | TFLOP/s (6NHV; 4NHV frozen) | % of peak | GB moved | dominant phase "
            "| memory-bound share | temporaries MiB |" + (" measured ms | measured peak MiB |" if measured is not None else ""))
    lines = [f"\n### N={N} H={H} V={V} on {gpu.name}\n", head, "|" + "---|" * (head.count("|") - 1)]
    for s in scheds:
        t, phases = s.seconds(gpu), s.by_phase(gpu)
        dom = max(phases, key=lambda k: phases[k][3])
        bound = "compute" if phases[dom][4] >= phases[dom][5] else "memory"
        mem_share = sum(x[3] for x in phases.values() if x[5] > x[4]) / t
        temps = " + ".join(f"{k} {v / MIB:.0f}" for k, v in s.temporaries.items())
        row = (f"| {s.name} | {s.chunking} | {t * 1e3:.2f} | {s.model_flops(N, H, V) / t / 1e12:.0f} | {pct(s, N, H, V, gpu):.0f}% "
               f"| {s.bytes / 1e9:.0f} | {dom} ({100 * phases[dom][3] / t:.0f}%, {bound}) "
               f"| {100 * mem_share:.0f}% | {sum(s.temporaries.values()) / MIB:.0f} ({temps}) |")
        if measured is not None:
            m = measured.get((N, H, V, norm(s.name)))
            row += f" {m['ms']:.2f} | {m.get('peak_mib') or float('nan'):.0f} |" if m else " - | - |"
            if m and m.get("flops_factor") not in (None, s.flops // (N * H * V)):
                row += f" measured as {m['flops_factor']}NHV, modelled as {s.flops // (N * H * V)}NHV |"
        lines.append(row)
    for s in scheds:
        if "(ours)" in s.name:
            lines.append(f"\n{s.name}: bandwidth-bound kernels: {bandwidth_bound(s, gpu)}")
    names = {norm(s.name) for s in scheds}
    lines += [f"\nmeasured without a model: {m['method']} {m['ms']:.2f} ms, {m.get('peak_mib') or float('nan'):.0f} MiB"
              for (n, h, v, meth), m in sorted((measured or {}).items()) if (n, h, v) == (N, H, V) and meth not in names]
    return lines


def bandwidth_bound(s: Schedule, gpu: GPU) -> str:
    """The phases whose bytes take longer than their flops, with their share of the schedule's time."""
    t, phases = s.seconds(gpu), s.by_phase(gpu)
    bound = [(name, row[3] / t) for name, row in phases.items() if row[5] > row[4] and row[3] / t >= 0.005]
    return ", ".join(f"{name} ({100 * share:.0f}%)" for name, share in sorted(bound, key=lambda x: -x[1])) or "none"


def phase_table(s: Schedule, gpu: GPU) -> list[str]:
    lines = [f"\n{s.name} ({s.chunking}): {s.flops / 1e12:.2f} TFLOP, {s.bytes / 1e9:.1f} GB\n",
             "| phase | calls | TFLOP | GB moved | ms | bound |", "|---|---|---|---|---|---|"]
    for name, (calls, fl, by, sec, tc, tm) in s.by_phase(gpu).items():
        lines.append(f"| {name} | {calls} | {fl / 1e12:.3f} | {by / 1e9:.2f} | {sec * 1e3:.3f} | "
                     f"{'compute' if tc >= tm else 'memory'} |")
    return lines


def workspace_table(N, H, V, dtype, gpu, workspaces_mib, l2_hit=False, target=60.0) -> list[str]:
    lines = [f"\n#### single pass vs workspace, N={N} H={H} V={V}\n",
             "| workspace MiB | C rows | chunks | fp32 [V,H] traffic GB | single pass ms | % of peak "
             "| two-pass S cols | two-pass ms | % of peak |", "|---|---|---|---|---|---|---|---|---|"]
    for mib in workspaces_mib:
        sp, tp = single_pass(N, H, V, dtype, mib * MIB, l2_hit), two_pass(N, H, V, dtype, mib * MIB, l2_hit)
        acc = sp.extra["chunks"] * 2 * V * H * 4
        lines.append(f"| {mib} | {sp.extra['C']} | {sp.extra['chunks']} | {acc / 1e9:.1f} | {sp.seconds(gpu) * 1e3:.2f} "
                     f"| {pct(sp, N, H, V, gpu):.0f}% | {tp.extra['S']} | {tp.seconds(gpu) * 1e3:.2f} | {pct(tp, N, H, V, gpu):.0f}% |")
    reach = next((2**i for i in range(4, 17) if pct(single_pass(N, H, V, dtype, 2**i * MIB, l2_hit), N, H, V, gpu) >= target), None)
    lines.append(f"\nsmallest power-of-two workspace for the single pass to reach {target:g}% of peak: "
                 + (f"{reach} MiB" if reach else "none up to 64 GiB"))
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", choices=list(GPUS), default="H200")
    p.add_argument("--peak-tflops", type=float, help="override the GPU's dense peak (TFLOP/s)")
    p.add_argument("--bandwidth-tbs", type=float, help="override the GPU's HBM bandwidth (TB/s)")
    p.add_argument("--gemm-efficiency", type=float, default=1.0, help="fraction of peak GEMMs reach (1.0 = ideal)")
    p.add_argument("--additive", action="store_true", help="phase time = flops/peak + bytes/bandwidth (no overlap)")
    p.add_argument("--l2-hit", action="store_true", help="Liger's CE kernel's second read of the block hits L2")
    p.add_argument("--shapes", nargs="*", help="NxHxV, e.g. 16384x4096x128256")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--workspace-mib", type=int, default=DEFAULT_WORKSPACE_BYTES // MIB)
    p.add_argument("--workspaces", type=int, nargs="*", default=[128, 256, 512, 1024, 2048])
    p.add_argument("--target-pct", type=float, default=60.0)
    p.add_argument("--liger-reduction", choices=["none", "mean"], default="none")
    p.add_argument("--liger-accum", choices=["bf16", "fp32"], default="fp32")
    p.add_argument("--phases", action="store_true", help="per-phase breakdown of every schedule")
    p.add_argument("--frozen-weight", action="store_true", help="d hidden only, as under LoRA")
    p.add_argument("--measured", help="kernel_bench results (JSON list or JSON lines)")
    args = p.parse_args(argv)
    peak, bw = GPUS[args.gpu]
    gpu = GPU(args.gpu, args.peak_tflops or peak, args.bandwidth_tbs or bw, args.gemm_efficiency, not args.additive)
    dtype = DTYPES[args.dtype]
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes] if args.shapes else DEFAULT_SHAPES
    measured = load_measured(args.measured) if args.measured else None
    rule = "flops/peak + bytes/bandwidth" if args.additive else "max(flops/peak, bytes/bandwidth)"
    lines = [f"# Roofline model: {gpu.name}, {gpu.peak_tflops:g} TFLOP/s, {gpu.bandwidth_tbs:g} TB/s, GEMM efficiency "
             f"{gpu.gemm_efficiency:g}; {args.dtype}; workspace {args.workspace_mib} MiB"
             f"{'; L2 hit on second reads' if args.l2_hit else ''}{'; frozen weight' if args.frozen_weight else ''}; "
             f"time(phase) = {rule}"]
    for N, H, V in shapes:
        scheds = schedules(N, H, V, dtype, args.workspace_mib * MIB, args.l2_hit, args.liger_reduction, args.liger_accum,
                           args.frozen_weight)
        lines += shape_table(N, H, V, scheds, gpu, measured)
        if args.phases:
            for s in scheds:
                lines += phase_table(s, gpu)
    lines.append("\n## Single-pass chunk size vs workspace (fp32 accumulator traffic = chunks * 2 * V*H*4)")
    for N, H, V in shapes:
        lines += workspace_table(N, H, V, dtype, gpu, args.workspaces, args.l2_hit, args.target_pct)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
