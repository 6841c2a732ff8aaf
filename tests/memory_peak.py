"""Peak CPU memory allocated by PyTorch inside a block of code, measured exactly and deterministically.

    with cpu_memory() as mem:
        loss = f(x)
        loss.backward()
    mem.peak   # most bytes that allocations made inside the block held at any one time
    mem.end    # bytes those allocations still held when the block ended (e.g. new .grad tensors)

How: the block runs under `torch.profiler.profile(activities=[CPU], profile_memory=True)`. While memory
profiling is on, PyTorch's CPU allocator reports every allocation and every free to the profiler, each
report carrying the size (negative for a free) and the allocator's running total of the bytes it has
handed out. Each allocation event of the profiler's event tree therefore gives the live total right after
it; the peak is the largest of those minus the total before the first event.

Why this method:
- It sees every allocation of the CPU allocator on the profiled thread, wherever it is made: inside
  `torch.library.custom_op` Python implementations, autograd's backward (which runs on the calling thread
  for CPU tensors) and in-place / `out=` ops alike. A `TorchDispatchMode` that watches storages does not:
  the ops a custom op's implementation runs are below the dispatch key where the mode sits, so the
  logits blocks and accumulators of the fused op would be invisible to it.
- It is exact and deterministic (byte counts of allocations, not sampled resident-set sizes), so a test
  can compare it against a computed bound with a small fixed slack.
- Allocations made before the block are not counted, and neither are their frees (the allocator only
  knows the sizes of blocks it allocated while profiling): `peak` is the high-water mark of the block's
  own allocations, i.e. the memory the block needs beyond what already existed.

Not seen: memory not allocated through PyTorch's CPU allocator (BLAS/oneDNN internal workspaces, NumPy
arrays, Python objects). A tensor kept alive by a reference cycle counts until Python's cycle collector
frees it; garbage from before the block is collected when it starts. `tests/test_memory_bound.py` checks
the method on known cases (tensors of known sizes, a matmul, allocations inside a custom op).

The event tree is a private profiler API (`kineto_results.experimental_event_tree()`); if a PyTorch
release changes it, the known-case tests fail first.
"""
from __future__ import annotations

import gc
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch.profiler import ProfilerActivity, profile


@dataclass
class MemoryUse:
    """Bytes allocated inside a `cpu_memory()` block (filled in when the block exits)."""

    peak: int = 0  # highest live total of the block's allocations
    end: int = 0  # live total when the block ended
    events: int = 0  # allocator events seen (allocations + frees)


def _allocation_events(prof) -> list[tuple[int, int, int, int]]:
    """(time ns, address, signed size, allocator total after) of every CPU allocation / free, in time order."""
    allocation = torch._C._profiler._EventType.Allocation
    found, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        kind, fields = event.typed
        if kind == allocation and fields.device.type == "cpu":
            found.append((event.start_time_ns, fields.ptr, int(fields.alloc_size), int(fields.total_allocated)))
    found.sort(key=lambda e: e[0])
    return found


def replay(events: list[tuple[int, int, int, int]]) -> MemoryUse:
    """Live bytes of the allocations made inside the window, event by event; frees of blocks allocated
    before it are ignored. Checks that the order is the allocator's (its running total moves by each size)."""
    use, live, sizes = MemoryUse(events=len(events)), 0, {}
    for i, (_, ptr, size, total) in enumerate(events):
        if i and total - events[i - 1][3] != size:
            raise RuntimeError("allocator events out of order (equal time stamps?): the measurement is not exact")
        if size > 0:
            sizes[ptr] = size
            live += size
            use.peak = max(use.peak, live)
        else:
            live -= sizes.pop(ptr, 0)
    use.end = live
    return use


@contextmanager
def cpu_memory() -> Iterator[MemoryUse]:
    """Measure the CPU memory PyTorch allocates inside the `with` block; see the module docstring."""
    use = MemoryUse()
    # Collect the garbage from before the block, then freeze the survivors: collections inside the block
    # (automatic or explicit) then only look at new objects, and are cheap.
    gc.collect()
    already_frozen = gc.get_freeze_count() > 0
    gc.freeze()
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            yield use
    finally:
        if not already_frozen:
            gc.unfreeze()
    result = replay(_allocation_events(prof))
    use.peak, use.end, use.events = result.peak, result.end, result.events
