"""Forward + backward time and peak memory of the fused log-prob op against the usual alternatives.

    python benchmarks/kernel_bench.py                 # GPU: the full shape set in bf16; CPU: a reduced set
    python benchmarks/kernel_bench.py --shapes 4096x4096x128256 --jsonl rows.jsonl --iters 5
    python benchmarks/kernel_bench.py --table-from rows.jsonl   # the markdown table of rows already measured

Compared on the same `hidden [N, H]`, `weight [V, H]` and labels, every row scored (`--ignored-frac F`
labels a fraction F of the rows ignore_index, as prompt tokens):
- `two-pass op (ours)`: `axolotl_bnf_plugin.kernels.token_logprobs(hidden, weight, labels)` (impl auto:
  Triton on CUDA, PyTorch on CPU) with a random upstream gradient on the log-probs: the logits are
  computed in the forward and again in the backward;
- `bnf single pass (ours)`: the BNF loss (all rows one response, a fixed reference) on the op with BNF's
  gradient rule (`grad_rule=BNF_GRAD_RULE`): the gradient is built during the forward, one logits pass;
- `bnf two-pass (ours)`: the same loss on the plain op. Its difference to the single pass is the saving;
- `asft single pass (ours)` / `asft two-pass (ours)`: the ASFT loss, the rows cut into paired responses of
  `ASFT_RESPONSE_ROWS` rows, with ASFT's gradient rule over responses (the op's blocks hold whole
  responses; one logits pass) or on the plain op;
- `naive`: logits = hidden @ weight.T, fp32 log_softmax, gather (what TRL's DPO path does);
- `liger flce`: Liger-Kernel's `LigerFusedLinearCrossEntropyLoss(reduction="none")`, with
  `accum_dtype=torch.float32` where the installed version has that keyword (CUDA only);
- `torch lce`: `torch.nn.functional.linear_cross_entropy(reduction="none")` with the chunked path
  (`LinearCrossEntropyOptions()`), when the installed torch has it.
Every method backpropagates into hidden and weight (a random upstream gradient per row, or its loss);
with `--frozen-weight` into hidden only, as under LoRA.

Columns:
- fwd+bwd ms: CUDA, the median over `--iters` steps after `--warmup` steps, each timed by CUDA events;
  CPU, the median wall time.
- extra peak MiB: CUDA, `max_memory_allocated` during one forward + backward minus what was allocated
  before (the inputs), minus the input gradients it returns; CPU, the peak growth of the resident set
  during one forward + backward (sampled by a thread, input gradients excluded), in a fresh process per
  (method, shape).
- flops: what the method executes, in units of N*H*V: 8 when the logits are computed in the forward and
  again in the backward (the two-pass ops; `torch lce` with reduction="none"; Liger releases whose
  reduction="none" path defers the gradient to the backward), 6 when the gradient is built in the
  forward pass (the single pass; older Liger releases) or the logits are kept (naive). A frozen weight
  saves the `d weight` product (2): and our two-pass op, which then builds `d hidden` in the forward, its
  recomputation too (4 in all).
- TFLOP/s and "of bf16 peak": on that count, against the dense bf16 peak of the GPU (`--peak-tflops`).
- TFLOP/s at 6NHV: the common model count (2NHV forward, 4NHV backward) for every method, so the
  methods compare directly: it is proportional to 1 / time.
N counts every row, scored or not.

`--jsonl PATH` appends each row as one JSON object as soon as it is measured (a run that is stopped
keeps the rows it finished); `--json PATH` writes the whole list at the end.
"""
from __future__ import annotations

import argparse
import functools
import gc
import importlib.metadata
import importlib.util
import inspect
import json
import multiprocessing as mp
import os
import queue as queue_module
import resource
import statistics
import sys
import time
import traceback

import torch

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) for the ratio column.
BF16_PEAK = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
IGNORE_INDEX = -100


def make_inputs(n, h, v, dtype, device, ignored_frac=0.0, seed=0):
    """hidden, weight (logits of unit variance), labels (a fraction `ignored_frac` ignored) and a random
    upstream gradient, generated on `device`."""
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g, device=device) / h**0.25).to(dtype)
    weight = (torch.randn(v, h, generator=g, device=device) / h**0.25).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g, device=device)
    if ignored_frac > 0:
        labels[torch.rand(n, generator=g, device=device) < ignored_frac] = IGNORE_INDEX
    upstream = torch.randn(n, generator=g, device=device)
    return hidden, weight, labels, upstream


