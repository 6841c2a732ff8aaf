"""Block-sized buffers reused by every block of one chunk loop.

A chunk loop makes the same `[rows, V]` logits block (and, in PyTorch, one fp32 scratch block) once per
chunk. On a CPU a fresh allocation that large is fresh pages from the kernel, faulted in and zeroed on
first write: about a quarter of a second per GiB, a quarter of the loop's elementwise time at V = 128256.
Taking each buffer once per op call and handing out views of it costs that once. (CUDA's caching
allocator already reuses freed blocks; there the workspace only makes the reuse explicit.)
"""
from __future__ import annotations

import math

import torch


class Workspace:
    """Named flat buffers, each grown to the largest request and handed out as contiguous views."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype,
             device: torch.device) -> torch.Tensor:
        """An uninitialised contiguous tensor of `shape`, sharing memory with every earlier `take(name)`."""
        size = math.prod(shape)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < size or buffer.dtype != dtype or buffer.device != device:
            self._buffers.pop(name, None)  # free the old one before making the new
            buffer = self._buffers[name] = torch.empty(size, dtype=dtype, device=device)
        return buffer[:size].view(shape)

    def project(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """`hidden @ weight.T + bias` (a raw logits block) into the reused "block" buffer."""
        out = self.take("block", (hidden.shape[0], weight.shape[0]), hidden.dtype, hidden.device)
        if bias is None:
            return torch.mm(hidden, weight.t(), out=out)
        return torch.addmm(bias, hidden, weight.t(), out=out)
