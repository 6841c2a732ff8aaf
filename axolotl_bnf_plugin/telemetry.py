"""What the alignment is doing: likelihood shifts, likelihood displacement, memory, and the method card.

The BNF paper's central claim is about how the log-likelihoods of preferred and dispreferred responses
move during training: DPO-style losses tend to push the chosen likelihood down along with the rejected
one ("likelihood displacement"), BNF's bounded feedback should not. These metrics let a user watch it.
"""
from __future__ import annotations

import torch

from .kernels.schedule import block_bytes, default_chunk_size, element_bytes
from .methods.common import Metrics


# A response "went down" when its mean log-prob fell by more than a tolerance (nats per token): two scorings
# of the same weights in differently laid out batches (padded, packed, another micro-batch size) differ by the
# rounding of the model's compute dtype, which must not count as a fall. fp32: 1e-4; half precision: a few
# units of its rounding (bf16 0.031, fp16 0.0039), above the layout noise of a bf16 forward.
DOWN_TOLERANCE = 1e-4


def down_tolerance(compute_dtype: torch.dtype | None = None) -> float:
    """The shift below which a response does not count as having gone down, for the model's compute dtype."""
    if compute_dtype is None or not compute_dtype.is_floating_point:
        return DOWN_TOLERANCE
    return max(DOWN_TOLERANCE, 4 * torch.finfo(compute_dtype).eps)


def shift_metrics(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, sign: torch.Tensor,
                  compute_dtype: torch.dtype | None = None) -> Metrics:
    """Per response, the mean per-token log-prob now minus at the start of training; averaged over
    chosen and over rejected responses, plus the fraction of chosen responses whose likelihood fell (by more
    than `down_tolerance(compute_dtype)`).

    `logp`, `ref_logp` (the initial policy's), `mask`: `[B, T]`; `sign`: `[B]`. Rows without scored tokens are left out.
    """
    scored = mask.bool()
    lengths = scored.sum(1)
    delta = torch.where(scored, logp.detach().float() - ref_logp.detach().float(), torch.zeros_like(logp, dtype=torch.float32))
    per_response = delta.sum(1) / lengths.clamp(min=1)
    nonempty = lengths > 0
    chosen, rejected = nonempty & (sign > 0), nonempty & (sign < 0)
    metrics = Metrics()
    metrics.add_mean("shift/chosen", per_response, chosen)
    metrics.add_mean("shift/rejected", per_response, rejected)
    metrics.add_mean("shift/chosen_down_frac", (per_response < -down_tolerance(compute_dtype)).float(), chosen)
    return metrics


class DisplacementMonitor:
    """Warn once when the chosen likelihood has fallen for `patience` consecutive logging steps."""

    def __init__(self, patience: int):
        self.patience = patience
        self.previous: float | None = None
        self.falling = 0
        self.start: float | None = None
        self.warned = False

    def update(self, shift_chosen: float) -> str | None:
        """Feed the logged `shift/chosen`; returns the warning text the first time it is due."""
        if self.previous is not None and shift_chosen < self.previous:
            self.falling += 1
        else:
            self.falling, self.start = 0, shift_chosen
        self.previous = shift_chosen
        if self.falling >= self.patience and not self.warned:
            self.warned = True
            return (
                f"likelihood displacement: the chosen responses' log-likelihood has fallen for {self.falling} "
                f"consecutive logging steps (shift/chosen {self.start:+.4f} -> {shift_chosen:+.4f} per token). "
                "The model is learning to prefer chosen over rejected by pushing both down; consider a lower "
                "learning rate or more positive (SFT) data."
            )
        return None


def preflight(tokens_per_step: int, vocab_size: int, dtype: torch.dtype, with_reference: bool,
              chunk_size: int | None = None, impl: str = "torch", device_type: str = "cuda",
              hidden_size: int = 0) -> dict[str, int]:
    """Bytes of the `[tokens, vocab]` logits a logits-materialising trainer would hold for one micro-batch
    (policy, and reference when the method has one), against the fused op's one `[chunk, V]` block as the
    implementation `impl` ("torch" / "triton") allocates it (`hidden_size` > 0: the head is trained, as
    `kernels.default_chunk_size` takes it)."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size} (a partitioned weight's local shape?)")
    chunk = chunk_size or default_chunk_size(vocab_size, dtype, impl=impl, device_type=device_type,
                                             hidden_size=hidden_size)
    full = tokens_per_step * vocab_size * element_bytes(dtype)
    workspace = block_bytes(min(chunk, tokens_per_step), vocab_size, dtype, impl, device_type)
    return {
        "memory/preflight_full_logits_bytes": full * (2 if with_reference else 1),
        "memory/preflight_fused_workspace_bytes": workspace,
        "memory/preflight_chunk_rows": chunk,
    }


def preflight_text(preflight_bytes: dict[str, int], pairs: int, seq_len: int) -> str:
    """The pre-flight as one log line (`preflight_bytes`: what `preflight` returned)."""
    p = preflight_bytes
    return (f"memory pre-flight per micro-batch (up to {pairs} pairs x {seq_len} tokens): full logits would take "
            f"{p['memory/preflight_full_logits_bytes'] / 2**30:.2f} GiB; the fused op holds one block of "
            f"{p['memory/preflight_chunk_rows']} rows, {p['memory/preflight_fused_workspace_bytes'] / 2**20:.0f} MiB")


class PhaseMemory:
    """Memory at the end of each phase of a training step, and the allocator's peak, read-only.

    CUDA: `memory/allocated_{phase}_MiB` is the allocator's live bytes when the phase ends (the largest
    over the logging window), `memory/peak_allocated_MiB` its peak since its counters were last reset.
    The peak counters are global and belong to Axolotl: its trainer's `log` reports them
    (`memory/max_active`, `memory/max_allocated` from `utils/bench.py`) and resets them itself, so
    they cover each logging window. A per-phase peak would need a reset at every phase start, which would
    leave Axolotl reporting the last phase only; this class never resets any counter.
    CPU: `memory/rss_{phase}_MiB`, the resident set size when the phase ends (largest over the window).
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.at_end: dict[str, float] = {}

    def end(self, phase: str) -> None:
        value = torch.cuda.memory_allocated(self.device) if self.cuda else _rss_bytes()
        self.at_end[phase] = max(self.at_end.get(phase, 0), value)

    def metrics(self) -> dict[str, float]:
        unit = "allocated" if self.cuda else "rss"
        out = {f"memory/{unit}_{phase}_MiB": round(v / 2**20, 1) for phase, v in self.at_end.items()}
        if self.cuda:
            out["memory/peak_allocated_MiB"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
        self.at_end.clear()
        return out


def _rss_bytes() -> int:
    try:
        import resource

        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except (OSError, ValueError, ImportError):
        return 0


def method_card(settings, reference: str, shift_metrics: str, packing: bool) -> str:
    """The few lines printed once at the start of training (`settings`: a `step_loss.LossSettings`)."""
    method = settings.method
    if not method.needs_ref_logps:
        reference = "none (reference-free)"
    lines = ["=" * 78, method.paper, "  " + method.formula, f"  {method.describe()} | reference: {reference}",
             f"  fused log-prob op: impl={settings.impl}, chunk rows={settings.chunk_size or 'auto'} | "
             f"sample packing: {'on' if packing else 'off'} | shift metrics: {shift_metrics}",
             "=" * 78]
    return "\n".join(lines)