CHUNK_ENV = "KERNEL_BENCH_CHUNK_SIZE"  # --chunk-size, read through the environment by spawned workers too
FROZEN_ENV = "KERNEL_BENCH_FROZEN_WEIGHT"  # --frozen-weight, likewise


def _frozen_weight() -> bool:
    return os.environ.get(FROZEN_ENV) == "1"


def _chunk_size() -> int | None:
    """Rows per logits block of our methods: --chunk-size, or None for the op's default."""
    value = os.environ.get(CHUNK_ENV)
    return int(value) if value else None


def two_pass_op(hidden, weight, labels):
    from axolotl_bnf_plugin.kernels import token_logprobs

    return token_logprobs(hidden, weight, labels, chunk_size=_chunk_size())[0]


def naive(hidden, weight, labels):
    logits = hidden @ weight.t()
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(1, labels.clamp(min=0)[:, None])[:, 0] * (labels != IGNORE_INDEX)


def liger_version() -> str | None:
    try:
        return importlib.metadata.version("liger-kernel")
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=None)
def _liger_loss():
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    options = {"reduction": "none"}
    if "accum_dtype" in inspect.signature(LigerFusedLinearCrossEntropyLoss.__init__).parameters:
        options["accum_dtype"] = torch.float32
    return LigerFusedLinearCrossEntropyLoss(**options)


def liger(hidden, weight, labels):
    return -_liger_loss()(weight, hidden, labels)


def liger_flops_factor() -> int:
    """8 if the installed Liger recomputes the logits in backward for reduction="none" (the releases whose
    forward takes the per-token upstream gradient as `token_grad_output`), else 6."""
    try:
        from liger_kernel.ops import fused_linear_cross_entropy as flce

        params = inspect.signature(flce.fused_linear_cross_entropy_forward).parameters
    except Exception:  # noqa: BLE001 - not installed or another layout: assume the older forward-gradient path
        return 6
    return 8 if "token_grad_output" in params else 6


def torch_lce(hidden, weight, labels):
    options = torch.nn.LinearCrossEntropyOptions()
    return -torch.nn.functional.linear_cross_entropy(hidden, weight, labels, reduction="none", options=options)


def _bnf(hidden, weight, labels, single_pass: bool):
    from axolotl_bnf_plugin.kernels import token_logprobs
    try:
        from axolotl_bnf_plugin.methods.bnf import bnf_loss, bnf_response_scale
    except ImportError:  # a checkout from before the methods package
        from axolotl_bnf_plugin.losses import bnf_loss, bnf_response_scale

    mask, sign = (labels != IGNORE_INDEX)[None], torch.ones(1, dtype=torch.long, device=labels.device)
    ref = torch.full(labels.shape, -8.0, device=labels.device)  # p_ref ~ 3e-4: a mix of clipped / unclipped q
    if single_pass:
        if "grad_rule" not in inspect.signature(token_logprobs).parameters:
            raise RuntimeError("this checkout's token_logprobs has no grad_rule / grad_inputs keywords: the BNF "
                               "single pass is measured through that API")
        try:
            from axolotl_bnf_plugin.methods.bnf import BNF_GRAD_RULE
        except ImportError:  # a checkout from before the methods package
            from axolotl_bnf_plugin.bnf_grad_rule import BNF_GRAD_RULE

        scale = bnf_response_scale(mask, sign)[:, None].expand(mask.shape).reshape(-1)
        logp, neg = token_logprobs(hidden, weight, labels, chunk_size=_chunk_size(), grad_rule=BNF_GRAD_RULE,
                                   grad_inputs=(ref, scale))[:2]
    else:
        logp, neg = token_logprobs(hidden, weight, labels, chunk_size=_chunk_size())
    return bnf_loss(logp[None], ref[None], neg[None], mask, sign)[0]


def bnf_two_pass(hidden, weight, labels):
    return _bnf(hidden, weight, labels, single_pass=False)


def bnf_single_pass(hidden, weight, labels):
    return _bnf(hidden, weight, labels, single_pass=True)


# ASFT's responses in the benchmark: consecutive runs of this many rows, paired (chosen, rejected).
ASFT_RESPONSE_ROWS = 128


