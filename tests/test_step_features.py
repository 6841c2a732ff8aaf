"""Axolotl's features around the training step, with `rl: bnf` / `rl: asft`.

Gradient checkpointing, torch.compile, Axolotl's own memory and token metrics, evaluation across
processes, and merging a trained LoRA adapter with `axolotl merge-lora`.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import LORA_KEYS, base_config, run_axolotl
from test_distributed import run_torchrun

from axolotl_bnf_plugin.summary import LOG_HISTORY_FILE


def history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / LOG_HISTORY_FILE).read_text().splitlines()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# ----------------------------------------------------------------------------------------- evaluation
EVAL_TIMING_KEYS = {"eval_runtime", "eval_samples_per_second", "eval_steps_per_second"}


def uneven_eval_set(tiny_assets: Path, out: Path) -> list[dict]:
    """9 eval examples, in this order: 2 pairs, then 7 unpaired chosen responses.

    With an eval batch of 2 and 2 processes, accelerate hands out batches round-robin: rank 0 gets
    (pair, pair), (u, u), (u) and rank 1 gets (u, u), (u, u); to give both ranks 3 batches it pads the last
    round with the set's first examples again (rank 0: 1 real + 1 repeat, rank 1: 2 repeats). So the ranks
    hold different numbers of real batches, rank 1's real batches hold only unpaired chosen responses (no
    rejected response, no pair), and the repeats must not be counted.
    """
    pairs = [json.loads(line) for line in (tiny_assets / "pairs_intel.jsonl").read_text().splitlines()]
    unpaired = [json.loads(line) for line in (tiny_assets / "unpaired.jsonl").read_text().splitlines()]
    chosen_only = [row for row in unpaired if row["label"]]
    return [
        {"path": str(write_jsonl(out / "eval_pairs.jsonl", pairs[-2:])), "ds_type": "json", "type": "chatml.intel",
         "split": "train"},
        {"path": str(write_jsonl(out / "eval_unpaired.jsonl", chosen_only[-7:])), "ds_type": "json",
         "split": "train"},
    ]


def eval_run(tiny_assets: Path, out: Path, method: str, processes: int) -> list[dict]:
    cfg = base_config(tiny_assets, out, method, micro_batch_size=4 // processes, max_steps=2, optimizer="sgd",
                      learning_rate=0.05, eval_steps=1, eval_batch_size=2, shuffle_merged_datasets=False,
                      test_datasets=uneven_eval_set(tiny_assets, out))
    run_torchrun(cfg, out, processes)  # a hang fails here, at its timeout
    return [r for r in history(out / "run") if "eval_loss" in r]


@pytest.mark.parametrize("method", ["bnf", "asft"])
def test_eval_metrics_with_uneven_eval_batches_match_one_process(tiny_assets, tmp_path, method):
    """2 processes, whose real eval batches differ in number and in kind, finish and log the same eval
    metrics as 1 process over the same eval set (the training steps before them are the same too)."""
    single = eval_run(tiny_assets, tmp_path / "p1", method, 1)
    double = eval_run(tiny_assets, tmp_path / "p2", method, 2)
    assert len(single) == len(double) >= 2  # at the start (Axolotl's eval_on_start) and at steps 1, 2
    for one, two in zip(single, double):
        names = set(one) - EVAL_TIMING_KEYS - {"step", "epoch"}
        assert {"eval_loss", "eval_rewards/chosen", "eval_rewards/rejected", "eval_rewards/accuracies",
                "eval_logps/chosen"} <= names
        assert names == set(two) - EVAL_TIMING_KEYS - {"step", "epoch"}
        for name in sorted(names):
            assert two[name] == pytest.approx(one[name], rel=1e-4, abs=1e-5), (name, one[name], two[name])


def _log_worker(rank: int, port: int, out: str, sums: list[dict], counts: list[dict]) -> None:
    """One of 2 gloo processes: BNFTrainer.log on an eval log whose metric sums are this rank's."""
    from datetime import timedelta
    from types import SimpleNamespace

    import torch.distributed as dist
    from axolotl.core.trainers.base import AxolotlTrainer

    from axolotl_bnf_plugin.metric_sums import MetricSums
    from axolotl_bnf_plugin.trainer import BNFTrainer

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=30))
    AxolotlTrainer.log = lambda self, logs, start_time=None: None  # only the plugin's reduction is under test
    trainer = BNFTrainer.__new__(BNFTrainer)
    tensors = lambda d: {k: torch.tensor(v, dtype=torch.float64) for k, v in d.items()}  # noqa: E731
    trainer.__dict__.update(accelerator=SimpleNamespace(device=torch.device("cpu")),
                            metric_sums=MetricSums())
    trainer.metric_sums.sums["eval"], trainer.metric_sums.counts["eval"] = tensors(sums[rank]), tensors(counts[rank])
    logs = {"eval_loss": 1.0, "eval_runtime": 1.0}  # as Trainer.evaluate logs, on every process
    trainer.log(logs)
    if rank == 0:  # a log only the main process makes (Axolotl's bench callback) must not wait for the other
        trainer.log({"eval_bench_average_accuracy": 0.5})
    dist.barrier()
    Path(out, f"{rank}.json").write_text(json.dumps(logs))
    dist.destroy_process_group()


