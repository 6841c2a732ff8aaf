"""Load, tokenize, account for and cache the plugin's training data (the plugin's `load_datasets` hook).

Every data set row becomes one *example*: a group of tokenized responses to one prompt, each with its
own sign (+1 preferred, -1 dispreferred), plus whether the responses form a pair. Pairwise rows give two
responses; later formats (unpaired, positives-only) give one. `micro_batch_size` counts examples, so a
pair is never split across micro-batches and the loss can normalise per pair.

Nothing is dropped silently: each row ends with a status (kept, truncated, or the reason it was
dropped), and one table of counts per data set is logged when preparation ends.
"""
from __future__ import annotations

import math
import os
from collections import Counter
from hashlib import md5
from typing import Any

from datasets import Dataset, DatasetDict, Features, Sequence, Value

from axolotl.common.datasets import TrainDatasetMeta
from axolotl.loaders import load_tokenizer
from axolotl.utils.data.lock import FileLockLoader
from axolotl.utils.data.shared import (
    create_train_validation_split,
    generate_dataset_hash_from_config,
    load_dataset_with_config,
    load_preprocessed_dataset,
    merge_datasets,
    save_preprocessed_dataset,
)
from axolotl.utils.dict import DictDefault
from axolotl.utils.logging import get_logger

from .preference import DatasetFormatError, pairwise_texts, resolve_pairwise_transform
from .tokenize import LengthPolicy, fit_length, tokenize_response

LOG = get_logger(__name__)

# Bumped whenever the prepared layout or tokenization changes, so stale caches are never reused.
PREPARED_FORMAT = "bnf-examples-v1"
STATUS = "bnf_status"
KEPT = ("kept", "truncated")
EXAMPLE_FEATURES = Features(
    {
        "response_input_ids": Sequence(Sequence(Value("int32"))),
        "response_prompt_len": Sequence(Value("int32")),
        "response_sign": Sequence(Value("int8")),
        "is_pair": Value("bool"),
        "length": Value("int32"),
        STATUS: Value("string"),
    }
)


def _dropped(reason: str) -> dict[str, Any]:
    return {
        "response_input_ids": [],
        "response_prompt_len": [],
        "response_sign": [],
        "is_pair": False,
        "length": 0,
        STATUS: reason,
    }


def pair_example(tokenizer, policy: LengthPolicy, prompt: str, chosen: str, rejected: str) -> dict[str, Any]:
    """One pairwise example (chosen first), or a dropped row naming why."""
    if not chosen.strip() or not rejected.strip():
        return _dropped("empty completion")
    if chosen == rejected:
        return _dropped("chosen == rejected")
    responses, status = [], "kept"
    for text in (chosen, rejected):
        resp, note = fit_length(tokenize_response(tokenizer, prompt, text), policy)
        if resp is None:
            return _dropped(note)
        status = note or status
        responses.append(resp)
    return {
        "response_input_ids": [r.input_ids for r in responses],
        "response_prompt_len": [r.prompt_len for r in responses],
        "response_sign": [1, -1],
        "is_pair": True,
        "length": sum(len(r.input_ids) for r in responses),
        STATUS: status,
    }


class _RowConverter:
    """Picklable per-row function for `Dataset.map` (it may run in worker processes)."""

    def __init__(self, transform, tokenizer, policy: LengthPolicy, label: str, columns: list[str]):
        self.transform, self.tokenizer, self.policy = transform, tokenizer, policy
        self.label, self.columns = label, columns

    def __call__(self, row: dict[str, Any], idx: int) -> dict[str, Any]:
        try:
            prompt, chosen, rejected = pairwise_texts(self.transform, row)
        except KeyError as err:
            raise DatasetFormatError(
                f"{self.label}, row {idx}: missing column {err.args[0]!r}; the data set has columns {self.columns}"
            ) from None
        except DatasetFormatError as err:
            raise DatasetFormatError(f"{self.label}, row {idx}: {err}") from None
        return pair_example(self.tokenizer, self.policy, prompt, chosen, rejected)


def _load_raw(ds_cfg: dict, cfg) -> Dataset:
    dataset = load_dataset_with_config(DictDefault(ds_cfg), cfg.hf_use_auth_token, streaming=False)
    if isinstance(dataset, DatasetDict):
        dataset = dataset[ds_cfg.get("split") or "train"]
    return dataset


