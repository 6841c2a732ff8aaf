"""`ModelEvaluation`: verifier scores of generations and retention, in any Trainer, logged as `eval_verifier/*`
and `eval_retention/*`.

Added by the plugin when a config sets `bnf_verifiers` or `bnf_retention_datasets`, whatever `rl:` says
(the plugin's methods and Axolotl's DPO family alike). It evaluates when training begins (the initial policy:
every curve starts from its baseline), at every step the Trainer evaluates (`eval_steps` / `evals_per_epoch`),
and at the end of training. A step's evaluation comes after its optimiser update: what a checkpoint saved at
that step holds.

Verifiers: the prompts of the first `bnf_verifier_size` usable rows of `bnf_verifier_datasets` (else
`test_datasets`), held out from training. Each process generates for its share of them (every process the
same number of batches, so the forwards of a sharded model stay in step), scores its completions with every
verifier, and all processes then share the results: they log the same numbers, and process zero writes
OUTPUT_DIR/evaluation_log.jsonl (one record per evaluation) and OUTPUT_DIR/verifier_completions.jsonl (every
completion with its scores). Greedy completions do not depend on how the prompts are split; sampled ones
(`bnf_verifier_samples`) are drawn from a seed of the config's `seed`, the step, the process and the batch, on a
forked random state (training's own random stream is left as it was).
"""
from __future__ import annotations

import json
import logging
import math
import os
import time

import torch
from transformers import Trainer, TrainerCallback

from .generate import end_of_turn_ids, generate_batch
from .retention import retention_logp
from .verifiers import VerifierConfigError, call_verifier, load_verifier

EVALUATION_LOG_FILE = "evaluation_log.jsonl"
COMPLETIONS_FILE = "verifier_completions.jsonl"
BASELINE_FILE = "evaluation_baseline.json"
VERIFIER, RETENTION = "eval_verifier/", "eval_retention/"
LOG = logging.getLogger(__name__)


def _processes() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _gather(obj) -> list:
    rank, world = _processes()
    if world == 1:
        return [obj]
    out = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _binary(values: list[float]) -> bool:
    return bool(values) and all(v in (0.0, 1.0) for v in values)


