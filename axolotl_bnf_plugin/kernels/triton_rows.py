"""Row operations on one logits block as Triton kernels (CUDA; CPU under TRITON_INTERPRET=1).

- `_stats_kernel`, one program per row: an online softmax over the row in tiles of BLOCK_V (running max m,
  s = sum exp(z - m), t = sum exp(z - m) * z, rescaled when m grows) gives lse = m + log s and
  E_p[z] = t / s in one read of the row; the label logit is one more load.
- `_dlogits_kernel`, one program per (row, tile): d logits depend on the row only through its lse, label
  and upstream gradient, so the block is a flat elementwise map, launched over every tile at once to keep
  all of HBM's bandwidth busy. It takes a column offset, so it serves vocabulary slices too.
- `rule_pass_` (the single pass): the statistics kernel, the row's upstream gradient computed from them in
  PyTorch (a loss's gradient rule: one implementation of it, shared with the loss, see `grad_rules`), then
  the d-logits kernel.
A label outside the row's columns is never loaded: its logit reads as NaN, which poisons only that row.
All arithmetic is fp32 whatever the block's dtype; tanh is written with exp so the interpreter runs it.
The kernels allocate nothing: the `workspace` argument the PyTorch back-end uses for its scratch is unused.
"""
from __future__ import annotations

from typing import Callable

import torch
import triton
import triton.language as tl

from .logit_transform import LogitTransform


@triton.jit
def _transform(raw, scale, softcap, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    z = raw
    if HAS_SCALE:
        z = z * scale
    if HAS_SOFTCAP:
        # softcap * tanh(z / softcap), with tanh(x) = 1 - 2 / (exp(2x) + 1)
        z = softcap * (1.0 - 2.0 / (tl.exp(2.0 * z / softcap) + 1.0))
    return z


@triton.jit
def _dz(z, cols, label, lse, grad, scale, softcap, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """d loss / d raw logit for an upstream gradient `grad` on the label's log-prob."""
    dz = grad * (tl.where(cols == label, 1.0, 0.0) - tl.exp(z - lse))
    if HAS_SOFTCAP:
        dz = dz * (1.0 - (z / softcap) * (z / softcap))
    if HAS_SCALE:
        dz = dz * scale
    return dz


@triton.jit
def _row_stats(base, label, V, scale, softcap, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
               BLOCK_V: tl.constexpr):
    """(lse, z_y, E_p[z]) of one row by an online softmax."""
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    t = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        inside = cols < V
        raw = tl.load(base + cols, mask=inside, other=0.0).to(tl.float32)
        z = _transform(raw, scale, softcap, HAS_SCALE, HAS_SOFTCAP)
        z = tl.where(inside, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        rescale = tl.exp(m - m_new)
        e = tl.where(inside, tl.exp(z - m_new), 0.0)
        s = s * rescale + tl.sum(e, axis=0)
        t = t * rescale + tl.sum(e * tl.where(inside, z, 0.0), axis=0)
        m = m_new
    valid = (label >= 0) & (label < V)
    z_y = _transform(tl.load(base + label, mask=valid, other=float("nan")).to(tl.float32), scale, softcap,
                     HAS_SCALE, HAS_SOFTCAP)
    return m + tl.log(s), z_y, t / s


@triton.jit
def _stats_kernel(block_ptr, stride_row, labels_ptr, lse_ptr, zy_ptr, ez_ptr, V, scale, softcap,
                  HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    lse, z_y, ez = _row_stats(block_ptr + row * stride_row, label, V, scale, softcap, HAS_SCALE, HAS_SOFTCAP,
                              BLOCK_V)
    tl.store(lse_ptr + row, lse)
    tl.store(zy_ptr + row, z_y)
    tl.store(ez_ptr + row, ez)


@triton.jit
def _dlogits_kernel(block_ptr, stride_row, labels_ptr, lse_ptr, grad_ptr, V, col_offset, scale, softcap,
                    HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    inside = cols < V
    base = block_ptr + row * stride_row
    label = tl.load(labels_ptr + row) - col_offset
    raw = tl.load(base + cols, mask=inside, other=0.0).to(tl.float32)
    z = _transform(raw, scale, softcap, HAS_SCALE, HAS_SOFTCAP)
    dz = _dz(z, cols, label, tl.load(lse_ptr + row), tl.load(grad_ptr + row), scale, softcap, HAS_SCALE,
             HAS_SOFTCAP)
    tl.store(base + cols, dz.to(block_ptr.dtype.element_ty), mask=inside)


# Vocabulary columns per tile of a row's loop (a power of two), and per program of the elementwise kernel.
MAX_BLOCK_V = 4096
ELEMENTWISE_BLOCK_V = 2048


def _block_v(vocab: int, largest: int) -> int:
    return min(largest, MAX_BLOCK_V, triton.next_power_of_2(vocab))


def _warps(block_v: int) -> int:
    return 8 if block_v >= 2048 else 4


def _flags(transform: LogitTransform):
    return dict(
        scale=float(transform.scale) if transform.scale is not None else 1.0,
        softcap=float(transform.softcap) if transform.softcap is not None else 1.0,
        HAS_SCALE=transform.scale is not None,
        HAS_SOFTCAP=transform.softcap is not None,
    )


def stats(block: torch.Tensor, labels: torch.Tensor, transform: LogitTransform, workspace=None):
    rows, vocab = block.shape
    lse = torch.empty(rows, dtype=torch.float32, device=block.device)
    z_y, expected_z = torch.empty_like(lse), torch.empty_like(lse)
    if rows:
        bv = _block_v(vocab, MAX_BLOCK_V)
        _stats_kernel[(rows,)](block, block.stride(0), labels, lse, z_y, expected_z, vocab,
                               BLOCK_V=bv, num_warps=_warps(bv), **_flags(transform))
    return lse, z_y, expected_z


def dlogits_(block: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor,
             transform: LogitTransform, col_offset: int = 0, workspace=None) -> torch.Tensor:
    rows, vocab = block.shape
    if rows:
        bv = _block_v(vocab, ELEMENTWISE_BLOCK_V)
        _dlogits_kernel[(rows, triton.cdiv(vocab, bv))](
            block, block.stride(0), labels, lse, grad.float().contiguous(), vocab, col_offset,
            BLOCK_V=bv, num_warps=_warps(bv), **_flags(transform))
    return block


def rule_pass_(block: torch.Tensor, labels: torch.Tensor, row_grad: Callable[[torch.Tensor], torch.Tensor],
               transform: LogitTransform, workspace=None):
    """Statistics, `row_grad(logp)` (each row's upstream gradient) in PyTorch, d logits. Returns fp32
    (logp, neg_entropy, lse) per row and the block, overwritten with its d logits."""
    lse, z_y, expected_z = stats(block, labels, transform)
    logp = z_y - lse
    dlogits_(block, labels, lse, row_grad(logp), transform)
    return logp, expected_z - lse, lse, block
