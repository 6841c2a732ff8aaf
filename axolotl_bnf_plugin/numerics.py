"""Skip optimiser steps whose loss or gradient is not finite, instead of corrupting the weights.

A non-finite value reaching the optimiser poisons every weight it touches (and Adam's moments for
good). The guard watches each micro-batch's loss and, just before the optimiser step, the gradient
norm; a bad step is skipped (gradients dropped, optimiser state untouched) and counted, the user is told
once which examples were in it, and after `max_bad_steps` consecutive bad steps training stops with an
error instead of running on for hours. In multi-process runs every process takes the same decision.
"""
from __future__ import annotations

import logging
import math

import torch
from transformers import TrainerCallback

LOG = logging.getLogger(__name__)


class NonFiniteStepError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


class StepGuard:
    def __init__(self, max_bad_steps: int, check_gradients: bool = True):
        self.max_bad_steps = max_bad_steps
        self.check_gradients = check_gradients  # off under fp16 loss scaling, whose scaler skips inf steps itself
        self.skipped = 0
        self.consecutive = 0
        self._bad_loss = False
        self._example_ids: list[int] = []
        self._warned = False
        self._stepped = False  # `guarded_step` ran for the current optimiser step
        self._distributed_any = None

    def observe(self, loss: torch.Tensor, example_ids: torch.Tensor | None) -> None:
        """After a micro-batch's backward: remember whether its loss was finite, and which examples it held."""
        if example_ids is not None:
            self._example_ids.extend(int(i) for i in example_ids.tolist())
        if not bool(torch.isfinite(loss.detach()).all()):
            self._bad_loss = True

    def wrap(self, optimizer, parameters, distributed_any=None):
        """Make `optimizer.step` skip bad steps. `distributed_any(flag) -> flag` agrees across processes."""
        original_step = optimizer.step
        guard = self
        self._distributed_any = distributed_any

        def guarded_step(*args, **kwargs):
            guard._stepped = True
            bad = guard._bad_loss
            if guard.check_gradients and not bad:
                grads = [p.grad for p in parameters() if p.grad is not None]
                bad = bool(grads) and not math.isfinite(float(torch.nn.utils.get_total_norm(grads)))
            if distributed_any is not None:
                bad = distributed_any(bad)
            ids, guard._example_ids, guard._bad_loss = guard._example_ids, [], False
            if bad:
                optimizer.zero_grad(set_to_none=True)
                guard._skip(ids)
                return None
            guard.consecutive = 0
            return original_step(*args, **kwargs)

        optimizer.step = guarded_step
        return optimizer

    def end_step(self) -> None:
        """After every optimiser step, taken or not (`StepGuardCallback`).

        Under fp16 the loss scaler skips a step whose gradients are not finite without calling the
        optimiser, so `guarded_step` never sees it. A non-finite loss there is a bad step all the same
        (counted; training stops after `max_bad_steps` in a row), while a finite loss whose scaled gradients
        overflowed is the scaler calibrating and is not counted. Either way the step's flag and examples
        must not carry over to the next step, which would then be dropped for them.
        """
        stepped, self._stepped = self._stepped, False
        if stepped:
            return
        bad = self._bad_loss
        if self._distributed_any is not None:
            bad = self._distributed_any(bad)
        ids, self._example_ids, self._bad_loss = self._example_ids, [], False
        if bad:
            self._skip(ids)

    def _skip(self, example_ids: list[int]) -> None:
        self.skipped += 1
        self.consecutive += 1
        if not self._warned:
            self._warned = True
            LOG.warning(
                "non-finite loss or gradient: optimiser step skipped (examples %s). Further skips are counted "
                "in skipped_steps; training stops after %d consecutive ones (bnf_max_bad_steps).",
                example_ids, self.max_bad_steps,
            )
        if self.consecutive >= self.max_bad_steps:
            raise NonFiniteStepError(
                f"{self.consecutive} consecutive optimiser steps had a non-finite loss or gradient (last examples: "
                f"{example_ids}); stopping. Check the data for these examples, lower the learning rate, or use "
                "bf16 / fp32 instead of fp16."
            )


class StepGuardCallback(TrainerCallback):
    """Ends the guard's step after every optimiser step, including those a loss scaler skipped."""

    def __init__(self, guard: StepGuard):
        self.guard = guard

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.guard.end_step()