class ModelEvaluation(TrainerCallback):
    def __init__(self, cfg, trainer):
        self.cfg, self.trainer = cfg, trainer
        self.verifiers = [(name.rpartition(".")[2], load_verifier(name)) for name in (cfg.get("bnf_verifiers") or [])]
        names = [name for name, _ in self.verifiers]
        if len(set(names)) != len(names):
            raise VerifierConfigError(f"bnf_verifiers: two functions share a name ({names}); their metrics would clash")
        self.retention_start: float | None = None
        self.evaluated_step = -1
        self.prompts: list[list[int]] = []
        self.warned: set[str] = set()

    # --------------------------------------------------------------------------------- the sets
    def _setup(self, model) -> None:
        from axolotl.loaders import load_tokenizer
        from axolotl.utils.dict import DictDefault

        from ..data.collator import ResponseBatchCollator
        from ..data.loader import examples_with_rows
        from ..trainer import output_vocab_size

        self.tokenizer = tokenizer = load_tokenizer(self.cfg)
        unpacked = DictDefault({**self.cfg, "sample_packing": False})
        if self.verifiers:
            entries = self.cfg.get("bnf_verifier_datasets") or self.cfg.get("bnf_test_datasets")
            if not entries:
                raise VerifierConfigError("bnf_verifiers: no held-out prompts: set `bnf_verifier_datasets:` (or "
                                          "`test_datasets:`), data set entries as under `datasets:`")
            rows = examples_with_rows(unpacked, tokenizer, list(entries), "test", self.cfg.get("bnf_verifier_size") or 64)
            if not rows:
                raise VerifierConfigError("bnf_verifiers: the held-out data sets have no usable rows")
            self.prompts = [list(ex["response_input_ids"][0][:ex["response_prompt_len"][0]]) for ex, _ in rows]
            self.prompt_texts = [tokenizer.decode(p) for p in self.prompts]
            keys = sorted({key for _, row in rows for key in row})
            self.columns = {key: [row.get(key) for _, row in rows] for key in keys}
            self.stop_ids = end_of_turn_ids(model, tokenizer, [ex for ex, _ in rows])
            self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        if self.cfg.get("bnf_retention_datasets"):
            rows = examples_with_rows(unpacked, tokenizer, list(self.cfg["bnf_retention_datasets"]), "test",
                                      self.cfg.get("bnf_retention_size") or 256)
            if not rows:
                raise VerifierConfigError("bnf_retention_datasets: no usable rows")
            columns = ("response_input_ids", "response_prompt_len", "response_sign", "is_pair")
            self.retention_examples = [{k: example[k] for k in columns} for example, _ in rows]
            self.collator = ResponseBatchCollator(tokenizer, vocab_size=output_vocab_size(model))

    # --------------------------------------------------------------------------------- verifiers
    def _generate_own(self, args, state, model) -> list[dict]:
        rank, world = _processes()
        own = list(range(rank, len(self.prompts), world))
        per_process, batch = math.ceil(len(self.prompts) / world), max(1, args.per_device_eval_batch_size)
        padded = own + [own[0] if own else 0] * (per_process - len(own))  # equal batches everywhere; copies dropped
        samples = int(self.cfg.get("bnf_verifier_samples") or 0)
        options = dict(pad_id=self.pad_id, stop_ids=self.stop_ids, synced=world > 1, device=args.device,
                       max_new_tokens=int(self.cfg.get("bnf_verifier_max_new_tokens") or 256))
        records = []
        for b, start in enumerate(range(0, per_process, batch)):
            index = padded[start:start + batch]
            prompts = [self.prompts[i] for i in index]
            greedy = generate_batch(model, prompts, **options)
            sampled = [[] for _ in index]
            if samples:
                devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(hash((int(self.cfg.get("seed") or 0), state.global_step, rank, b)) % 2**63)
                    sampled = generate_batch(model, prompts, samples=samples,
                                             temperature=float(self.cfg.get("bnf_verifier_temperature") or 1.0),
                                             **options)
            records += [{"index": i, "greedy": g[0], "samples": s}
                        for j, (i, g, s) in enumerate(zip(index, greedy, sampled)) if start + j < len(own)]
        return records

    def _score(self, records: list[dict], key: str) -> None:
        """Each record's completions under `key` scored by every verifier (in place)."""
        items = [(r, c) for r in records for c in ([r["greedy"]] if key == "greedy" else r["samples"])]
        if not items:
            return
        texts = [self.tokenizer.decode(c, skip_special_tokens=True) for _, c in items]
        prompts, completions = self._as_trl([r["index"] for r, _ in items], texts)
        columns = {k: [v[r["index"]] for r, _ in items] for k, v in self.columns.items() if k != "prompt"}
        columns.update(completion_ids=[list(c) for _, c in items], trainer_state=self.trainer.state)
        for name, function in self.verifiers:
            scores = call_verifier(function, prompts, completions, columns)
            for (record, _), value in zip(items, scores.values):
                record.setdefault(f"{key}_scores", {}).setdefault(name, []).append(value)
            counts = records[0].setdefault(f"{key}_errors", {})
            counts[name] = counts.get(name, 0) + scores.errors
            if scores.errors:
                records[0].setdefault("error_messages", {}).setdefault(name, scores.error_messages[:1])
        for (record, _), text in zip(items, texts):
            record.setdefault(f"{key}_texts", []).append(text)

    def _as_trl(self, indices: list[int], texts: list[str]) -> tuple[list, list]:
        """(prompts, completions) as TRL's GRPO trainer gives them to reward functions: the row's own `prompt`
        column when it has one (a string, or a message list: conversational data, whose completions are then
        `[{"role": "assistant", "content": text}]`), else the rendered prompt the model saw, and text."""
        raw = self.columns.get("prompt")
        prompts = [raw[i] if raw is not None and raw[i] is not None else self.prompt_texts[i] for i in indices]
        conversational = [isinstance(p, list) for p in prompts]
        completions = [[{"role": "assistant", "content": t}] if chat else t for t, chat in zip(texts, conversational)]
        return prompts, completions

    def _verify(self, args, state, model) -> tuple[dict, list[dict]]:
        records = self._generate_own(args, state, model)
        self._score(records, "greedy")
        self._score(records, "samples")
        records = sorted((r for part in _gather(records) for r in part), key=lambda r: r["index"])
        metrics = {VERIFIER + "completion_tokens": _mean([len(r["greedy"]) for r in records]),
                   VERIFIER + "truncated": _mean([float(not r["greedy"] or r["greedy"][-1] not in self.stop_ids)
                                                  for r in records])}
        for name, _ in self.verifiers:
            scores = [s for r in records for s in r.get("greedy_scores", {}).get(name, [])]
            scored = [s for s in scores if s is not None]
            errors = sum(r.get("greedy_errors", {}).get(name, 0) for r in records)
            metrics[VERIFIER + name] = _mean(scored)
            if _binary(scored):
                metrics[VERIFIER + name + "_pass_rate"] = _mean(scored)
            metrics[VERIFIER + name + "_errors"] = errors
            metrics[VERIFIER + name + "_unscored"] = len(scores) - len(scored) - errors
            sampled = [[s for s in r.get("samples_scores", {}).get(name, []) if s is not None] for r in records]
            flat = [s for per in sampled for s in per]
            if any(r["samples"] for r in records):
                metrics[VERIFIER + name + "_sampled"] = _mean(flat)
                metrics[VERIFIER + name + "_sampled_errors"] = sum(r.get("samples_errors", {}).get(name, 0)
                                                                   for r in records)
                if _binary(flat):
                    metrics[VERIFIER + name + "_pass_at_n"] = _mean([float(any(s == 1.0 for s in per)) for per in sampled])
            messages = [m for r in records for m in r.get("error_messages", {}).get(name, [])]
            if messages and name not in self.warned:
                self.warned.add(name)
                LOG.warning("verifier %s failed on a completion (counted in %s%s_errors / _sampled_errors, not "
                            "scored); first: %s", name, VERIFIER, name, messages[0])
        return metrics, records

    # --------------------------------------------------------------------------------- retention
    def _retention(self, args, model) -> dict:
        logp, tokens = retention_logp(model, self.retention_examples, self.collator, args.per_device_eval_batch_size,
                                      args.device, chunk_size=self.cfg.get("bnf_loss_chunk_size"),
                                      impl=self.cfg.get("bnf_kernel_impl") or "auto")
        if self.retention_start is None:
            self.retention_start = logp
        return {RETENTION + "logp": logp, RETENTION + "change": logp - self.retention_start, RETENTION + "tokens": tokens}

    # --------------------------------------------------------------------------------- one evaluation
    def _evaluate(self, args, state, model) -> None:
        if state.global_step == self.evaluated_step:
            return
        self.evaluated_step = state.global_step
        began, metrics, records = time.perf_counter(), {}, []
        if self.verifiers:
            metrics, records = self._verify(args, state, model)
            metrics[VERIFIER + "seconds"] = round(time.perf_counter() - began, 3)
        if self.cfg.get("bnf_retention_datasets"):
            metrics.update(self._retention(args, model))
        if state.is_world_process_zero:
            with open(os.path.join(args.output_dir, EVALUATION_LOG_FILE), "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": state.global_step, **metrics}) + "\n")
            with open(os.path.join(args.output_dir, COMPLETIONS_FILE), "a", encoding="utf-8") as f:
                f.writelines(json.dumps({"step": state.global_step, "index": r["index"], "completion": r["greedy_texts"][0],
                                         "scores": {k: v[0] for k, v in r.get("greedy_scores", {}).items()},
                                         "samples": r.get("samples_texts", []),
                                         "sample_scores": r.get("samples_scores", {})}) + "\n" for r in records)
        # transformers' own `log` (a trainer subclass's would fold its windowed training metrics into this
        # record: TRL's DPO trainer does), and the Trainer's own logging decision for this step kept: its
        # callbacks' `on_log` clears `should_log`, which would drop the step's training log.
        should_log = self.trainer.control.should_log
        Trainer.log(self.trainer, dict(metrics))
        self.trainer.control.should_log = should_log

    # --------------------------------------------------------------------------------- Trainer events
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._setup(model)
        os.makedirs(args.output_dir, exist_ok=True)
        if state.is_world_process_zero:  # a fresh run starts its files; a resumed one keeps its steps so far
            for name in (EVALUATION_LOG_FILE, COMPLETIONS_FILE):
                path = os.path.join(args.output_dir, name)
                kept = []
                if state.global_step > 0 and os.path.exists(path):
                    with open(path, encoding="utf-8") as f:
                        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= state.global_step]
                with open(path, "w", encoding="utf-8") as f:
                    f.writelines(kept)
        if self.verifiers and str(getattr(args.eval_strategy, "value", args.eval_strategy)) == "no":
            LOG.warning("bnf_verifiers: this run does not evaluate (no eval set, or eval_strategy: no): the verifiers "
                        "score the start and the end of training only")
        baseline = os.path.join(args.output_dir, BASELINE_FILE)
        if state.global_step > 0 and os.path.exists(baseline):  # resumed: the start is the first run's
            with open(baseline, encoding="utf-8") as f:
                self.retention_start = json.load(f).get("retention_logp")
            return
        self._evaluate(args, state, model)
        if state.is_world_process_zero:
            with open(baseline, "w", encoding="utf-8") as f:
                json.dump({"retention_logp": self.retention_start}, f)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if control.should_evaluate or control.should_training_stop:
            self._evaluate(args, state, model)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if control.should_evaluate or control.should_training_stop:
            self._evaluate(args, state, model)