@pytest.mark.parametrize("layout", ["one-rank-saw-no-batch", "different-names"])
def test_eval_log_reduces_the_same_names_on_every_process(tmp_path, layout):
    """Each process reduces the union of all processes' metric names in one order: a process that saw no
    eval batch takes part (no hang), and names only one process has are not mixed up with each other."""
    import socket

    import torch.multiprocessing as mp

    sums = [{"rewards/chosen": 3.0, "rewards/margins": 2.0}, {}]
    counts = [{"rewards/chosen": 2.0, "rewards/margins": 1.0}, {}]
    if layout == "different-names":
        sums[1], counts[1] = {"rewards/chosen": 5.0, "shift/chosen": 0.5}, {"rewards/chosen": 3.0, "shift/chosen": 2.0}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_log_worker, args=(port, str(tmp_path), sums, counts), nprocs=2, join=True)
    logged = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2)]
    assert logged[0] == logged[1]
    names = set(sums[0]) | set(sums[1])
    for name in names:  # sum over processes of the sums, over the sum of the counts
        want = sum(s.get(name, 0.0) for s in sums) / sum(c.get(name, 0.0) for c in counts)
        assert logged[0]["eval_" + name] == pytest.approx(want), name
    assert set(logged[0]) == {"eval_loss", "eval_runtime"} | {"eval_" + n for n in names}


def _features(rng: torch.Generator, kinds: str, vocab: int) -> list[dict]:
    """Collator features: 'p' = a pair, 'c' / 'r' = an unpaired chosen / rejected response."""
    out = []
    for i, kind in enumerate(kinds):
        signs = {"p": [1, -1], "c": [1], "r": [-1]}[kind]
        lengths = torch.randint(6, 14, (len(signs),), generator=rng).tolist()
        out.append({"response_input_ids": [torch.randint(5, vocab, (n,), generator=rng).tolist() for n in lengths],
                    "response_prompt_len": [3] * len(signs), "response_sign": signs, "is_pair": kind == "p",
                    "example_id": 100 + i})
    return out