def _asft(hidden, weight, labels, single_pass: bool):
    """The ASFT loss, rows cut into paired responses of ASFT_RESPONSE_ROWS rows (the last one shorter)."""
    from axolotl_bnf_plugin.kernels import token_logprobs
    from axolotl_bnf_plugin.methods.asft import ASFT, asft_loss

    n = labels.shape[0]
    lengths = [min(ASFT_RESPONSE_ROWS, n - start) for start in range(0, n, ASFT_RESPONSE_ROWS)]
    b, width = len(lengths), max(lengths)
    sign = torch.tensor([1 if i % 2 == 0 else -1 for i in range(b)], device=labels.device)
    pair_ids = torch.tensor([i // 2 if i // 2 * 2 + 1 < b else -1 for i in range(b)], device=labels.device)
    mask = (labels != IGNORE_INDEX)
    scored = [int(m.sum()) for m in mask.split(lengths)]
    # Rows as [B, width]: a response's rows in order (its ignored rows count toward nothing).
    index = torch.cat([torch.arange(length, device=labels.device) + i * width for i, length in enumerate(lengths)])

    def as_rows(values):
        return values.new_zeros(b * width).index_copy(0, index, values).view(b, width)

    row_mask = as_rows(mask.float()).bool()
    if single_pass:
        method = ASFT()
        inputs = method.grad_inputs(None, lambda v: torch.repeat_interleave(v, torch.tensor(lengths, device=v.device)),
                                    row_mask, sign, pair_ids)
        logp, _, rule_grad = token_logprobs(hidden, weight, labels, chunk_size=_chunk_size(), grad_rule=method.grad_rule,
                                            grad_inputs=inputs, segment_lengths=scored)
        from axolotl_bnf_plugin.kernels import with_rule_gradient

        loss = asft_loss(as_rows(logp.detach()), row_mask, sign, pair_ids)[0]
        return with_rule_gradient(loss, logp, rule_grad)
    logp, _ = token_logprobs(hidden, weight, labels, chunk_size=_chunk_size())
    return asft_loss(as_rows(logp), row_mask, sign, pair_ids)[0]


def asft_two_pass(hidden, weight, labels):
    return _asft(hidden, weight, labels, single_pass=False)


def asft_single_pass(hidden, weight, labels):
    return _asft(hidden, weight, labels, single_pass=True)


METHODS = {"two-pass op (ours)": two_pass_op, "bnf single pass (ours)": bnf_single_pass,
           "bnf two-pass (ours)": bnf_two_pass, "asft single pass (ours)": asft_single_pass,
           "asft two-pass (ours)": asft_two_pass, "naive": naive, "liger flce": liger, "torch lce": torch_lce}
SINGLE_PASS = ("bnf single pass (ours)", "asft single pass (ours)")
TWO_PASS = ("two-pass op (ours)", "bnf two-pass (ours)", "asft two-pass (ours)")


def flops_factor(name: str, liger_factor: int | None = None, frozen_weight: bool = False) -> int | None:
    """Flops the method executes, in units of N*H*V (see the module docstring); Liger's is `liger_factor`
    (with a trainable weight)."""
    full = liger_factor if name == "liger flce" else 6 if name in SINGLE_PASS + ("naive",) else 8
    if full is None or not frozen_weight:
        return full
    return 4 if name in TWO_PASS else full - 2


def available(name: str, device: torch.device) -> str | None:
    """None if the method can run here, else why not."""
    if name == "liger flce":
        if device.type != "cuda":
            return "needs CUDA"
        if importlib.util.find_spec("liger_kernel") is None:
            return "liger-kernel not installed"
    if name == "torch lce" and not (hasattr(torch.nn.functional, "linear_cross_entropy")
                                    and hasattr(torch.nn, "LinearCrossEntropyOptions")):
        return "not in this torch"
    return None


def step(fn, hidden, weight, labels, upstream):
    h = hidden.detach().requires_grad_(True)
    w = weight.detach().requires_grad_(not _frozen_weight())
    out = fn(h, w, labels)
    (out if out.dim() == 0 else (out * upstream).sum()).backward()  # a scalar is a whole loss
    return h.grad, w.grad


def time_cuda(fn, inputs, iters, warmup) -> list[float]:
    """Seconds of each of `iters` steps after `warmup` untimed ones (compilation, allocator, autotuning)."""
    for _ in range(warmup):
        step(fn, *inputs)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        start.record()
        step(fn, *inputs)
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) / 1e3 for start, end in events]


def time_cpu(fn, inputs, iters, warmup) -> list[float]:
    for _ in range(warmup):
        step(fn, *inputs)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step(fn, *inputs)
        times.append(time.perf_counter() - start)
    return times


def cuda_peak(fn, inputs, device) -> int:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    grads = step(fn, *inputs)
    torch.cuda.synchronize()
    grad_bytes = sum(g.numel() * g.element_size() for g in grads if g is not None)
    return torch.cuda.max_memory_allocated(device) - before - grad_bytes