def _prepare_split(cfg, tokenizer, raw_datasets: list[dict], split: str) -> tuple[Dataset, list[tuple[str, Counter]]]:
    policy = LengthPolicy(cfg.sequence_len, cfg.excess_length_strategy)
    prepared, report = [], []
    for idx, ds_cfg in enumerate(raw_datasets):
        label = f"{'datasets' if split == 'train' else 'test_datasets'}[{idx}] ({ds_cfg.get('path')})"
        raw = _load_raw(ds_cfg, cfg)
        if len(raw) == 0:
            raise DatasetFormatError(f"{label} is empty")
        transform = resolve_pairwise_transform(cfg, raw_datasets, idx, tokenizer) if ds_cfg.get("type") else None
        converter = _RowConverter(transform, tokenizer, policy, label, list(raw.column_names))
        converted = raw.map(
            converter,
            with_indices=True,
            remove_columns=raw.column_names,
            features=EXAMPLE_FEATURES,
            num_proc=cfg.dataset_num_proc if len(raw) > 1000 else None,
            load_from_cache_file=False,
            desc=f"Tokenizing {label}",
        )
        counts = Counter(converted[STATUS])
        report.append((label, counts))
        kept = converted.filter(lambda s: s in KEPT, input_columns=STATUS, desc="Dropping unusable rows")
        if len(kept) == 0:
            raise DatasetFormatError(f"{label}: no usable rows ({dict(counts)})")
        prepared.append(kept.remove_columns(STATUS))
    return merge_datasets(prepared, cfg), report


def format_report(report: list[tuple[str, Counter]]) -> str:
    """A fixed-width table: one line per data set, one column per status."""
    statuses = ["kept", "truncated"] + sorted({s for _, c in report for s in c} - set(KEPT))
    header = ["data set", "rows"] + statuses
    rows = [[label, str(sum(c.values()))] + [str(c.get(s, 0)) for s in statuses] for label, c in report]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)) for line in [header] + rows]
    return "\n".join(lines)


def _dataset_hash(cfg, raw_datasets: list[dict], tokenizer) -> str:
    base = generate_dataset_hash_from_config(cfg, [DictDefault(d) for d in raw_datasets], tokenizer.name_or_path)
    extra = f"{PREPARED_FORMAT}|{cfg.excess_length_strategy}|{cfg.chat_template}|{cfg.bnf_rl}"
    return md5(f"{base}|{extra}".encode()).hexdigest()


def _load_or_prepare(cfg, tokenizer, raw_datasets: list[dict], split: str) -> Dataset:
    dataset_hash = _dataset_hash(cfg, raw_datasets, tokenizer)
    dataset = load_preprocessed_dataset(cfg, dataset_hash)
    if dataset is not None:
        return dataset
    dataset, report = _prepare_split(cfg, tokenizer, raw_datasets, split)
    LOG.info("BNF/ASFT data preparation (%s split), rows by outcome:\n%s", split, format_report(report))
    if not cfg.skip_prepare_dataset:
        save_preprocessed_dataset(cfg, dataset, dataset_hash, split)
    return dataset


def load_bnf_datasets(cfg, preprocess: bool = False) -> TrainDatasetMeta:
    """The plugin's replacement for Axolotl's data loading, for `axolotl train` and `axolotl preprocess`."""
    tokenizer = load_tokenizer(cfg)
    train_cfgs = cfg.bnf_datasets or []
    if not train_cfgs:
        raise DatasetFormatError("`datasets:` is empty: rl: bnf / asft needs at least one training data set")

    def _load():
        train = _load_or_prepare(cfg, tokenizer, train_cfgs, "train")
        evaluation = None
        if cfg.bnf_test_datasets:
            evaluation = _load_or_prepare(cfg, tokenizer, cfg.bnf_test_datasets, "test")
        elif cfg.val_set_size:
            train, evaluation = create_train_validation_split(train, cfg, cfg.val_set_size)
        return train, evaluation

    loader = FileLockLoader(cfg)
    try:
        train, evaluation = loader.load(_load)
    finally:
        loader.cleanup()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    total_steps = math.ceil(len(train) * (cfg.num_epochs or 1) / (cfg.batch_size * world))
    LOG.info("BNF/ASFT data: %d training examples, %s eval examples", len(train), len(evaluation) if evaluation else 0)
    return TrainDatasetMeta(train_dataset=train, eval_dataset=evaluation, total_num_steps=total_steps)