@pytest.mark.parametrize("method", ["bnf", "asft"])
def test_leading_examples_score_as_if_batched_alone(tiny_assets, method):
    """The first k examples cut out of a collated batch give the loss and every metric that collating those
    k examples alone gives (the eval path drops accelerate's repeated examples this way)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from axolotl_bnf_plugin.data.collator import ResponseBatchCollator
    from axolotl_bnf_plugin.data.collator import leading_examples
    from axolotl_bnf_plugin.step_loss import LossSettings, batch_loss

    model = AutoModelForCausalLM.from_pretrained(tiny_assets / "model").eval()
    collator = ResponseBatchCollator(AutoTokenizer.from_pretrained(tiny_assets / "model"))
    features = _features(torch.Generator().manual_seed(0), "pcrpcc", model.config.vocab_size)
    settings = LossSettings(method)
    reference = AutoModelForCausalLM.from_pretrained(tiny_assets / "model").eval() if method == "bnf" else None
    if reference is not None:
        with torch.no_grad():
            reference.model.embed_tokens.weight.mul_(0.9)  # a reference that differs from the policy
    whole = collator(features)
    with torch.no_grad():
        for keep in range(1, len(features)):
            cut = leading_examples(whole, keep)
            assert cut["example_ids"].tolist() == [f["example_id"] for f in features[:keep]]
            got = batch_loss(model, cut, settings, reference=reference)
            want = batch_loss(model, collator(features[:keep]), settings, reference=reference)
            torch.testing.assert_close(got[0], want[0], msg=f"loss, keep={keep}")
            assert set(got[1]) == set(want[1])
            for name in want[1]:
                torch.testing.assert_close(got[1][name], want[1][name], msg=f"{name}, keep={keep}")
                assert int(got[1].counts[name]) == int(want[1].counts[name]), (name, keep)


# ----------------------------------------------------------------------------------- checkpointing, compile
def train_sgd(tiny_assets: Path, out: Path, method: str, **overrides):
    """3 SGD steps (fp32); returns (train log records, final saved weights, the run's stdout + stderr)."""
    from safetensors.torch import load_file

    cfg = base_config(tiny_assets, out, method, max_steps=3, optimizer="sgd", learning_rate=0.05, **overrides)
    proc = run_axolotl("train", cfg, out)
    run = out / "run"
    weights = next(p for p in (run / "model.safetensors", run / "adapter_model.safetensors") if p.exists())
    return [r for r in history(run) if "loss" in r], load_file(str(weights)), proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def plain_run(tiny_assets, tmp_path_factory):
    """The same run without the feature under test, trained once per configuration."""
    runs = {}

    def get(method: str, **extra):
        key = json.dumps([method, extra], sort_keys=True)
        if key not in runs:
            runs[key] = train_sgd(tiny_assets, tmp_path_factory.mktemp("plain"), method, **extra)
        return runs[key]

    return get


def assert_same_training(reference, other, rel: float, atol: float):
    (steps_a, weights_a, _), (steps_b, weights_b, _) = reference, other
    assert len(steps_a) == len(steps_b) == 3
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in steps_b] == pytest.approx([r[key] for r in steps_a], rel=rel, abs=atol), key
    assert steps_a[0]["loss"] != steps_a[-1]["loss"]  # the steps did change the model
    assert set(weights_a) == set(weights_b)
    for name in weights_a:
        torch.testing.assert_close(weights_b[name], weights_a[name], rtol=rel, atol=atol, msg=name)