def _rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _cpu_peak_worker(name, n, h, v, dtype_name, ignored_frac, queue):
    """Peak growth of the resident set during one forward + backward, sampled every 0.5 ms by a thread
    (the process's high-water mark is useless here: importing torch already set it higher)."""
    import threading

    inputs = make_inputs(n, h, v, getattr(torch, dtype_name), torch.device("cpu"), ignored_frac)
    step(METHODS[name], *inputs)  # warm-up: allocator pools, lazy imports
    grad_bytes = sum(t.numel() * t.element_size() for t in inputs[:1 if _frozen_weight() else 2])
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


def cpu_peak(name, n, h, v, dtype, ignored_frac) -> int:
    # In the measuring process glibc serves every allocation of 64 KiB or more with mmap and returns it
    # on free, so the resident set follows live tensor memory instead of heap reuse.
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_cpu_peak_worker,
                       args=(name, n, h, v, str(dtype).split(".")[-1], ignored_frac, queue))
    proc.start()
    try:
        while True:
            try:
                return queue.get(timeout=1.0)
            except queue_module.Empty:
                if not proc.is_alive() and queue.empty():
                    raise RuntimeError(f"the memory-measuring process for {name!r} exited with code {proc.exitcode}")
    finally:
        proc.join()


def measure(name, inputs, device, dtype, iters, warmup, ignored_frac) -> dict:
    """The timing and memory fields of one row."""
    fn = METHODS[name]
    n, h = inputs[0].shape
    v = inputs[1].shape[0]
    if device.type == "cuda":
        times = time_cuda(fn, inputs, iters, warmup)
        mem = cuda_peak(fn, inputs, device)
    else:
        times = time_cpu(fn, inputs, iters, warmup)
        mem = cpu_peak(name, n, h, v, dtype, ignored_frac)
    return {"ms": statistics.median(times) * 1e3, "times_ms": [t * 1e3 for t in times], "peak_mib": mem / 2**20}


def add_rates(row: dict, peak: float | None) -> dict:
    nhv = row["N"] * row["H"] * row["V"]
    factor = row["flops_factor"]
    seconds = row["ms"] / 1e3
    row["tflops"] = factor * nhv / seconds / 1e12
    row["tflops_6nhv"] = 6 * nhv / seconds / 1e12
    row["peak_ratio"] = row["tflops"] / peak if peak else None
    return row


TABLE_HEADER = ("| N | H | V | method | fwd+bwd ms | extra peak MiB | flops | TFLOP/s | of bf16 peak "
                "| TFLOP/s at 6NHV |\n|---|---|---|---|---|---|---|---|---|---|")


def table_line(r: dict) -> str:
    head = f"| {r['N']} | {r['H']} | {r['V']} | {r['method']} |"
    if "ms" not in r:
        return f"{head} n/a ({r.get('skipped') or r.get('error')}) | | | | | |"
    ratio = f"{100 * r['peak_ratio']:.0f}%" if r.get("peak_ratio") else "n/a"
    return (f"{head} {r['ms']:.1f} | {r['peak_mib']:.0f} | {r['flops_factor']}NHV | {r['tflops']:.2f} | {ratio} | "
            f"{r['tflops_6nhv']:.2f} |")


def caption(rows: list[dict]) -> str:
    """One line saying how the rows were measured (from the first row's fields)."""
    if not rows:
        return "No rows measured."
    r = rows[0]
    liger = f", liger-kernel {r['liger']}" if r.get("liger") else ""
    peak = f"; of bf16 peak: against {r['peak_tflops']:.0f} TFLOP/s dense" if r.get("peak_tflops") else ""
    scored = ("every row scored" if not r.get("ignored_frac")
              else f"{100 * r['ignored_frac']:.0f}% of rows ignored (N counts them)")
    memory = ("max_memory_allocated during one step minus the inputs and input gradients"
              if r.get("device_type") == "cuda" else "resident-set growth during one step, input gradients excluded")
    into = "hidden only (frozen weight)" if r.get("frozen_weight") else "hidden and weight"
    return (f"Kernel benchmark, {r['device']}, {r['dtype']}, torch {r['torch']}{liger}: forward + backward into "
            f"{into}, median of {r['iters']} steps after {r['warmup']} warm-up; {scored}; extra peak = "
            f"{memory}; TFLOP/s on the flops each method executes{peak}; TFLOP/s at 6NHV on the common count.")


def markdown(rows: list[dict]) -> str:
    return "\n".join([caption(rows), "", TABLE_HEADER, *(table_line(r) for r in rows)]) + "\n"


