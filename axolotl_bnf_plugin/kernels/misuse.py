"""A single-pass op whose log-probs fed a loss that is not its rule's: a Python error, never a dead process.

The single pass builds its gradients for one loss (its gradient rule), and backward only scales them; if
`logp` fed anything else, those gradients are wrong. Backward sees this on the device (the upstream
gradient is not the predicted one times a constant), and must neither sync the host every step to ask nor
use a device-side assert, which kills the CUDA context (and hangs the other ranks of a distributed run).

So the check's boolean is copied to pinned host memory without blocking, behind an event; the next call of
the op (or `raise_pending`, which the trainer calls where it synchronises anyway) reads it once the event
has passed and raises `SinglePassMisuse`. The wrong step itself is not applied: its gradients are made
non-finite, which the trainer's step guard skips. On the CPU there is nothing to wait for and the error is
raised at once, in backward. A loop that calls the op itself should call `raise_pending(wait=True)` after
its last step (the trainer does at every log). Inside a traced graph (`torch.compile`) no flag can leave the graph: there
the poisoned gradients alone report the misuse, through the step guard.
"""
from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake


class SinglePassMisuse(RuntimeError):
    """The log-probs of a single-pass op fed a loss other than its gradient rule's."""


_PENDING: list[tuple[torch.Tensor, torch.cuda.Event, str]] = []


def report(fits: torch.Tensor, message: str) -> None:
    """Raise `SinglePassMisuse(message)` if the 0-dim bool `fits` is False: now on the CPU, later on CUDA."""
    if torch.compiler.is_compiling() or is_fake(fits) or (fits.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    if not fits.is_cuda:
        if not bool(fits):
            raise SinglePassMisuse(message)
        return
    host = torch.empty((), dtype=torch.bool, pin_memory=True)
    host.copy_(fits, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    _PENDING.append((host, event, message))


def raise_pending(wait: bool = False) -> None:
    """Raise for the oldest failed check whose flag has reached the host; with `wait`, wait for them all.
    Nothing to do while a CUDA graph is being captured (an event may not be queried then)."""
    if _PENDING and torch.cuda.is_current_stream_capturing():
        return
    while _PENDING:
        host, event, message = _PENDING[0]
        if not wait and not event.query():
            return
        event.synchronize()
        _PENDING.pop(0)
        if not bool(host):
            _PENDING.clear()
            raise SinglePassMisuse(message)