@pytest.fixture(scope="module")
def initial_adapter(tiny_assets, tmp_path_factory) -> Path:
    """A LoRA adapter (LORA_KEYS' shape) with seeded, non-zero A and B, for runs that must start alike:
    Axolotl initialises a new adapter before anything seeds torch, and torch 2.13 seeds itself randomly
    at start-up, so two fresh LoRA runs of one config start from different adapters."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_assets / "model")
    linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=linear,
                                            task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02)
    out = tmp_path_factory.mktemp("adapter")
    peft.save_pretrained(out)
    return out


GC_CASES = {
    "bnf-full": ("bnf", False, {}),
    "asft-full": ("asft", False, {}),
    "bnf-lora": ("bnf", True, {}),
    "asft-lora-reentrant": ("asft", True, {"gradient_checkpointing_kwargs": {"use_reentrant": True}}),
}


@pytest.mark.parametrize("case", list(GC_CASES))
def test_gradient_checkpointing_gives_the_same_losses_and_weights(tiny_assets, tmp_path, plain_run, initial_adapter,
                                                                  case):
    """`gradient_checkpointing: true` recomputes the decoder layers in backward: the same losses, gradient
    norms and (SGD, so the gradients themselves) final weights as without it. The LoRA cases go through
    Axolotl's adapter path (enable_input_require_grads; BNF's reference = the adapter disabled), one of
    them with reentrant checkpointing; both start from the same adapter."""
    method, lora, gc_kwargs = GC_CASES[case]
    extra = {**LORA_KEYS, "lora_model_dir": str(initial_adapter)} if lora else {}
    checkpointed = train_sgd(tiny_assets, tmp_path, method, gradient_checkpointing=True, **gc_kwargs, **extra)
    assert_same_training(plain_run(method, **extra), checkpointed, rel=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["bnf", "asft"])
def test_torch_compile_trains_like_eager(tiny_assets, tmp_path, plain_run, monkeypatch, method):
    """`torch_compile: true` (accelerate compiles the whole causal LM with inductor): training follows the
    eager run (inductor may reorder float sums: fp32 round-off only), so the decoder hook that hands the
    final hidden states to the fused op still delivers them from the compiled forward."""
    cache = tmp_path / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))
    compiled = train_sgd(tiny_assets, tmp_path, method, torch_compile=True)
    assert any(cache.rglob("*.cpp")), "inductor compiled nothing"
    assert_same_training(plain_run(method), compiled, rel=1e-4, atol=1e-5)


def test_decoder_hook_compiles_into_one_graph(tiny_assets):
    """The model compiled with `fullgraph=True` (any graph break raises), called as the trainer calls it
    (decoder hook, `logits_to_keep=1`), then the fused op: the same BNF loss and gradients as eager."""
    import copy

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from axolotl_bnf_plugin.data.collator import ResponseBatchCollator
    from axolotl_bnf_plugin.step_loss import LossSettings, batch_loss

    eager = AutoModelForCausalLM.from_pretrained(tiny_assets / "model").train()
    reference = copy.deepcopy(eager).eval().requires_grad_(False)
    same = copy.deepcopy(eager)
    compiled = torch.compile(same, fullgraph=True)
    collator = ResponseBatchCollator(AutoTokenizer.from_pretrained(tiny_assets / "model"))
    batch = collator(_features(torch.Generator().manual_seed(1), "pcpr", eager.config.vocab_size))
    settings = LossSettings("bnf")
    want = batch_loss(eager, batch, settings, reference=reference)[0]
    got = batch_loss(compiled, batch, settings, reference=reference)[0]
    want.backward()
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(eager.named_parameters(), same.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------------- Axolotl's own metrics
class FakeCudaAllocator:
    """torch.cuda's memory counters for one device: live bytes and the peak since the last reset."""

    def __init__(self):
        self.live = self.peak = self.resets = 0

    def alloc(self, n: int):
        self.live += n
        self.peak = max(self.peak, self.live)

    def free(self, n: int):
        self.live -= n

    def install(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: self.live)
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: self.peak)
        monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: self.peak)
        monkeypatch.setattr(torch.cuda, "memory_stats", lambda device=None: {"active_bytes.all.peak": self.peak})

        def reset(device=None):
            self.resets += 1
            self.peak = self.live

        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
        monkeypatch.setattr(torch.cuda, "reset_max_memory_allocated", reset)