def read_rows(path: str) -> list[dict]:
    """Rows from a JSON list or JSON lines (a partly written last line is dropped)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        return json.loads(text)
    rows = []
    for line in text.splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                print(f"skipping an unreadable line of {path}: {line[:80]!r}", file=sys.stderr)
    return rows


def append_jsonl(path: str, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="*", default=None, help="NxHxV, e.g. 16384x4096x151936")
    parser.add_argument("--iters", type=int, default=None, help="timed steps (default: 10 on CUDA, 2 on CPU)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    parser.add_argument("--json", type=str, default=None, help="write all rows as a JSON list at the end")
    parser.add_argument("--jsonl", type=str, default=None, help="append each row as a JSON line when measured")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS), metavar="METHOD",
                        help=f"any of: {', '.join(METHODS)}")
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="rows per logits block of our methods (default: the op's own, from its 256 MiB workspace)")
    parser.add_argument("--frozen-weight", action="store_true",
                        help="backpropagate into hidden only, as with a frozen output embedding under LoRA")
    parser.add_argument("--ignored-frac", type=float, default=0.0, help="fraction of rows labelled ignore_index")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak (default: by GPU name)")
    parser.add_argument("--table-from", type=str, default=None, metavar="JSON",
                        help="print the markdown table of rows in a --json / --jsonl file and exit")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.table_from:
        print(markdown(read_rows(args.table_from)), end="")
        return 0

    if args.chunk_size:
        os.environ[CHUNK_ENV] = str(args.chunk_size)
    os.environ[FROZEN_ENV] = "1" if args.frozen_weight else "0"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        dtype, iters = torch.bfloat16, args.iters or 10
        shapes = args.shapes or [f"{n}x4096x{v}" for v in (128256, 151936) for n in (4096, 16384, 32768)]
        gpu = torch.cuda.get_device_name(device)
        peak = args.peak_tflops or next((p for k, p in BF16_PEAK.items() if k in gpu), None)
    else:
        dtype, iters = torch.float32, args.iters or 2
        shapes = args.shapes or ["512x256x32000", "2048x256x32000", "2048x256x128256"]
        gpu, peak = "CPU", None
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    meta = {"device": gpu, "device_type": device.type, "dtype": str(dtype).split(".")[-1], "torch": torch.__version__,
            "triton": triton_version, "liger": liger_version(), "iters": iters, "warmup": args.warmup,
            "ignored_frac": args.ignored_frac, "peak_tflops": peak, "chunk_size": args.chunk_size,
            "frozen_weight": args.frozen_weight}
    liger_factor, liger_note = None, ""
    if "liger flce" in args.methods and available("liger flce", device) is None:
        liger_factor = liger_flops_factor()
        how = "logits recomputed in backward" if liger_factor == 8 else "gradient built in forward"
        liger_note = f"; liger-kernel {meta['liger']} (reduction='none' counted as {liger_factor}NHV: {how})"
    print(f"device: {gpu}; dtype: {meta['dtype']}; torch {torch.__version__}; triton {triton_version}{liger_note}; "
          f"iters {iters} after {args.warmup} warm-up; ignored rows {args.ignored_frac:g}; "
          f"bf16 peak {peak or 'n/a'} TFLOP/s", flush=True)

    rows, failures = [], 0
    for shape in shapes:
        n, h, v = (int(x) for x in shape.split("x"))
        inputs = make_inputs(n, h, v, dtype, device, args.ignored_frac)
        for name in args.methods:
            row = {"N": n, "H": h, "V": v, "method": name,
                   "flops_factor": flops_factor(name, liger_factor, args.frozen_weight), **meta}
            why_not = available(name, device)
            if why_not:
                row["skipped"] = why_not
            else:
                try:
                    row.update(measure(name, inputs, device, dtype, iters, args.warmup, args.ignored_frac))
                    add_rates(row, peak)
                except torch.OutOfMemoryError:
                    row["skipped"] = "out of memory"
                except Exception as exc:  # noqa: BLE001 - one broken method must not cost the other rows
                    traceback.print_exc()
                    row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
                    failures += 1
                finally:
                    if device.type == "cuda":
                        gc.collect()
                        torch.cuda.empty_cache()
            rows.append(row)
            if args.jsonl:
                append_jsonl(args.jsonl, row)
            print(table_line(row), flush=True)
        del inputs
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print("\n" + markdown(rows), end="", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)
    if failures:
        print(f"{failures} row(s) failed (see the tracebacks above)", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
