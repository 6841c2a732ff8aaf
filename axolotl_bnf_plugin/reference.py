"""The initial policy's log-probs of the data, scored once and cached.

Used by `bnf_precompute_ref: true` (BNF's reference, so that training holds no reference model and runs no
reference forward) and by ASFT's likelihood-shift baseline (`bnf_shift_metrics`). The initial policy is the
model as training starts, adapter included (a fresh LoRA adapter is the identity; one continued from an SFT
run is part of the starting policy), scored in eval mode.

The pass is split across all processes: batches are formed over the whole data set, exactly as one process
would form them, and dealt out in contiguous blocks; each process scores its block and every process
receives all the results, so every rank holds the same numbers as a one-process scoring. Every process runs
the same number of forwards (a short block repeats its last batch and drops the result): under FSDP2 and
ZeRO-3 each forward gathers the layers collectively. A progress bar on the main process shows rows/s and the
time left.

The scores are kept as flat arrays (`PolicyScores`), never one Python float per token, and handed to the
batch collator through `ScoresByExample` (looked up by `example_id`), so that they can be attached after the
data loaders exist: under ZeRO-3, or FSDP2 with `cpu_ram_efficient_loading`, the policy's weights are only
whole once the engine has prepared it. On disk they are a `ref_logps` column (one list per response, one
value per scored completion token) next to the prepared data. The cache key is what the numbers depend on:
the selected examples' tokens, the weights the model was loaded from (a fingerprint of the files, not their
path: see `weights_fingerprint`), the adapter's starting weights, and the dtype. A log line says whether a
cache was reused or written, and under which key.
"""
from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import dataclass
from hashlib import md5
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from .data.collator import REF_LOGPS, ResponseBatchCollator, response_rows
from .initial_policy import adapter_is_identity, eval_mode
from .model_io import response_token_logps, unwrap, unwrap_peft
from .weights_fingerprint import model_fingerprint, tensors_fingerprint

# `datasets` (and its pyarrow) is imported by the functions that hash or cache a `Dataset`: scoring a plain list
# of examples (`initial_policy_logps`, e.g. in your own training loop) needs neither.
if TYPE_CHECKING:
    from datasets import Dataset

LOG = logging.getLogger(__name__)
REF_COLUMN = REF_LOGPS


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _block(num_batches: int, rank: int, world: int) -> range:
    """This process's contiguous block of batch numbers (sizes differ by at most one)."""
    per, extra = divmod(num_batches, world)
    start = rank * per + min(rank, extra)
    return range(start, start + per + (1 if rank < extra else 0))


@dataclass
class PolicyScores:
    """The initial policy's scores of a data set as flat arrays, never as one Python float per token (the
    lists of a 100M-token set would take GBs on every process): `values` `[tokens]` float32, and how they
    split into responses (`tokens_per_response`) and examples (`responses_per_example`)."""

    values: np.ndarray
    tokens_per_response: np.ndarray
    responses_per_example: np.ndarray

    def as_arrow(self):
        """`list<list<float32>>`, one row per example: the `ref_logps` column, built from the arrays."""
        import pyarrow as pa

        def offsets(counts: np.ndarray):
            return pa.array(np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]), type=pa.int64())

        responses = pa.LargeListArray.from_arrays(offsets(self.tokens_per_response), pa.array(self.values))
        return pa.LargeListArray.from_arrays(offsets(self.responses_per_example), responses).cast(
            pa.list_(pa.list_(pa.float32())))

    def as_lists(self) -> list[list[list[float]]]:
        """For each example, for each response, the log-prob of every scored completion token."""
        return self.as_arrow().to_pylist()

    @classmethod
    def from_arrow(cls, column) -> PolicyScores:
        """The arrays of a `ref_logps` column (a memory-mapped cache stays mapped: no copy of the values)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        examples = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        responses = examples.flatten()
        return cls(responses.flatten().to_numpy(zero_copy_only=False),
                   pc.list_value_length(responses).to_numpy(zero_copy_only=False).astype(np.int64),
                   pc.list_value_length(examples).to_numpy(zero_copy_only=False).astype(np.int64))


class ScoresByExample:
    """The initial policy's scores of one or more data sets, looked up by `example_id`: what the batch collator
    lays out as the batch's `ref_logps` (`ResponseBatchCollator.initial_scores`). Held as the score arrays and
    sorted id arrays, so a lookup costs a binary search and the per-example memory is a few integers."""

    def __init__(self):
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []

    def add(self, example_ids, scores: PolicyScores) -> None:
        """`scores` of the examples whose ids are `example_ids`, in the same order."""
        ids = np.asarray(example_ids, dtype=np.int64)
        if len(ids) != len(scores.responses_per_example):
            raise ValueError(f"{len(ids)} example ids for the scores of {len(scores.responses_per_example)} examples")
        order = np.argsort(ids, kind="stable")
        token_starts = np.concatenate([[0], np.cumsum(scores.tokens_per_response)])
        response_starts = np.concatenate([[0], np.cumsum(scores.responses_per_example)])
        self._parts.append((ids[order], order, response_starts, token_starts, scores.values))

    def __call__(self, example_id: int) -> list[np.ndarray] | None:
        """Per response of the example, its tokens' scores; None for an example that was not scored."""
        for sorted_ids, order, response_starts, token_starts, values in self._parts:
            at = int(np.searchsorted(sorted_ids, example_id))
            if at < len(sorted_ids) and sorted_ids[at] == example_id:
                row = order[at]
                return [values[token_starts[r]:token_starts[r + 1]]
                        for r in range(response_starts[row], response_starts[row + 1])]
        return None


