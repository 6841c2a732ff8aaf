"""Forward + backward time and peak memory of the fused log-prob op against the usual alternatives.

    python benchmarks/kernel_bench.py                 # GPU: the full shape set in bf16; CPU: a reduced set
    python benchmarks/kernel_bench.py --json out.json --shapes 4096x4096x128256

Compared, on the same `hidden [N, H]`, `weight [V, H]` and labels (10% of rows ignored, as prompt tokens):
- `fused (ours)`: `axolotl_bnf_plugin.kernels.token_logprobs` (impl auto: Triton on CUDA, PyTorch on CPU);
- `naive`: logits = hidden @ weight.T, log_softmax, gather (what TRL's DPO path does);
- `liger flce`: Liger-Kernel's fused linear cross-entropy with reduction="none" (CUDA only);
- `torch lce`: `torch.nn.functional.linear_cross_entropy(reduction="none")` with chunking options, when
  the installed torch has it;
- `bnf two-pass (ours)` / `bnf single-pass (ours)`: the whole BNF loss on top of the op (all rows one
  response, a fixed reference), with the logits recomputed in backward, or with the gradient built in the
  forward pass (`bnf_grad`, what BNF training uses). Their difference is the single pass's saving.
Each computes per-row log-probs (or CE) and backpropagates a random upstream gradient into hidden and
weight (the BNF rows backpropagate their loss). Time: median of `--iters` runs after a warm-up. Memory: on CUDA, peak allocated during one
forward + backward minus what was allocated before (inputs and gradient buffers of the inputs excluded);
on CPU, the peak growth of the resident set during one forward + backward (sampled by a thread,
gradients of the inputs excluded), measured in a fresh process per (method, shape).
TFLOP/s counts 6 * N * H * V (two matmuls forward-equivalent: 2NHV forward, 4NHV backward).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import time

import torch

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) for the ratio column.
BF16_PEAK = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def make_inputs(n, h, v, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g) / h**0.25).to(device, dtype)
    weight = (torch.randn(v, h, generator=g) / h**0.25).to(device, dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.1] = -100
    upstream = torch.randn(n, generator=g).to(device)
    return hidden, weight, labels.to(device), upstream


def fused(hidden, weight, labels):
    from axolotl_bnf_plugin.kernels import token_logprobs

    return token_logprobs(hidden, weight, labels)[0]


def naive(hidden, weight, labels):
    logits = hidden @ weight.t()
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(1, labels.clamp(min=0)[:, None])[:, 0] * (labels != -100)


def liger(hidden, weight, labels):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return -LigerFusedLinearCrossEntropyLoss(reduction="none")(weight, hidden, labels)


def torch_lce(hidden, weight, labels):
    options = torch.nn.LinearCrossEntropyOptions()
    return -torch.nn.functional.linear_cross_entropy(hidden, weight, labels, reduction="none", options=options)


def _bnf(hidden, weight, labels, single_pass: bool):
    from axolotl_bnf_plugin.kernels import token_logprobs
    from axolotl_bnf_plugin.losses import bnf_loss, bnf_response_scale

    mask, sign = (labels != -100)[None], torch.ones(1, dtype=torch.long, device=labels.device)
    ref = torch.full(labels.shape, -8.0, device=labels.device)  # p_ref ~ 3e-4: a mix of clipped / unclipped q
    scale = bnf_response_scale(mask, sign)[:, None].expand(mask.shape).reshape(-1)
    logp, neg = token_logprobs(hidden, weight, labels, bnf_grad=(ref, scale) if single_pass else None)
    return bnf_loss(logp[None], ref[None], neg[None], mask, sign)[0]


def bnf_two_pass(hidden, weight, labels):
    return _bnf(hidden, weight, labels, single_pass=False)


def bnf_single_pass(hidden, weight, labels):
    return _bnf(hidden, weight, labels, single_pass=True)


METHODS = {"fused (ours)": fused, "naive": naive, "liger flce": liger, "torch lce": torch_lce,
           "bnf two-pass (ours)": bnf_two_pass, "bnf single-pass (ours)": bnf_single_pass}


def available(name: str, device: torch.device) -> str | None:
    """None if the method can run here, else why not."""
    if name == "liger flce" and device.type != "cuda":
        return "needs CUDA"
    if name == "torch lce" and not hasattr(torch.nn.functional, "linear_cross_entropy"):
        return "not in this torch"
    return None


def step(fn, hidden, weight, labels, upstream):
    h = hidden.detach().requires_grad_(True)
    w = weight.detach().requires_grad_(True)
    out = fn(h, w, labels)
    (out if out.dim() == 0 else (out * upstream).sum()).backward()  # a scalar is a whole loss
    return h.grad, w.grad


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_method(fn, inputs, device, iters):
    step(fn, *inputs)  # warm-up (Triton compilation, allocator)
    times = []
    for _ in range(iters):
        sync(device)
        start = time.perf_counter()
        step(fn, *inputs)
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cuda_peak(fn, inputs, device):
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    grads = step(fn, *inputs)
    torch.cuda.synchronize()
    grad_bytes = sum(g.numel() * g.element_size() for g in grads)
    return torch.cuda.max_memory_allocated(device) - before - grad_bytes


def _rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _cpu_peak_worker(name, n, h, v, dtype_name, queue):
    """Peak growth of the resident set during one forward + backward, sampled every 0.5 ms by a thread
    (the process's high-water mark is useless here: importing torch already set it higher)."""
    import threading

    inputs = make_inputs(n, h, v, getattr(torch, dtype_name), torch.device("cpu"))
    step(METHODS[name], *inputs)  # warm-up: allocator pools, lazy imports
    grad_bytes = sum(t.numel() * t.element_size() for t in inputs[:2])
    peak, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.0005)

    base = _rss_bytes()
    sampler = threading.Thread(target=sample)
    sampler.start()
    grads = step(METHODS[name], *inputs)
    done.set()
    sampler.join()
    queue.put(max(peak[0], _rss_bytes()) - base - grad_bytes)
    del grads


