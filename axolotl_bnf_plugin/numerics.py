"""Skip optimiser steps whose loss or gradient is not finite, instead of corrupting the weights.

A non-finite value reaching the optimiser poisons every weight it touches (and Adam's moments for
good). The guard watches each micro-batch's loss and, just before the optimiser step, the gradient
norm; a bad step is skipped (gradients dropped, optimiser state untouched) and counted, the user is told
once which examples were in it, and after `max_bad_steps` consecutive bad steps training stops with an
error instead of running on for hours. In multi-process runs every process takes the same decision.
"""
from __future__ import annotations

import logging

import torch
from transformers import TrainerCallback

LOG = logging.getLogger(__name__)


class NonFiniteStepError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a (possibly FSDP2-sharded) tensor: no collective."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def all_finite(tensors) -> torch.Tensor:
    """A 0-dim bool tensor on the tensors' device: every value finite. The largest magnitude is finite exactly
    when every value is (it propagates NaN and never overflows), so fp16 gradients are not mistaken for bad."""
    tensors = [_local(t) for t in tensors if t is not None and t.numel()]
    if not tensors:
        return torch.tensor(True)
    return torch.isfinite(torch.nn.utils.get_total_norm(tensors, norm_type=float("inf")))


def deepspeed_local_gradients(zero_optimizer) -> list[torch.Tensor] | None:
    """This process's partition of the reduced gradients a DeepSpeed ZeRO optimizer is about to step with
    (`p.grad` is empty under ZeRO): ZeRO-3 keeps them in one flat buffer, ZeRO-1/2 per group. None where they
    cannot be read safely at that point (ZeRO-1/2 offloading to the CPU fills its buffers asynchronously; a
    layout not listed here): the guard then checks the loss only."""
    flat = getattr(zero_optimizer, "grad_partitions_flat_buffer", None)
    if flat is not None:
        return [flat]
    averaged = getattr(zero_optimizer, "averaged_gradients", None)
    if averaged and not getattr(zero_optimizer, "cpu_offload", False):
        groups = averaged.values() if isinstance(averaged, dict) else averaged
        return [g for grads in groups if grads for g in grads if g is not None]
    return None


class StepGuard:
    def __init__(self, max_bad_steps: int, check_gradients: bool = True):
        self.max_bad_steps = max_bad_steps
        self.check_gradients = check_gradients  # off under fp16 loss scaling, whose scaler skips inf steps itself
        self.skipped = 0
        self.consecutive = 0
        self._bad_loss: torch.Tensor | bool = False  # a device flag: no host sync per micro-batch
        self._example_ids: list[torch.Tensor] = []
        self._grad_norm: torch.Tensor | None = None
        self._warned = False
        self._stepped = False  # a guarded step ran for the current optimiser step
        self._distributed_any = None

    def observe(self, loss: torch.Tensor, example_ids: torch.Tensor | None) -> None:
        """A micro-batch's loss, before its backward (DeepSpeed steps inside `backward`), and its examples."""
        if example_ids is not None:
            self._example_ids.append(example_ids.detach())
        self._bad_loss = ~torch.isfinite(loss.detach()).all() | self._bad_loss

    def note_grad_norm(self, norm) -> None:
        """The step's total gradient norm, as the Trainer's clipping computed it (over all processes): the
        gradient check then costs nothing more."""
        self._grad_norm = norm

    def wrap(self, optimizer, local_gradients, distributed_any=None, zero_grad=None):
        """Make `optimizer.step` skip bad steps.

        `local_gradients()`: this process's gradients (its shards under FSDP2 / ZeRO); `distributed_any(flag)`:
        the flag over all processes; `zero_grad`: how to drop a skipped step's gradients (default: the
        optimiser's own). Wrap the step that updates every parameter at once: ZeRO calls its inner optimiser
        once per parameter group, so that one must not be wrapped.
        """
        original_step = optimizer.step
        self._distributed_any = distributed_any

        def guarded_step(*args, **kwargs):
            if self.step_is_bad(local_gradients):
                (zero_grad or optimizer.zero_grad)(set_to_none=True)
                return None
            return original_step(*args, **kwargs)

        optimizer.step = guarded_step
        return optimizer

    def wrap_zero_optimizer(self, zero_optimizer, distributed_any=None):
        """DeepSpeed: decide in the ZeRO optimiser's step (the one that updates every parameter, which the
        engine calls inside accelerate's `backward`), and skip a bad step through DeepSpeed's own overflow
        path, as for an fp16 overflow: its gradients, buffers, micro-step count and loss scale are handled by
        DeepSpeed, the engine counts the step skipped and the learning-rate schedule does not advance.
        """
        if not hasattr(zero_optimizer, "_update_scale"):  # no overflow path to take: skip the step here
            return self.wrap(zero_optimizer, lambda: deepspeed_local_gradients(zero_optimizer), distributed_any)
        original_step, original_update_scale = zero_optimizer.step, zero_optimizer._update_scale
        self._distributed_any = distributed_any
        forced = [False]

        def update_scale(has_overflow=False):
            if forced[0]:
                zero_optimizer.overflow = has_overflow = True
            return original_update_scale(has_overflow)

        def guarded_step(*args, **kwargs):
            forced[0] = self.step_is_bad(lambda: deepspeed_local_gradients(zero_optimizer))
            zero_optimizer.overflow = False  # a forced overflow must not outlive its step (bf16 never resets it)
            try:
                return original_step(*args, **kwargs)
            finally:
                flat = getattr(zero_optimizer, "grad_partitions_flat_buffer", None)
                if forced[0] and flat is not None:  # slots no parameter overwrites next step stay NaN otherwise
                    flat.zero_()
                forced[0] = False

        zero_optimizer._update_scale = update_scale
        zero_optimizer.step = guarded_step
        return zero_optimizer

    def step_is_bad(self, local_gradients) -> bool:
        """Decide the current optimiser step (the same on every process), and count it if bad."""
        self._stepped = True
        bad = torch.as_tensor(self._bad_loss)
        norm, self._grad_norm = self._grad_norm, None
        if self.check_gradients:
            if norm is not None:  # this process's part of the total norm (a partial DTensor under FSDP2)
                finite = torch.isfinite(torch.as_tensor(_local(norm))).all()
            else:
                local = local_gradients()
                finite = all_finite(local) if local is not None else torch.tensor(True)
            bad = bad.to(finite.device) | ~finite
        bad = bool(self._distributed_any(bad)) if self._distributed_any is not None else bool(bad)
        ids, self._example_ids, self._bad_loss = self._example_ids, [], False
        if bad:
            self._skip(ids)
            return True
        self.consecutive = 0
        return False

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
        bad = torch.as_tensor(self._bad_loss)
        bad = bool(self._distributed_any(bad)) if self._distributed_any is not None else bool(bad)
        ids, self._example_ids, self._bad_loss = self._example_ids, [], False
        if bad:
            self._skip(ids)

    def _skip(self, example_ids: list[torch.Tensor]) -> None:
        example_ids = [int(i) for ids in example_ids for i in ids.reshape(-1).tolist()]
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

    def __init__(self, guard: StepGuard, on_step_decided=None):
        self.guard = guard
        # `on_step_decided(skipped)`: told, before the Trainer's learning-rate step, whether the guard skipped
        # this optimiser step (the Trainer advances the schedule only for a step accelerate reports taken).
        self._on_step_decided = on_step_decided
        self._skipped_before = 0

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.guard.end_step()
        skipped, self._skipped_before = self.guard.skipped > self._skipped_before, self.guard.skipped
        if self._on_step_decided is not None:
            self._on_step_decided(skipped)
