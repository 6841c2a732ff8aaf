"""One optimiser step of each method on a model with real layer shapes: seconds per step and peak memory.

    python benchmarks/train_step_bench.py --jsonl train_step.jsonl        # GPU: Llama-3-8B, then Qwen2.5-7B shapes
    python benchmarks/train_step_bench.py --models qwen2.5-7b --layers 4 --pairs 2
    python benchmarks/train_step_bench.py --smoke                         # tiny shapes, every case, CPU, < 1 min
    python benchmarks/train_step_bench.py --table-from train_step.jsonl   # the markdown table of measured rows

The model is built locally (no download) from a transformers config with the layer shapes of a real model
and only `--layers` decoder layers (default 2), random weights, bf16 on a GPU (fp32 on a CPU),
`attn_implementation="sdpa"`:
- `llama3-8b`: `LlamaConfig`, hidden 4096, intermediate 14336, 32 heads, 8 KV heads, vocab 128256, untied head;
- `qwen2.5-7b`: `Qwen2Config` (bias on q, k, v), hidden 3584, intermediate 18944, 28 heads, 4 KV heads,
  vocab 152064, untied head.
The vocabulary projection is full size, so the head's share of the step is what it is at scale; the
decoder's share is `layers` / 32 (Llama) or / 28 (Qwen) of the full model's.

The batch: `--pairs` preference pairs, each a random prompt of `--prompt-len` tokens with a chosen and a
rejected response of `--response-len` tokens, as the plugin's data pipeline stores them (one example per
pair, both responses carrying the prompt), batched by the plugin's `ResponseBatchCollator`:
- unpacked: one row per response (2 * pairs rows of prompt + response tokens, no padding);
- packed: the examples packed into bins as the plugin's sampler does under `sample_packing: true`
  (`data.packing`: bins of `micro_batch_size * sequence_len` tokens, sequence_len bounding a whole example),
  here one row of every token; the position ids restart at every response and sdpa keeps them apart.

Cases: model x {full fine-tuning, LoRA} x {unpacked, packed} x method.
- full: every parameter trained, `torch.optim.AdamW` (its state in the weights' dtype);
- LoRA (peft): r 16, alpha 32 on q, k, v, o, gate, up, down projections; embeddings and head frozen; AdamW.
Methods, all on the same batch:
- `bnf`: `step_loss.batch_loss` with BNF (its gradient rule: the fused op builds the gradient in the
  forward pass, one logits pass), live reference from `initial_policy.live_reference` (full: a frozen copy;
  LoRA: the policy with its adapter disabled);
- `bnf-two-pass`: the same loss with the gradient rule removed (a BNF whose `grad_rule` is None: the op
  computes the logits again in backward);
- `bnf-precomputed`: BNF single pass on a batch carrying the initial policy's log-probs (`ref_logps`, scored
  once before the timed steps as `bnf_precompute_ref` does: `reference.initial_policy_logps`); no reference
  model is held and no reference forward runs;
- `asft`: `batch_loss` with ASFT (reference-free; single pass over whole responses: a response longer
  than a block takes the two-pass op);
- `dpo-naive`: DPO written plainly: `model(...).logits` over every position, fp32 `log_softmax`, `gather`,
  summed per response, sigmoid loss (beta 0.1) against a frozen reference's log-probs computed the same
  way under `no_grad` (full: a frozen copy; LoRA: the adapter disabled, as TRL does).

Each case builds a fresh model, runs `--warmup` optimiser steps, then `--steps` timed ones (zero_grad,
loss, backward, optimizer.step; CUDA-synchronised before and after each) and records the median seconds
per step, tokens per second (every non-padding token of the batch), the memory allocated before the timed
steps (weights, a reference copy, AdamW state: `static`) and `torch.cuda.max_memory_allocated` over the
timed steps, after a reset (`peak`). On a CPU the memory columns are the process's resident set instead
(sampled), which only shows that the step ran. A case that runs out of memory is recorded as OOM and the
next one runs; one that fails records its error. `--jsonl` appends each row as soon as it is measured.
"""
from __future__ import annotations

import argparse
import copy
import gc
import importlib.metadata
import json
import math
import os
import platform
import resource
import statistics
import sys
import threading
import time
import traceback
from types import SimpleNamespace

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
MiB = 2**20