def cpu_peak(name, n, h, v, dtype):
    # In the measuring process glibc serves every allocation of 64 KiB or more with mmap and returns it
    # on free, so the resident set follows live tensor memory instead of heap reuse.
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_cpu_peak_worker, args=(name, n, h, v, str(dtype).split(".")[-1], queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="*", default=None, help="NxHxV, e.g. 16384x4096x151936")
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--json", type=str, default=None)
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        dtype, iters = torch.bfloat16, args.iters or 10
        shapes = args.shapes or [f"{n}x4096x{v}" for v in (128256, 151936) for n in (4096, 16384, 32768)]
        gpu = torch.cuda.get_device_name(device)
        peak = next((p for k, p in BF16_PEAK.items() if k in gpu), None)
    else:
        dtype, iters = torch.float32, args.iters or 2
        shapes = args.shapes or ["512x256x32000", "2048x256x32000", "2048x256x128256"]
        gpu, peak = "CPU", None
    print(f"device: {gpu}; dtype: {str(dtype).split('.')[-1]}; torch {torch.__version__}; iters {iters}")
    rows = []
    for shape in shapes:
        n, h, v = (int(x) for x in shape.split("x"))
        inputs = make_inputs(n, h, v, dtype, device)
        for name in args.methods:
            why_not = available(name, device)
            row = {"N": n, "H": h, "V": v, "method": name, "device": gpu}
            if why_not:
                rows.append({**row, "skipped": why_not})
                continue
            try:
                seconds = time_method(METHODS[name], inputs, device, iters)
                mem = cuda_peak(METHODS[name], inputs, device) if device.type == "cuda" else cpu_peak(name, n, h, v, dtype)
            except torch.OutOfMemoryError:
                rows.append({**row, "skipped": "out of memory"})
                torch.cuda.empty_cache()
                continue
            tflops = 6 * n * h * v / seconds / 1e12
            rows.append({**row, "ms": seconds * 1e3, "peak_mib": mem / 2**20, "tflops": tflops,
                         "peak_ratio": tflops / peak if peak else None})
        del inputs
    print(f"\n| N | H | V | method | fwd+bwd ms | extra peak MiB | TFLOP/s | of bf16 peak |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "skipped" in r:
            print(f"| {r['N']} | {r['H']} | {r['V']} | {r['method']} | n/a ({r['skipped']}) | | | |")
        else:
            ratio = f"{100 * r['peak_ratio']:.0f}%" if r["peak_ratio"] else "n/a"
            print(f"| {r['N']} | {r['H']} | {r['V']} | {r['method']} | {r['ms']:.1f} | {r['peak_mib']:.0f} | "
                  f"{r['tflops']:.2f} | {ratio} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
