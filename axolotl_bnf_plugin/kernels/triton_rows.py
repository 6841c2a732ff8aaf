"""Row operations on one logits block as Triton kernels (CUDA; CPU under TRITON_INTERPRET=1).

One program per row streams the row's vocabulary in blocks of BLOCK_V:
- `_stats_kernel`: online softmax — a running max m, s = sum exp(z - m) and t = sum exp(z - m) * z,
  rescaled when m grows — gives lse = m + log s and E_p[z] = t / s in one pass; the label logit is one
  extra load.
- `_dlogits_kernel`: recomputes p = exp(z - lse) and writes grad * (onehot(y) - p), chained through the
  soft-cap and scale, over the block in place (in the block's dtype), ready for the two matmuls.
All arithmetic is fp32 whatever the block's dtype. tanh is written with exp so the same code runs in
the interpreter.
"""
from __future__ import annotations

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
def _stats_kernel(block_ptr, stride_row, labels_ptr, lse_ptr, zy_ptr, ez_ptr, V, scale, softcap,
                  HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = block_ptr + row * stride_row
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
    label = tl.load(labels_ptr + row)
    z_y = _transform(tl.load(base + label).to(tl.float32), scale, softcap, HAS_SCALE, HAS_SOFTCAP)
    tl.store(lse_ptr + row, m + tl.log(s))
    tl.store(zy_ptr + row, z_y)
    tl.store(ez_ptr + row, t / s)


@triton.jit
def _dlogits_kernel(block_ptr, stride_row, labels_ptr, lse_ptr, grad_ptr, V, scale, softcap,
                    HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = block_ptr + row * stride_row
    label = tl.load(labels_ptr + row)
    lse = tl.load(lse_ptr + row)
    grad = tl.load(grad_ptr + row)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        inside = cols < V
        raw = tl.load(base + cols, mask=inside, other=0.0).to(tl.float32)
        z = _transform(raw, scale, softcap, HAS_SCALE, HAS_SOFTCAP)
        dz = grad * (tl.where(cols == label, 1.0, 0.0) - tl.exp(z - lse))
        if HAS_SOFTCAP:
            dz = dz * (1.0 - (z / softcap) * (z / softcap))
        if HAS_SCALE:
            dz = dz * scale
        tl.store(base + cols, dz.to(block_ptr.dtype.element_ty), mask=inside)


# Vocabulary columns per step of a row's loop (a power of two).
MAX_BLOCK_V = 4096


def _block_v(vocab: int) -> int:
    return min(MAX_BLOCK_V, triton.next_power_of_2(vocab))


def _flags(transform: LogitTransform):
    return dict(
        scale=float(transform.scale) if transform.scale is not None else 1.0,
        softcap=float(transform.softcap) if transform.softcap is not None else 1.0,
        HAS_SCALE=transform.scale is not None,
        HAS_SOFTCAP=transform.softcap is not None,
    )


def stats(block: torch.Tensor, labels: torch.Tensor, transform: LogitTransform):
    rows, vocab = block.shape
    lse = torch.empty(rows, dtype=torch.float32, device=block.device)
    z_y, expected_z = torch.empty_like(lse), torch.empty_like(lse)
    if rows:
        _stats_kernel[(rows,)](block, block.stride(0), labels, lse, z_y, expected_z, vocab,
                               BLOCK_V=_block_v(vocab), **_flags(transform))
    return lse, z_y, expected_z


def dlogits_(block: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor,
             transform: LogitTransform) -> torch.Tensor:
    rows, vocab = block.shape
    if rows:
        _dlogits_kernel[(rows,)](block, block.stride(0), labels, lse, grad.float().contiguous(), vocab,
                                 BLOCK_V=_block_v(vocab), **_flags(transform))
    return block
