"""`bnf_precompute_ref: true`: the BNF reference log-probs, computed once before training.

The reference is the initial policy (with an adapter: the base model, adapter disabled). Scoring every
response once with the fused op, before the first update, gives exactly the numbers a live reference
would give at every step, so training then holds no reference model and runs no reference forward. The
per-token log-probs are stored as a `response_ref_logps` column (one list per response, one value per
scored completion token) and cached on disk next to the prepared data, keyed by the data set's
fingerprint and the model, so a second run (or a resumed one) reuses them.
"""
from __future__ import annotations

import contextlib
import json
from hashlib import md5
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets import Dataset, Sequence, Value, load_from_disk

from axolotl.utils.logging import get_logger

from .data.collator import ResponseBatchCollator, response_rows
from .model_io import response_token_logps, unwrap, unwrap_peft

LOG = get_logger(__name__)
REF_COLUMN = "response_ref_logps"


def _adapter_disabled(model):
    peft_model = unwrap_peft(model)
    return peft_model.disable_adapter() if hasattr(peft_model, "disable_adapter") else contextlib.nullcontext()


@torch.no_grad()
def reference_logps(model, dataset: Dataset, collator: ResponseBatchCollator, batch_size: int, device,
                    chunk_size: int | None = None, impl: str = "auto") -> list[list[list[float]]]:
    """For each example, for each response: the reference log-prob of every scored completion token."""
    was_training = model.training
    model.eval()
    out: list[list[list[float]]] = []
    try:
        with _adapter_disabled(model):
            for start in range(0, len(dataset), batch_size):
                examples = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
                batch = {k: v.to(device) for k, v in collator(examples).items()}
                token_logp, _, _ = response_token_logps(model, batch, chunk_size, impl=impl)
                mask, dense = response_rows(batch, token_logp)
                per_response = [dense[r][mask[r]].tolist() for r in range(mask.shape[0])]
                for example in examples:
                    k = len(example["response_sign"])
                    out.append(per_response[:k])
                    per_response = per_response[k:]
    finally:
        model.train(was_training)
    return out


def _content_hash(dataset: Dataset) -> str:
    """Hash of the selected examples' tokens and signs, in order. (A fingerprint differs between a
    prepared data set and the same data loaded back from disk; the content does not. The rows are read
    through the data set's index mapping, so the two halves of a train / validation split differ.)"""
    table = dataset.with_format("arrow")[:]
    digest = md5(str(len(dataset)).encode())
    for column in ("response_input_ids", "response_prompt_len", "response_sign"):
        values = table.column(column).combine_chunks()
        while pa.types.is_list(values.type) or pa.types.is_large_list(values.type):
            digest.update(pc.list_value_length(values).to_numpy(zero_copy_only=False).tobytes())
            values = values.flatten()
        digest.update(values.to_numpy(zero_copy_only=False).tobytes())
    return digest.hexdigest()


def _cache_key(dataset: Dataset, model) -> str:
    base = unwrap(model)
    identity = {
        "data": _content_hash(dataset),
        "model": str(getattr(base.config, "_name_or_path", "")),
        "dtype": str(next(base.parameters()).dtype),
        "adapter": str(getattr(unwrap_peft(model), "peft_config", "")),
    }
    return md5(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def with_reference_logps(dataset: Dataset, model, collator, batch_size: int, device, cache_dir: str | Path | None,
                         chunk_size: int | None = None, impl: str = "auto", split: str = "train") -> Dataset:
    """`dataset` plus the `response_ref_logps` column, loaded from the cache or computed (and cached)."""
    if REF_COLUMN in dataset.column_names:
        return dataset
    path = Path(cache_dir) / f"bnf-ref-{_cache_key(dataset, model)}" if cache_dir else None
    if path is not None and (path / "dataset_info.json").exists():
        LOG.info("BNF reference log-probs (%s): loaded from %s", split, path)
        cached = load_from_disk(str(path))
        return dataset.add_column(REF_COLUMN, cached[REF_COLUMN], feature=cached.features[REF_COLUMN])
    LOG.info("BNF reference log-probs (%s): scoring %d examples once with the initial policy", split, len(dataset))
    values = reference_logps(model, dataset, collator, batch_size, device, chunk_size, impl)
    feature = Sequence(Sequence(Value("float32")))
    if path is not None:
        Dataset.from_dict({REF_COLUMN: values}, features=dataset.features.__class__({REF_COLUMN: feature})).save_to_disk(str(path))
        LOG.info("BNF reference log-probs (%s): cached at %s", split, path)
    return dataset.add_column(REF_COLUMN, values, feature=feature)