# Layer shapes of the real models (their depth is --layers).
MODELS = {
    "llama3-8b": dict(config="LlamaConfig", model="LlamaForCausalLM", label="Llama-3-8B", hidden_size=4096,
                      intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      full_layers=32),
    "qwen2.5-7b": dict(config="Qwen2Config", model="Qwen2ForCausalLM", label="Qwen2.5-7B", hidden_size=3584,
                       intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                       full_layers=28),
}
# --smoke: the same architectures, tiny.
SMOKE_SHAPES = {
    "llama3-8b": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=1000),
    "qwen2.5-7b": dict(hidden_size=48, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                       vocab_size=1100),
}
METHODS = {
    "bnf": "BNF single pass",
    "bnf-two-pass": "BNF two-pass",
    "bnf-precomputed": "BNF, precomputed reference",
    "asft": "ASFT",
    "dpo-naive": "naive DPO (full logits)",
}
TUNINGS = ("full", "lora")
LAYOUTS = ("unpacked", "packed")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DPO_BETA = 0.1


# ------------------------------------------------------------------------------------------------ model
def model_shape(name: str, smoke: bool) -> dict:
    spec = dict(MODELS[name])
    if smoke:
        spec.update(SMOKE_SHAPES[name])
    return spec


def build_model(name: str, layers: int, device, dtype, seed: int = 0, smoke: bool = False):
    """A randomly initialised causal LM with `name`'s layer shapes and `layers` layers, on `device`."""
    import transformers

    spec = model_shape(name, smoke)
    config = getattr(transformers, spec["config"])(
        hidden_size=spec["hidden_size"], intermediate_size=spec["intermediate_size"],
        num_attention_heads=spec["num_attention_heads"], num_key_value_heads=spec["num_key_value_heads"],
        vocab_size=spec["vocab_size"], num_hidden_layers=layers, tie_word_embeddings=False,
        max_position_embeddings=32768, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    with torch.device(device):
        model = getattr(transformers, spec["model"])._from_config(config, attn_implementation="sdpa", dtype=dtype)
    model = model.to(device=device, dtype=dtype)
    model.config.use_cache = False
    return model.train()


def add_lora(model, r: int = 16):
    """A fresh LoRA adapter (B = 0) on the attention and MLP projections; everything else frozen."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=LORA_TARGETS, bias="none",
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


# ------------------------------------------------------------------------------------------------- data
def make_examples(pairs: int, prompt_len: int, response_len: int, vocab: int, seed: int = 0) -> list[dict]:
    """Preference pairs as the plugin's data pipeline stores them (`data/examples.py`): one example per pair,
    both responses carrying the prompt, chosen (+1) first. Ids avoid the special ids 0-2."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(pairs):
        prompt = torch.randint(3, vocab, (prompt_len,), generator=g).tolist()
        chosen = torch.randint(3, vocab, (response_len,), generator=g).tolist()
        rejected = torch.randint(3, vocab, (response_len,), generator=g).tolist()
        examples.append({"response_input_ids": [prompt + chosen, prompt + rejected],
                         "response_prompt_len": [prompt_len, prompt_len], "response_sign": [1, -1],
                         "is_pair": True, "length": 2 * (prompt_len + response_len), "example_id": i})
    return examples


def _first_fit(lengths, capacity: int) -> list[list[int]]:
    bins, room = [], []
    for i, length in enumerate(lengths):
        for b, free in enumerate(room):
            if length <= free:
                bins[b].append(i)
                room[b] -= length
                break
        else:
            bins.append([i])
            room.append(capacity - length)
    return bins


def pack(examples: list[dict]) -> tuple[list[list[dict]], str]:
    """Bins of examples for one packed micro-batch, sized as the plugin's packing sampler sizes them with
    `micro_batch_size` = the number of pairs and `sequence_len` = one example's tokens (under packing,
    sequence_len bounds a whole example). Uses `data.packing` where it imports (it uses Axolotl's packer)."""
    lengths = [e["length"] for e in examples]
    try:
        from axolotl_bnf_plugin.data.packing import pack_bins, packing_shape

        capacity, _ = packing_shape(len(examples), max(lengths), real_batches=False)
        bins, how = pack_bins(lengths, capacity), "data.packing.pack_bins"
    except ImportError:  # no Axolotl here: first-fit on the data's order, into the same capacity
        bins, how = _first_fit(lengths, len(examples) * max(lengths)), "first-fit"
    return [[examples[i] for i in b] for b in bins], how


def collate(examples: list[dict], packed: bool, vocab: int) -> tuple[dict, str | None]:
    """The collated batch, and (packed) which packer made its bins."""
    from axolotl_bnf_plugin.data.collator import ResponseBatchCollator

    collator = ResponseBatchCollator(SimpleNamespace(pad_token_id=0, eos_token_id=2), vocab_size=vocab)
    if not packed:
        return collator(examples), None
    bins, how = pack(examples)
    return collator(bins), how


def with_ref_logps(model, examples: list[dict], vocab: int, device) -> list[dict]:
    """The examples plus the initial policy's log-probs of every scored token (`ref_logps`), scored as
    `bnf_precompute_ref` scores them before training (`reference.initial_policy_logps`)."""
    from axolotl_bnf_plugin.data.collator import REF_LOGPS, ResponseBatchCollator
    from axolotl_bnf_plugin.reference import initial_policy_logps

    collator = ResponseBatchCollator(SimpleNamespace(pad_token_id=0, eos_token_id=2), vocab_size=vocab)
    values = initial_policy_logps(model, examples, collator, batch_size=len(examples), device=device)
    return [{**e, REF_LOGPS: v} for e, v in zip(examples, values)]


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------- methods
def bnf_two_pass_method():
    """BNF without its gradient rule: `batch_loss` then runs the plain two-pass op."""
    from axolotl_bnf_plugin.methods.bnf import BNF

    cls = type("BNFTwoPass", (BNF,), {"grad_rule": None, "__doc__": "BNF on the two-pass op (no gradient rule)."})
    return cls()


def dpo_sequence_logps(model, batch) -> torch.Tensor:
    """`[responses]` summed label log-probs from the model's full logits (the naive path)."""
    kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    logits = model(**kwargs, use_cache=False).logits  # [rows, T, V]
    labels = batch["labels"][:, 1:]
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    token = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    scored = labels != IGNORE_INDEX
    response = batch["response_index"][:, 1:][scored]
    out = token.new_zeros(batch["sign"].shape[0])
    return out.index_add(0, response, token[scored])


def dpo_loss(policy_seq: torch.Tensor, ref_seq: torch.Tensor, batch, beta: float = DPO_BETA) -> torch.Tensor:
    """Sigmoid DPO over the batch's pairs (each pair's chosen and rejected responses share a pair id)."""
    pair_ids, sign = batch["pair_ids"], batch["sign"]
    chosen = (pair_ids >= 0) & (sign > 0)
    rejected = (pair_ids >= 0) & (sign < 0)
    if not torch.equal(pair_ids[chosen], pair_ids[rejected]):
        raise ValueError("dpo-naive expects each pair's chosen response before its rejected one")
    margin = (policy_seq[chosen] - ref_seq[chosen]) - (policy_seq[rejected] - ref_seq[rejected])
    return -F.logsigmoid(beta * margin).mean()


class Case:
    """Everything one (method, tuning, layout) step needs, built on a fresh model."""

    def __init__(self, model, method: str, examples: list[dict], packed: bool, vocab: int, device, lr: float,
                 optimizer: str = "adamw"):
        from axolotl_bnf_plugin.initial_policy import live_reference
        from axolotl_bnf_plugin.step_loss import LossSettings

        self.model, self.method = model, method
        self.lora = hasattr(model, "disable_adapter")
        self.reference = None
        self.reference_kind = "none"
        if method == "bnf-precomputed":
            examples = with_ref_logps(model, examples, vocab, device)
            self.reference_kind = "precomputed log-probs"
        batch, self.packer = collate(examples, packed, vocab)
        self.batch = to_device(batch, device)
        if method in ("bnf", "bnf-two-pass"):
            self.reference = live_reference(model)
            self.reference_kind = self.reference.description
        elif method == "dpo-naive":
            if self.lora:
                self.reference_kind = "the adapter disabled"
            else:
                self.reference = copy.deepcopy(model).eval().requires_grad_(False)
                self.reference_kind = "a frozen copy"
        if method != "dpo-naive":
            self.settings = LossSettings(bnf_two_pass_method() if method == "bnf-two-pass"
                                         else "asft" if method == "asft" else "bnf")
        params = [p for p in model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in params)
        self.optimizer = (torch.optim.AdamW(params, lr=lr, weight_decay=0.0) if optimizer == "adamw"
                          else torch.optim.SGD(params, lr=lr))

    def loss(self) -> torch.Tensor:
        if self.method != "dpo-naive":
            from axolotl_bnf_plugin.step_loss import batch_loss

            return batch_loss(self.model, self.batch, self.settings, reference=self.reference)[0]
        with torch.no_grad():
            if self.lora:
                with self.model.disable_adapter():
                    ref = dpo_sequence_logps(self.model, self.batch)
            else:
                ref = dpo_sequence_logps(self.reference, self.batch)
        return dpo_loss(dpo_sequence_logps(self.model, self.batch), ref, self.batch)

    def step(self) -> float:
        """One optimiser step; the gradients are freed after it, so none are held between steps."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def release(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.model = self.reference = self.batch = self.optimizer = None


# -------------------------------------------------------------------------------------------- measuring
def _rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


class PeakMemory:
    """CUDA: `max_memory_allocated` after a reset; CPU: the resident set, sampled every millisecond."""

    def __init__(self, device):
        self.device = device
        self.static = self.peak = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.static = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.static = self.peak = _rss_bytes()
            self._done = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._done.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._done.set()
            self._thread.join()
            self.peak = max(self.peak, _rss_bytes())
        return False


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_case(args, name: str, tuning: str, layout: str, method: str, device, dtype) -> dict:
    """The timing and memory fields of one case."""
    spec = model_shape(name, args.smoke)
    # What an earlier case left allocated (0 unless something leaked): it would count in this case's peak.
    left_over = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    examples = make_examples(args.pairs, args.prompt_len, args.response_len, spec["vocab_size"], seed=args.seed)
    model = build_model(name, args.layers, device, dtype, seed=args.seed, smoke=args.smoke)
    if tuning == "lora":
        model = add_lora(model, args.lora_r)
    case = Case(model, method, examples, layout == "packed", spec["vocab_size"], device, args.lr)
    del model
    try:
        losses = [case.step() for _ in range(args.warmup)]
        times = []
        with PeakMemory(device) as memory:
            for _ in range(args.steps):
                _sync(device)
                start = time.perf_counter()
                losses.append(case.step())
                _sync(device)
                times.append(time.perf_counter() - start)
        batch = case.batch
        tokens = int((batch["response_index"] >= 0).sum())
        seconds = statistics.median(times)
        return {"s_per_step": seconds, "times_s": times, "tokens": tokens,
                "scored_tokens": int(batch["scored_index"].numel()), "rows": int(batch["input_ids"].shape[0]),
                "width": int(batch["input_ids"].shape[1]), "tokens_per_s": tokens / seconds,
                "peak_mib": memory.peak / MiB, "static_mib": memory.static / MiB, "trainable_params": case.trainable,
                "reference": case.reference_kind, "packer": case.packer, "losses": losses,
                "left_over_mib": left_over / MiB}
    finally:
        case.release()
        del case


def versions() -> dict:
    out = {"torch": torch.__version__}
    for dist in ("transformers", "peft", "triton"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


# ----------------------------------------------------------------------------------------------- output
def _gib(mib) -> str:
    return f"{mib / 1024:.2f}"


def caption(rows: list[dict]) -> str:
    r = rows[0]
    spec = model_shape(r["model"], r.get("smoke", False))
    cuda = r.get("device_type") == "cuda"
    memory = ("peak = torch.cuda.max_memory_allocated over the timed steps (weights, gradients, AdamW state, "
              "reference and activations), static = allocated before them (weights, a reference copy, AdamW "
              "state)" if cuda else "memory = the process's resident set (sampled), not comparable between rows")
    return (f"Training step, {r['device']}: {spec['label']} layer shapes (hidden {spec['hidden_size']}, "
            f"intermediate {spec['intermediate_size']}, {spec['num_attention_heads']} heads / "
            f"{spec['num_key_value_heads']} KV heads, vocab {spec['vocab_size']}, untied head), {r['layers']} of "
            f"{spec['full_layers']} layers, {r['dtype']}, sdpa; torch {r['torch']}, transformers "
            f"{r['transformers']}, peft {r['peft']}. Batch: {r['pairs']} pairs x ({r['prompt_len']} prompt + "
            f"{r['response_len']} response) tokens, {r['pairs'] * 2 * (r['prompt_len'] + r['response_len'])} "
            f"tokens a step; unpacked = one row per response, packed = the plugin's packed rows. One AdamW step "
            f"(LoRA: r {r['lora_r']} on attention and MLP projections, head frozen), median of {r['steps']} "
            f"after {r['warmup']} warm-up, synchronised; {memory}.")


TABLE_HEADER = ("| tuning | layout | method | s/step | tokens/s | peak GiB | static GiB | peak - static GiB "
                "| peak vs naive DPO |\n|---|---|---|---|---|---|---|---|---|")


def table_line(r: dict, dpo_peak: float | None = None) -> str:
    head = f"| {r['tuning']} | {r['layout']} | {METHODS.get(r['method'], r['method'])} |"
    if "s_per_step" not in r:
        return f"{head} {r.get('error') or r.get('skipped')} | | | | | |"
    compare = dpo_peak and r["method"] != "dpo-naive" and r.get("device_type") == "cuda"
    versus = f"{100 * (r['peak_mib'] / dpo_peak - 1):+.0f}%" if compare else ""
    return (f"{head} {r['s_per_step']:.3f} | {r['tokens_per_s']:.0f} | {_gib(r['peak_mib'])} | "
            f"{_gib(r['static_mib'])} | {_gib(r['peak_mib'] - r['static_mib'])} | {versus} |")


def markdown(rows: list[dict]) -> str:
    if not rows:
        return "No training-step rows measured.\n"
    parts = []
    for name in dict.fromkeys(r["model"] for r in rows):
        group = [r for r in rows if r["model"] == name]
        dpo = {(r["tuning"], r["layout"]): r["peak_mib"] for r in group
               if r["method"] == "dpo-naive" and "peak_mib" in r}
        lines = [table_line(r, dpo.get((r["tuning"], r["layout"]))) for r in group]
        parts.append("\n".join([caption(group), "", TABLE_HEADER, *lines]))
    return "\n\n".join(parts) + "\n"


def read_rows(path: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    print(f"skipping an unreadable line of {path}: {line[:80]!r}", file=sys.stderr)
    return rows


def append_jsonl(path: str, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ------------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--response-len", type=int, default=512)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--tunings", nargs="+", default=list(TUNINGS), choices=TUNINGS)
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimiser steps first")
    parser.add_argument("--steps", type=int, default=3, help="timed optimiser steps")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds: no case starts after this; the rest are recorded as skipped")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes (hidden 64, vocab 1000, 2 layers, 2 pairs of 16 + 16 tokens), 1 + 1 steps")
    parser.add_argument("--jsonl", default=None, help="append each row as a JSON line when measured")
    parser.add_argument("--table-from", default=None, metavar="JSONL", help="print the table of measured rows, exit")
    args = parser.parse_args(argv)
    if args.smoke:
        args.layers, args.pairs, args.prompt_len, args.response_len = 2, 2, 16, 16
        args.warmup, args.steps, args.lr = 1, 1, 1e-3
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.table_from:
        print(markdown(read_rows(args.table_from)), end="")
        return 0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    meta = {"device": device_name(device), "device_type": device.type, "dtype": str(dtype).split(".")[-1],
            **versions(), "layers": args.layers, "pairs": args.pairs, "prompt_len": args.prompt_len,
            "response_len": args.response_len, "warmup": args.warmup, "steps": args.steps, "lr": args.lr,
            "lora_r": args.lora_r, "smoke": args.smoke}
    print(f"device: {meta['device']}; {meta['dtype']}; torch {meta['torch']}, transformers {meta['transformers']}, "
          f"peft {meta['peft']}; {args.layers} layers; {args.pairs} pairs x ({args.prompt_len} + "
          f"{args.response_len}) tokens; {args.warmup} warm-up + {args.steps} timed steps", flush=True)
    start, rows, failures = time.monotonic(), [], 0
    for name in args.models:
        for tuning in args.tunings:
            for layout in args.layouts:
                for method in args.methods:
                    row = {"model": name, "tuning": tuning, "layout": layout, "method": method, **meta}
                    if args.time_budget is not None and time.monotonic() - start > args.time_budget:
                        row["skipped"] = "time budget"
                    else:
                        try:
                            row.update(measure_case(args, name, tuning, layout, method, device, dtype))
                            if not all(math.isfinite(x) for x in row["losses"]):
                                row["error"] = f"non-finite loss {row['losses']}"
                                failures += 1
                        except torch.OutOfMemoryError as exc:
                            row["error"] = "OOM"
                            print(f"OOM: {str(exc).splitlines()[0] if str(exc) else ''}", flush=True)
                        except Exception as exc:  # noqa: BLE001 - one broken case must not cost the others
                            traceback.print_exc()
                            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
                            failures += 1
                        finally:
                            _free(device)
                    rows.append(row)
                    if args.jsonl:
                        append_jsonl(args.jsonl, row)
                    print(f"[{time.monotonic() - start:.0f}s] {name} " + table_line(row), flush=True)
    print("\n" + markdown(rows), end="", flush=True)
    if failures:
        print(f"{failures} case(s) failed (see the tracebacks above)", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
