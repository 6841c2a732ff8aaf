"""How large a logits block may be: rows (and vocabulary columns) from the bytes an implementation allocates.

The op's memory beyond its inputs and outputs is one `[rows, cols]` logits block at a time, plus an fp32
gradient accumulator where one is needed (`d weight` over row chunks; `d hidden` over vocabulary slices).
The block's cost per logit depends on the implementation:
- `triton`: the block itself, in the inputs' dtype; the row kernels read and overwrite it in place and
  allocate nothing. (On CPU, under the interpreter, the `d weight` product of a half-precision block needs
  an fp32 copy of it: 4 more bytes.)
- `torch`: the block plus one fp32 scratch block (the exponentials / d logits, `torch_rows`) and, for a
  half-precision block, its fp32 upcast: 4 more bytes for fp32, 8 for half precision.

Large blocks matter for speed as much as small ones for memory: every row chunk re-reads the whole
`[V, H]` weight and, when `d weight` is accumulated over row chunks, reads and writes its fp32
accumulator; and a GEMM with few rows leaves most of a large GPU idle. So the default workspace is spent
fully, and rows are rounded to multiples of 64 (a GEMM tile) when that many fit.

Bytes, not only flops. A chunk's `d weight` GEMM into the fp32 `[V, H]` accumulator does 2 * rows * V * H
flops and reads and writes 8 * V * H bytes: it is bandwidth-bound below rows = 4 * (flops per byte of the
GPU), about 1180 rows on an H100 (989 TFLOP/s bf16 over 3.35 TB/s), 820 on an H200. With a large vocabulary
and hidden size the 256 MiB block holds fewer rows than that (512 at V = 262144 in bf16), and the
accumulator's traffic would cost more than the GEMM's math. So on CUDA, when `d weight` is needed, the
default block may grow to `COMPUTE_BOUND_ROWS` rows, up to V * H bytes: a quarter of the fp32 accumulator,
half the `d weight` the op returns in bf16. The vocabulary-sliced backward's fp32 `[N, H]` `d hidden`
accumulator is the same product with the roles swapped, and the slices take their bytes from that block:
`C * V / N` columns, at least `COMPUTE_BOUND_ROWS` for micro-batches of up to N = V tokens; beyond that the
slices narrow and, below `MIN_SLICE_COLS`, the backward goes by row chunks of C rows (compute-bound as above).
A chunk size the caller sets bounds both schedules as it is.
"""
from __future__ import annotations

import torch

# Bytes the logits block (and its temporaries) may take.
DEFAULT_WORKSPACE_BYTES = 256 * 1024 * 1024

# Fewest vocabulary columns a slice of the vocabulary-sliced backward may have before it falls back to
# row chunks: below this the slice's GEMMs get too thin to run well.
MIN_SLICE_COLS = 1024

# Rows (or vocabulary columns) a GEMM accumulating into an fp32 operand needs to be compute-bound on the
# GPUs this targets: 4 * peak flops / bandwidth is about 1180 on an H100, 820 on an H200; with margin.
COMPUTE_BOUND_ROWS = 2048


def element_bytes(dtype: torch.dtype) -> int:
    """Bytes of one element of a floating-point dtype (a materialised logit in the model's dtype)."""
    return torch.finfo(dtype).bits // 8


def bytes_per_logit(impl: str, dtype: torch.dtype, device_type: str = "cuda") -> int:
    """Bytes allocated per element of a `[rows, V]` logits block by implementation `impl`, at its peak."""
    element = element_bytes(dtype)
    if impl == "torch":
        return element + 4 + (4 if element < 4 else 0)
    if impl == "triton":
        return element + (4 if device_type != "cuda" and element < 4 else 0)
    raise ValueError(f"impl must be 'torch' or 'triton', got {impl!r}")


def block_bytes(rows: int, vocab_size: int, dtype: torch.dtype, impl: str = "torch", device_type: str = "cuda") -> int:
    """Bytes one `[rows, vocab_size]` logits block takes with its temporaries: the op's workspace."""
    return rows * vocab_size * bytes_per_logit(impl, dtype, device_type)


def _round_rows(rows: int) -> int:
    """Multiples of 64 (a GEMM tile) where that many fit, else of 16; at least 16."""
    if rows >= 64:
        return rows // 64 * 64
    return max(rows // 16 * 16, 16)


def rows_per_block(vocab_size: int, dtype: torch.dtype, impl: str = "torch", device_type: str = "cuda",
                   workspace_bytes: int = DEFAULT_WORKSPACE_BYTES) -> int:
    """Most rows whose `[rows, vocab_size]` block (with its temporaries) fits the workspace; at least 16."""
    return _round_rows(workspace_bytes // (vocab_size * bytes_per_logit(impl, dtype, device_type)))


def default_chunk_size(vocab_size: int, dtype: torch.dtype, workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
                       impl: str = "torch", device_type: str = "cuda", hidden_size: int = 0) -> int:
    """Rows per block of the row-chunked passes (the name the trainer's `bnf_loss_chunk_size` overrides).

    `hidden_size` > 0 says `d weight` is needed (an fp32 `[V, H]` accumulator may be read and written per
    chunk): on CUDA the block then grows towards `COMPUTE_BOUND_ROWS` rows, up to a quarter of that
    accumulator's bytes (module docstring)."""
    rows = rows_per_block(vocab_size, dtype, impl, device_type, workspace_bytes)
    if device_type != "cuda" or hidden_size <= 0 or rows >= COMPUTE_BOUND_ROWS:
        return rows
    quarter_of_accumulator = vocab_size * hidden_size  # 4 bytes per element / 4
    return min(COMPUTE_BOUND_ROWS,
               max(rows, rows_per_block(vocab_size, dtype, impl, device_type, quarter_of_accumulator)))


def vocab_slice_cols(rows: int, vocab_size: int, dtype: torch.dtype, impl: str = "torch",
                     device_type: str = "cuda", workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
                     chunk_size: int | None = None, hidden_size: int = 0) -> int | None:
    """Vocabulary columns per slice when all `rows` go through one `[rows, cols]` block, or None when fewer
    than `MIN_SLICE_COLS` columns would fit (the backward then chunks rows instead).

    `chunk_size`, when the caller set one, caps the block at `chunk_size * vocab_size` logits' bytes, what
    the row-chunked passes hold, so one setting bounds both schedules. Half precision off CUDA also pays an
    fp32 copy of each `[cols, hidden_size]` weight slice (the `d hidden` product, `chunked.add_product_`).
    """
    per_logit = bytes_per_logit(impl, dtype, device_type)
    budget = workspace_bytes if chunk_size is None else chunk_size * vocab_size * per_logit
    upcast_weight = 4 * hidden_size if device_type != "cuda" and element_bytes(dtype) < 4 else 0
    cols = budget // (max(rows, 1) * per_logit + upcast_weight)
    if cols >= vocab_size:
        return vocab_size
    if cols < max(MIN_SLICE_COLS, 1):
        return None
    return int(cols // 128 * 128 if cols >= 128 else cols)