def test_training_steps_leave_axolotls_peak_counters_alone(monkeypatch):
    """Two micro-batches through BNFTrainer's own `training_step` / `compute_loss` (the model's work, and
    the Trainer's backward, replaced by allocations on a fake CUDA allocator), then the log: the plugin
    reports memory at each phase end and the peak, no counter is ever reset, and Axolotl's own memory
    report (`utils/bench.py`, read by AxolotlTrainer.log) still sees the window's peak, reached inside a
    forward."""
    from types import SimpleNamespace

    from axolotl.core.trainers.base import AxolotlTrainer
    from axolotl.utils.bench import gpu_memory_usage_all

    from axolotl_bnf_plugin.methods import Metrics
    from axolotl_bnf_plugin.metric_sums import MetricSums
    from axolotl_bnf_plugin.numerics import StepGuard
    from axolotl_bnf_plugin.telemetry import PhaseMemory
    from axolotl_bnf_plugin.trainer import BNFTrainer

    fake = FakeCudaAllocator()
    fake.install(monkeypatch)
    mib = 2**20
    activations = iter([300 * mib, 200 * mib])

    def forward(model, batch, normalizer=None):
        fake.alloc(next(activations))
        fake.alloc(500 * mib)  # the fused op's logits block, freed before the loss returns
        fake.free(500 * mib)
        return torch.tensor(1.0), Metrics()

    def backward_step(self, model, inputs, num_items_in_batch=None):  # the Trainer's training_step
        loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        fake.alloc(50 * mib)  # gradients; the activations are freed
        fake.free(fake.live - 100 * mib)
        return loss

    monkeypatch.setattr(AxolotlTrainer, "training_step", backward_step)
    trainer = BNFTrainer.__new__(BNFTrainer)  # the step's own code, without a model or data
    trainer.__dict__.update(
        args=SimpleNamespace(include_tkps=False, average_tokens_across_devices=False),
        accelerator=SimpleNamespace(num_processes=1), phase_memory=PhaseMemory(torch.device("cuda", 0)),
        guard=StepGuard(3), _loss_and_metrics=forward, _examples_since_log=0,
        metric_sums=MetricSums())
    model = SimpleNamespace(training=True)
    fake.alloc(100 * mib)  # weights, optimizer state
    for _ in range(2):
        trainer.training_step(model, {"example_ids": torch.arange(2)}, torch.tensor(2.0))
    assert fake.resets == 0
    logged = trainer.phase_memory.metrics()
    assert logged == {"memory/allocated_forward_MiB": 400.0, "memory/allocated_backward_MiB": 100.0,
                      "memory/peak_allocated_MiB": 900.0}
    _, allocated, _ = gpu_memory_usage_all("cuda:0")  # AxolotlTrainer.log passes device 0
    assert allocated * 2**30 == 900 * mib  # the true peak of the window (Axolotl then resets it itself)
    assert trainer.phase_memory.metrics() == {"memory/peak_allocated_MiB": 100.0}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_phase_memory_on_cuda_keeps_the_real_peak_counters():
    from axolotl.utils.bench import gpu_memory_usage_all

    from axolotl_bnf_plugin.telemetry import PhaseMemory

    device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    memory = PhaseMemory(device)
    block = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    del block  # a transient 256 MiB inside the "forward"
    memory.end("forward")
    kept = torch.empty(16 * 2**20, dtype=torch.uint8, device=device)
    memory.end("backward")
    logged = memory.metrics()
    assert logged["memory/peak_allocated_MiB"] >= base / 2**20 + 256
    assert logged["memory/allocated_backward_MiB"] >= base / 2**20 + 16
    _, allocated_gib, _ = gpu_memory_usage_all(device)
    assert allocated_gib * 1024 >= base / 2**20 + 256  # Axolotl still sees the forward's peak
    del kept


def test_axolotl_token_metrics_are_logged(tiny_assets, tmp_path):
    """Axolotl's `tokens/*` (include_tkps, on by default) and transformers' `num_input_tokens_seen` /
    `train_tokens_per_second` (include_tokens_per_second) appear in the log history. Over one whole
    epoch, `tokens/trainable` is every scored response token of the prepared training set, and
    `tokens/total` (token slots, padding included) is the count transformers keeps of `input_ids`."""
    from datasets import load_from_disk

    rows = (tiny_assets / "pairs_intel.jsonl").read_text().splitlines()[:16]
    data = write_jsonl(tmp_path / "pairs16.jsonl", [json.loads(r) for r in rows])
    cfg = base_config(tiny_assets, tmp_path, "bnf", max_steps=4, include_tokens_per_second=True,
                      datasets=[{"path": str(data), "ds_type": "json", "type": "chatml.intel"}])
    run_axolotl("train", cfg, tmp_path)
    steps = [r for r in history(tmp_path / "run") if "loss" in r]
    assert len(steps) == 4 and steps[-1]["epoch"] == pytest.approx(1.0)
    prepared = [p.parent for p in (tmp_path / "prepared").rglob("dataset_info.json")]
    assert len(prepared) == 1, prepared
    train = load_from_disk(str(prepared[0]))
    scored = sum(len(ids) - max(plen, 1) for ids_list, plens in zip(train["response_input_ids"],
                                                                      train["response_prompt_len"])
                 for ids, plen in zip(ids_list, plens))
    assert len(train) == 16 and steps[-1]["tokens/trainable"] == scored
    assert [r["tokens/total"] for r in steps] == [r["num_input_tokens_seen"] for r in steps]
    assert steps[-1]["tokens/total"] > scored
    assert all(r["tokens/train_per_sec_per_gpu"] > 0 for r in steps[1:])
    assert all(r["train_tokens_per_second"] > 0 for r in steps)


