"""`LikelihoodProbe`: the probe (`probe.py`) run inside any Trainer, the plugin's or Axolotl's DPO family.

Added by the plugin when a config sets `bnf_compare_probe: true` (`BNFPlugin.add_callbacks_post_trainer`),
whatever `rl:` says. It scores the probe pairs with the initial policy when training begins (saved to
OUTPUT_DIR/probe_baseline.pt, so a resumed run keeps the true start), then at the end of every optimiser
step at which the Trainer logs, evaluates or saves, and at the end of each epoch and of training. A step's
scores are taken after its optimiser update, which is what a checkpoint saved at that step holds: the probe
at step N *is* a scoring of checkpoint-N (tests/test_compare.py checks it against full-logits scoring).

Every process scores (a sharded model needs all of them in its forwards); process zero writes
OUTPUT_DIR/probe_examples.jsonl (the token ids of the probe's responses, and where each prompt ends) and
OUTPUT_DIR/probe_log.jsonl, one record per scoring, and at the end a summary record with the run's time and
peak memory: CUDA `torch.cuda.max_memory_allocated` read at every step end (before Axolotl's logging resets
the counter, so it is the peak over all steps), else the process's peak resident set size (`ru_maxrss`, which
includes loading). The time per step excludes the probe's own scoring time, which is recorded.
"""
from __future__ import annotations

import json
import os
import resource
import time

import torch
from transformers import TrainerCallback

from ..model_io import resharded_after_each_forward
from .probe import PROBE_BASELINE_FILE, PROBE_EXAMPLES_FILE, PROBE_LOG_FILE, ProbeScores, probe_metrics, score_probe


class LikelihoodProbe(TrainerCallback):
    def __init__(self, cfg, trainer):
        self.cfg = cfg
        self.trainer = trainer
        self.examples: list[dict] | None = None
        self.source = None
        self.start: ProbeScores | None = None
        self.scored_step = -1
        self.probe_seconds = 0.0
        self.peak_cuda = 0
        self.native_eval_accuracy = None

    # --------------------------------------------------------------------------------- scoring
    def _setup(self, model) -> None:
        from axolotl.loaders import load_tokenizer

        from ..data.collator import ResponseBatchCollator
        from .probe_set import probe_examples
        from ..trainer import output_vocab_size

        tokenizer = load_tokenizer(self.cfg)
        self.source, self.examples = probe_examples(self.cfg, tokenizer)
        self.collator = ResponseBatchCollator(tokenizer, vocab_size=output_vocab_size(model))

    def _score(self, args, model) -> ProbeScores:
        began = time.perf_counter()
        with resharded_after_each_forward(model):  # no backward follows to reshard an FSDP2 unit kept gathered
            scores = score_probe(model, self.examples, self.collator, args.per_device_eval_batch_size, args.device,
                                 chunk_size=self.cfg.get("bnf_loss_chunk_size"),
                                 impl=self.cfg.get("bnf_kernel_impl") or "auto")
        self.probe_seconds += time.perf_counter() - began
        return scores

    def _record(self, args, state, model, scores: ProbeScores | None = None) -> None:
        if state.global_step == self.scored_step:
            return
        self.scored_step = state.global_step
        metrics = probe_metrics(scores if scores is not None else self._score(args, model), self.start)
        self._write(args, state, {"step": state.global_step, **metrics})

    def _write(self, args, state, record: dict) -> None:
        if state.is_world_process_zero:
            with open(os.path.join(args.output_dir, PROBE_LOG_FILE), "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    # --------------------------------------------------------------------------------- Trainer events
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._setup(model)
        os.makedirs(args.output_dir, exist_ok=True)
        baseline = os.path.join(args.output_dir, PROBE_BASELINE_FILE)
        now = None
        if state.global_step > 0 and os.path.exists(baseline):  # resumed: the saved initial-policy scores
            self.start = ProbeScores(**torch.load(baseline))
        else:
            self.start = now = self._score(args, model)
            if state.is_world_process_zero:
                torch.save(self.start.state_dict(), baseline)
        if state.is_world_process_zero and state.global_step == 0:
            with open(os.path.join(args.output_dir, PROBE_LOG_FILE), "w", encoding="utf-8") as f:
                f.write(json.dumps({"probe_source": self.source, "pairs": len(self.examples)}) + "\n")
            # The token sequences scored, so that anyone can score a checkpoint the same way without this package.
            with open(os.path.join(args.output_dir, PROBE_EXAMPLES_FILE), "w", encoding="utf-8") as f:
                f.writelines(json.dumps({k: example[k] for k in ("response_input_ids", "response_prompt_len",
                                                                 "response_sign")}) + "\n" for example in self.examples)
        self._record(args, state, model, now)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if torch.cuda.is_available():
            self.peak_cuda = max(self.peak_cuda, torch.cuda.max_memory_allocated())
        if control.should_log or control.should_save or control.should_evaluate or control.should_training_stop:
            self._record(args, state, model)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        self._record(args, state, model)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "eval_rewards/accuracies" in logs:
            self.native_eval_accuracy = float(logs["eval_rewards/accuracies"])
        if "train_runtime" in logs:
            self._write(args, state, self._summary(float(logs["train_runtime"]), state.global_step))

    def _summary(self, runtime: float, steps: int) -> dict:
        if torch.cuda.is_available():
            memory = {"peak_memory_MiB": round(max(self.peak_cuda, torch.cuda.max_memory_allocated()) / 2**20, 1),
                      "peak_memory_kind": "cuda max_memory_allocated"}
        else:  # Linux reports ru_maxrss in KiB
            memory = {"peak_memory_MiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                      "peak_memory_kind": "cpu peak rss"}
        return {"summary": True, "steps": steps, "train_runtime": runtime, "probe_seconds": round(self.probe_seconds, 3),
                "seconds_per_step": (runtime - self.probe_seconds) / max(steps, 1),
                "native_eval_rewards_accuracy": self.native_eval_accuracy, **memory}