@torch.no_grad()
def _score_batches(model, dataset: Dataset, collator, batch_size: int, batches: range, forwards: int, device,
                   chunk_size, impl, desc: str, show: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(flat token log-probs, tokens per response, responses per example) of the examples in `batches`, on the
    CPU. `forwards` (>= len(batches)) forwards are run: the extra ones repeat the last batch (or the first of
    the data set, for an empty block) and are dropped, so that every process takes part in as many forwards."""
    values: list[torch.Tensor] = [torch.zeros(0)]
    tokens_per_response: list[torch.Tensor] = [torch.zeros(0, dtype=torch.int64)]
    responses_per_example: list[int] = []
    first = batches.start * batch_size
    last = min(batches.stop * batch_size, len(dataset))
    with tqdm(total=max(last - first, 0), unit="rows", desc=desc, disable=not show) as bar:
        for step in range(forwards):
            number = batches[min(step, len(batches) - 1)] if len(batches) else 0
            examples = [dataset[i] for i in range(number * batch_size, min((number + 1) * batch_size, len(dataset)))]
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collator(examples).items()}
            token_logp, _, _ = response_token_logps(model, batch, chunk_size, impl=impl)
            if step >= len(batches):
                continue
            mask, dense = response_rows(batch, token_logp)
            values.append(dense[mask].float().cpu())
            tokens_per_response.append(mask.sum(1).cpu())
            responses_per_example.extend(len(example["response_sign"]) for example in examples)
            bar.update(len(examples))
    return torch.cat(values), torch.cat(tokens_per_response), torch.tensor(responses_per_example, dtype=torch.int64)


def _all_gather_1d(local: torch.Tensor, world: int) -> list[torch.Tensor]:
    """Every process's 1-D tensor (of any length), in rank order."""
    size = torch.tensor([local.numel()], dtype=torch.int64, device=local.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    torch.distributed.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=local.dtype, device=local.device)
    padded[: local.numel()] = local
    gathered = [torch.zeros_like(padded) for _ in range(world)]
    torch.distributed.all_gather(gathered, padded)
    return [g[: int(s.item())] for g, s in zip(gathered, sizes)]


def initial_policy_scores(model, dataset: Dataset, collator: ResponseBatchCollator, batch_size: int, device,
                          chunk_size: int | None = None, impl: str = "auto",
                          desc: str = "scoring with the initial policy") -> PolicyScores:
    """The initial policy's log-prob of every scored completion token of every response, as arrays; scored by
    all processes (each its block of batches), and every process gets all of them."""
    rank, world = _distributed()
    num_batches = -(-len(dataset) // batch_size)
    with eval_mode(model):
        parts = _score_batches(model, dataset, collator, batch_size, _block(num_batches, rank, world),
                               -(-num_batches // world), device, chunk_size, impl, desc, show=rank == 0)
    if world > 1:
        parts = tuple(torch.cat([g.cpu() for g in _all_gather_1d(part.to(device), world)]) for part in parts)
    return PolicyScores(*(part.numpy() for part in parts))


def initial_policy_logps(model, dataset: Dataset, collator: ResponseBatchCollator, batch_size: int, device,
                         chunk_size: int | None = None, impl: str = "auto",
                         desc: str = "scoring with the initial policy") -> list[list[list[float]]]:
    """For each example, for each response: the initial policy's log-prob of every scored completion token
    (`initial_policy_scores` as nested lists, for a training loop of your own)."""
    return initial_policy_scores(model, dataset, collator, batch_size, device, chunk_size, impl, desc).as_lists()


def _content_hash(dataset: Dataset) -> str:
    """Hash of the selected examples' tokens and signs, in order. (A fingerprint differs between a
    prepared data set and the same data loaded back from disk; the content does not. The rows are read
    through the data set's index mapping, so the two halves of a train / validation split differ.)"""
    import pyarrow as pa
    import pyarrow.compute as pc

    table = dataset.with_format("arrow")[:]
    digest = md5(str(len(dataset)).encode())
    for column in ("response_input_ids", "response_prompt_len", "response_sign"):
        values = table.column(column).combine_chunks()
        while pa.types.is_list(values.type) or pa.types.is_large_list(values.type):
            digest.update(pc.list_value_length(values).to_numpy(zero_copy_only=False).tobytes())
            values = values.flatten()
        digest.update(values.to_numpy(zero_copy_only=False).tobytes())
    return digest.hexdigest()


def _adapter_fingerprint(model) -> str:
    """'none' without an adapter or with one that starts as the identity; else a hash of its weights."""
    peft_model = unwrap_peft(model)
    if not hasattr(peft_model, "peft_config") or adapter_is_identity(peft_model):
        return "none"
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model, adapter_name=peft_model.active_adapter)
    config = peft_model.peft_config[peft_model.active_adapter].to_dict()
    config = {k: v for k, v in config.items() if k not in ("base_model_name_or_path", "revision")}
    return tensors_fingerprint(state) + md5(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def cache_key(dataset: Dataset, model) -> str:
    base = unwrap(model)
    identity = {
        "data": _content_hash(dataset),
        "weights": model_fingerprint(base),
        "adapter": _adapter_fingerprint(model),
        "dtype": str(next(base.parameters()).dtype),
        "column": REF_COLUMN,  # the stored layout: caches written under another column name are not reused
    }
    return md5(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _all_processes_have(path: Path | None, device) -> bool:
    found = path is not None and (path / "dataset_info.json").exists()
    if _distributed()[1] == 1:
        return found
    flag = torch.tensor([int(found)], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


def _save(scores: PolicyScores, path: Path) -> None:
    """Write the cache atomically (a temporary directory renamed into place), from one process per node."""
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return
    from datasets import Dataset, Features, Sequence, Value
    from datasets.table import InMemoryTable

    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    schema = Features({REF_COLUMN: Sequence(Sequence(Value("float32")))}).arrow_schema
    Dataset(InMemoryTable.from_pydict({REF_COLUMN: scores.as_arrow()}, schema=schema)).save_to_disk(str(tmp))
    try:
        os.replace(tmp, path)
    except OSError:  # another node wrote the same cache first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def cache_path(cache_dir: str | Path | None, key: str) -> Path | None:
    return Path(cache_dir) / f"bnf-ref-{key}" if cache_dir else None


def cached_scores(cache_dir: str | Path | None, key: str, device, split: str = "train") -> PolicyScores | None:
    """The scores cached under `key`, when every process finds them; else None."""
    from datasets import load_from_disk

    path = cache_path(cache_dir, key)
    if not _all_processes_have(path, device):
        return None
    LOG.info("initial-policy log-probs (%s): cache reused, key %s (%s)", split, key, path)
    return PolicyScores.from_arrow(load_from_disk(str(path)).data.column(REF_COLUMN))


def score_and_cache(dataset: Dataset, model, collator, batch_size: int, device, cache_dir: str | Path | None,
                    key: str, chunk_size: int | None = None, impl: str = "auto", split: str = "train") -> PolicyScores:
    """Score `dataset` with `model` (all processes) and cache the result under `key`."""
    LOG.info("initial-policy log-probs (%s): not cached (key %s): scoring %d examples once on %d process(es)",
             split, key, len(dataset), _distributed()[1])
    scores = initial_policy_scores(model, dataset, collator, batch_size, device, chunk_size, impl,
                                   desc=f"scoring {split} with the initial policy")
    path = cache_path(cache_dir, key)
    if path is not None:
        _save(scores, path)
        LOG.info("initial-policy log-probs (%s): cached under key %s (%s)", split, key, path)
    return scores


def with_reference_logps(dataset: Dataset, model, collator, batch_size: int, device, cache_dir: str | Path | None,
                         chunk_size: int | None = None, impl: str = "auto", split: str = "train") -> Dataset:
    """`dataset` plus the `ref_logps` column, loaded from the cache or scored (and cached): for a training loop
    of your own that keeps the scores with its data."""
    from datasets import Sequence, Value

    if REF_COLUMN in dataset.column_names:
        return dataset
    key = cache_key(dataset, model)
    scores = cached_scores(cache_dir, key, device, split)
    if scores is None:
        scores = score_and_cache(dataset, model, collator, batch_size, device, cache_dir, key, chunk_size, impl, split)
    return dataset.add_column(REF_COLUMN, scores.as_arrow(), feature=Sequence(Sequence(Value("float32"))))