def test_asft_logs_the_run_s_share_of_rows_in_the_two_pass_op(tiny_assets, tmp_path):
    """ASFT's responses longer than a block of the fused op take its two-pass op: `fused/two_pass_share` is
    their share of all scored rows over the run. With the block at the median response length, over one
    epoch it is the share the prepared data gives, counted here from the data, not from the op."""
    from datasets import load_from_disk

    rows = [json.loads(r) for r in (tiny_assets / "pairs_intel.jsonl").read_text().splitlines()[:16]]
    for i, row in enumerate(rows):  # responses of 1 to 8 times their length
        row["chosen"], row["rejected"] = " ".join([row["chosen"]] * (1 + i % 8)), " ".join([row["rejected"]] * (1 + i // 2))
    data = write_jsonl(tmp_path / "pairs16.jsonl", rows)
    cfg = base_config(tiny_assets, tmp_path, "asft", max_steps=4,
                      datasets=[{"path": str(data), "ds_type": "json", "type": "chatml.intel"}])
    run_axolotl("preprocess", cfg, tmp_path)
    prepared = [p.parent for p in (tmp_path / "prepared").rglob("dataset_info.json")]
    train = load_from_disk(str(prepared[0]))
    lengths = [len(ids) - max(plen, 1) for ids_list, plens in zip(train["response_input_ids"], train["response_prompt_len"])
               for ids, plen in zip(ids_list, plens)]
    chunk = sorted(lengths)[len(lengths) // 2]
    expected = sum(n for n in lengths if n > chunk) / sum(lengths)
    assert 0 < expected < 1
    run_axolotl("train", {**cfg, "bnf_loss_chunk_size": chunk}, tmp_path)
    steps = [r for r in history(tmp_path / "run") if "loss" in r]
    assert len(steps) == 4 and steps[-1]["epoch"] == pytest.approx(1.0)
    assert steps[-1]["fused/two_pass_share"] == pytest.approx(expected, abs=1e-6)
    assert all(0 < r["fused/two_pass_share"] < 1 for r in steps)


# ----------------------------------------------------------------------------------- merge-lora
@torch.no_grad()
def full_logit_logps(model, tokenizer, rows: list[dict]) -> torch.Tensor:
    """log p(token | prefix) of every chosen-response token (prompt + answer in chatml), from the full logits."""
    out = []
    for row in rows:
        prompt = (f"<|im_start|>system\n{row['system']}<|im_end|>\n<|im_start|>user\n{row['question']}<|im_end|>\n"
                  "<|im_start|>assistant\n")
        start = len(tokenizer(prompt)["input_ids"])
        ids = torch.tensor([tokenizer(prompt + row["chosen"] + "<|im_end|>")["input_ids"]])
        logps = torch.log_softmax(model(ids).logits[0, :-1].float(), -1).gather(1, ids[0, 1:, None])[:, 0]
        out.append(logps[start - 1:])
    return torch.cat(out)


def test_merge_lora_gives_the_trained_log_probs(tiny_assets, tmp_path):
    """`axolotl merge-lora` on the training config (with `lora_model_dir` = the run's output, as Axolotl's
    docs say), then plain transformers: the merged model's log-probs are the base + saved adapter's (PEFT),
    and not the base model's. Both of Axolotl's merge methods: shard by shard (the default) and `legacy`,
    which loads the model through Axolotl's model loader and so runs the plugin's model hooks."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = base_config(tiny_assets, tmp_path, "bnf", learning_rate=5e-3, max_steps=4, **LORA_KEYS)
    run_axolotl("train", cfg, tmp_path)
    run = tmp_path / "run"
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets / "model")
    rows = [json.loads(line) for line in (tiny_assets / "pairs_intel.jsonl").read_text().splitlines()[:4]]
    base_model = AutoModelForCausalLM.from_pretrained(tiny_assets / "model").eval()
    base = full_logit_logps(base_model, tokenizer, rows)
    trained = full_logit_logps(PeftModel.from_pretrained(base_model, run).eval(), tokenizer, rows)
    assert trained.numel() > 40 and (trained - base).abs().max() > 1e-2
    for merge_method in ("memory_efficient", "legacy"):
        out = tmp_path / merge_method
        run_axolotl("merge-lora", {**cfg, "lora_model_dir": str(run), "output_dir": str(out),
                                   "merge_method": merge_method}, out)
        merged_model = AutoModelForCausalLM.from_pretrained(out / "merged").float().eval()
        merged = full_logit_logps(merged_model, tokenizer, rows)
        torch.testing.assert_close(merged, trained, rtol=1e-5, atol=1e-5, msg=merge_method)
