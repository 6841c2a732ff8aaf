"""Load, tokenize, account for and cache the plugin's training data (the plugin's `load_datasets` hook).

Every data set row becomes one *example*: a group of tokenized responses to one prompt, each with its
own sign (+1 preferred, -1 dispreferred), plus whether the responses form a pair. Pairwise rows give two
responses; later formats (unpaired, positives-only) give one. `micro_batch_size` counts examples, so a
pair is never split across micro-batches and the loss can normalise per pair.

Nothing is dropped silently: each row ends with a status (kept, truncated, or the reason it was
dropped), and one table of counts per data set is logged when preparation ends.
"""
from __future__ import annotations

import json
import math
import os
from collections import Counter
from hashlib import md5
from functools import partial
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, Features, Sequence, Value

from axolotl.common.datasets import TrainDatasetMeta
from axolotl.loaders import load_tokenizer
from axolotl.utils.chat_templates import get_chat_template_from_config
from axolotl.utils.data.lock import FileLockLoader
from axolotl.utils.data.shared import (
    create_train_validation_split,
    get_prepared_dataset_path,
    load_dataset_with_config,
    load_preprocessed_dataset,
    merge_datasets,
    save_preprocessed_dataset,
)
from axolotl.utils.dict import DictDefault
from axolotl.utils.logging import get_logger

from .adapters import Fields, MissingColumns, Skip, adapter_for_type, check_columns, detect_adapter
from .axolotl_types import (
    DatasetFormatError,
    axolotl_candidate,
    failure_prefix,
    resolve_axolotl_transform,
    strategy_name,
)
from .chat_template_types import chat_template_adapter
from .examples import KEPT, STATUS, candidate_example, dropped
from .raw_rows import is_local_json, read_json_rows
from .tokenize import LengthPolicy

LOG = get_logger(__name__)

# Bumped whenever the prepared layout or tokenization changes, so stale caches are never reused.
PREPARED_FORMAT = "bnf-examples-v6"
SOURCE_ROW = "bnf_source_row"  # where a row came from, for the report (dropped before training)
EXAMPLE_FEATURES = Features(
    {
        "response_input_ids": Sequence(Sequence(Value("int32"))),
        "response_prompt_len": Sequence(Value("int32")),
        "response_sign": Sequence(Value("int8")),
        "is_pair": Value("bool"),
        "length": Value("int32"),
        STATUS: Value("string"),
        SOURCE_ROW: Value("int64"),
    }
)


class RowConverter:
    """Raw row -> example row, for `Dataset.map` (picklable: it may run in worker processes).

    Rows the adapter cannot use become dropped rows with a reason; a row that breaks the data set's
    contract (a column the format needs is absent) stops preparation with the data set, row and columns.
    """

    def __init__(self, to_candidate, tokenizer, chat_template, policy: LengthPolicy, label: str, columns: list[str]):
        self.to_candidate, self.tokenizer, self.chat_template = to_candidate, tokenizer, chat_template
        self.policy, self.label, self.columns = policy, label, columns

    def candidate(self, row: dict[str, Any], idx: int):
        try:
            return self.to_candidate(row)
        except KeyError as err:
            raise DatasetFormatError(
                f"{self.label}, row {idx}: missing column {err.args[0]!r}; the data set has columns {self.columns}"
            ) from None
        except DatasetFormatError as err:
            raise DatasetFormatError(f"{self.label}, row {idx}: {err}") from None

    def __call__(self, row: dict[str, Any], idx: int) -> dict[str, Any]:
        try:
            candidate = self.candidate(row, idx)
        except Skip as skip:
            return {**dropped(skip.args[0]), SOURCE_ROW: idx}
        return {**candidate_example(candidate, self.tokenizer, self.chat_template, self.policy), SOURCE_ROW: idx}


def _load_raw(ds_cfg: dict, cfg) -> Dataset:
    dataset = load_dataset_with_config(DictDefault(ds_cfg), cfg.hf_use_auth_token, streaming=False)
    if isinstance(dataset, DatasetDict):
        dataset = dataset[ds_cfg.get("split") or "train"]
    return dataset


def _chat_template(cfg, ds_cfg: dict, tokenizer) -> str | None:
    """The template conversational rows are rendered with: the data set's or the config's
    `chat_template` choice (Axolotl's names and jinja), else the tokenizer's own; None if there is none."""
    if not (ds_cfg.get("chat_template") or cfg.chat_template) and not tokenizer.chat_template:
        return None
    return get_chat_template_from_config(cfg, ds_cfg=ds_cfg, tokenizer=tokenizer)


# Columns of vision-language and audio data sets (Axolotl's multimodal `images`, TRL's `image(s)`).
MEDIA_COLUMNS = ("images", "image", "audios", "audio", "videos", "video")


def _refuse_media_columns(columns: list[str], label: str) -> None:
    media = [c for c in MEDIA_COLUMNS if c in columns]
    if media:
        raise DatasetFormatError(
            f"{label}: column {media[0]!r}: image, audio and video preference data (vision-language models) is "
            "not supported by rl: bnf / asft; train text rows only (drop the column, or use a data set without it)")


SAMPLE_ROWS = 20  # rows the format is detected and described from


def candidate_function(cfg, raw_datasets: list[dict], idx: int, tokenizer, columns: list[str], label: str,
                       sample_rows: list[dict]):
    """(row -> Candidate, description, Axolotl strategy name or None) for data set `idx`: the plugin's
    adapter or Axolotl's `type:`. `sample_rows` are the data set's first rows (detection reads them)."""
    ds_cfg = raw_datasets[idx]
    fields = Fields.from_dataset_config(ds_cfg)
    ds_type = ds_cfg.get("type")
    _refuse_media_columns(columns, label)
    try:
        read_by_plugin = None if fields.label in columns else chat_template_adapter(ds_type, ds_cfg)
        if read_by_plugin is not None:
            adapter, fields = read_by_plugin
        else:
            adapter = adapter_for_type(ds_type) if ds_type else detect_adapter(columns, sample_rows, fields)
        if adapter is not None:
            check_columns(adapter, columns, fields)
    except (MissingColumns, ValueError) as err:
        raise DatasetFormatError(f"{label}: {err}; the data set has columns {columns}") from None
    if adapter is not None:
        how = f"type {ds_type}" if ds_type else "detected"
        return partial(adapter.convert, fields=fields), how, None
    unpaired = fields.label in columns
    transform = resolve_axolotl_transform(cfg, raw_datasets, idx, tokenizer, unpaired)
    strategy = strategy_name(ds_type)
    to_candidate = partial(axolotl_candidate, transform, unpaired=unpaired, label_key=fields.label, strategy=strategy)
    return to_candidate, f"type {ds_type}", strategy


def _describe_format(converter: RowConverter, first_rows: list[tuple[int, dict]], how: str, label: str) -> None:
    """Log once per data set how its rows are read (from the first row that converts)."""
    for idx, row in first_rows:
        try:
            LOG.info("%s: %s: %s", label, how, converter.candidate(row, idx).form)
            return
        except Skip:
            continue
    LOG.warning("%s: %s, but none of the first rows could be read (see the table at the end)", label, how)


def _examples_dataset(examples: list[dict[str, Any]]) -> Dataset:
    if not examples:  # from_list cannot infer an empty table, even with features
        return Dataset.from_dict({name: [] for name in EXAMPLE_FEATURES}, features=EXAMPLE_FEATURES)
    return Dataset.from_list(examples, features=EXAMPLE_FEATURES)


def _convert_dataset(cfg, raw_datasets, idx, tokenizer, label,
                     policy: LengthPolicy) -> tuple[Dataset, str, str | None]:
    """Example rows (with status and source row) for a data set loaded by Axolotl's loader, the unit rows
    are numbered in, and the Axolotl strategy used (None for the plugin's adapters)."""
    ds_cfg = raw_datasets[idx]
    try:
        raw = _load_raw(ds_cfg, cfg)
    except (OSError, ValueError) as err:
        raise DatasetFormatError(f"{label}: cannot be loaded: {err}") from None
    if len(raw) == 0:
        return _examples_dataset([]), "row", None
    columns = list(raw.column_names)
    first_rows = [(i, raw[i]) for i in range(min(len(raw), SAMPLE_ROWS))]
    to_candidate, how, strategy = candidate_function(cfg, raw_datasets, idx, tokenizer, columns, label,
                                                     [row for _, row in first_rows])
    converter = RowConverter(to_candidate, tokenizer, _chat_template(cfg, ds_cfg, tokenizer), policy, label, columns)
    _describe_format(converter, first_rows, how, label)
    converted = raw.map(
        converter,
        with_indices=True,
        remove_columns=columns,
        features=EXAMPLE_FEATURES,
        num_proc=cfg.dataset_num_proc if len(raw) > 5000 else None,
        load_from_cache_file=False,
        desc=f"Tokenizing {label}",
    )
    return converted, "row", strategy


def _convert_local_json(cfg, raw_datasets, idx, tokenizer, label,
                        policy: LengthPolicy) -> tuple[Dataset, str, str | None]:
    """Example rows for a local JSON / JSONL file read line by line (see `raw_rows`)."""
    ds_cfg = raw_datasets[idx]
    rows, problems = read_json_rows(ds_cfg["path"])
    examples = [{**dropped(reason), SOURCE_ROW: line} for line, reason in problems]
    strategy = None
    if rows:
        columns = sorted({key for _, row in rows for key in row})
        to_candidate, how, strategy = candidate_function(cfg, raw_datasets, idx, tokenizer, columns, label,
                                                         [row for _, row in rows[:SAMPLE_ROWS]])
        converter = RowConverter(to_candidate, tokenizer, _chat_template(cfg, ds_cfg, tokenizer), policy, label, columns)
        _describe_format(converter, rows[:SAMPLE_ROWS], how, label)
        examples += [converter(row, line) for line, row in rows]
    examples.sort(key=lambda e: e[SOURCE_ROW])
    return _examples_dataset(examples), "line", strategy


def _check_strategy(label: str, strategy: str | None, counts: Counter, where: dict[str, list[int]], unit: str) -> None:
    """Stop when a data set has no usable row and its Axolotl strategy failed on rows: a type that fits no
    row of a data set is a configuration error (wrong type, columns or options), not bad rows."""
    if strategy is None or any(counts.get(status) for status in KEPT):
        return
    failures = {reason: sources for reason, sources in where.items() if reason.startswith(failure_prefix(strategy))}
    if not failures:
        return
    failed, total = sum(len(s) for s in failures.values()), sum(counts.values())
    shown = []
    for reason, sources in sorted(failures.items(), key=lambda item: (-len(item[1]), item[0]))[:3]:
        more = f" (+{len(sources) - 5} more)" if len(sources) > 5 else ""
        shown.append(f"  {reason}: {unit}s {', '.join(str(s) for s in sources[:5])}{more}")
    if len(failures) > 3:
        shown.append(f"  ... and {len(failures) - 3} other reasons")
    hint = ""
    if any("not text)" in reason for reason in failures):
        hint = (" It returned something other than text: use a type that formats such columns (e.g. "
                "chat_template.default, or the plugin's bnf.pairs for message lists).")
    raise DatasetFormatError(
        f"{label}: no usable rows: Axolotl type {strategy!r} failed on {failed} of the data set's {total} {unit}s. "
        f"Check that this type fits the data set's columns and the entry's options (field_*, roles, "
        f"chat_template).{hint} First reasons:\n" + "\n".join(shown)
    )


def _prepare_split(cfg, tokenizer, raw_datasets: list[dict], split: str) -> tuple[Dataset, list[tuple]]:
    policy = LengthPolicy(cfg.sequence_len, cfg.excess_length_strategy, packing=bool(cfg.sample_packing))
    prepared, report = [], []
    for idx, ds_cfg in enumerate(raw_datasets):
        label = f"{'datasets' if split == 'train' else 'test_datasets'}[{idx}] ({ds_cfg.get('path')})"
        convert = _convert_local_json if is_local_json(ds_cfg) else _convert_dataset
        converted, unit, strategy = convert(cfg, raw_datasets, idx, tokenizer, label, policy)
        statuses, sources = converted[STATUS], converted[SOURCE_ROW]
        counts = Counter(statuses)
        where: dict[str, list[int]] = {}
        for status, source in zip(statuses, sources):
            if status not in KEPT:
                where.setdefault(status, []).append(source)
        report.append((label, counts, where, unit))
        _check_strategy(label, strategy, counts, where, unit)
        if len(converted) == 0:
            LOG.warning("%s is empty: skipped", label)
            continue
        kept = converted.filter(lambda s: s in KEPT, input_columns=STATUS, desc="Dropping unusable rows")
        if len(kept):
            prepared.append(kept.remove_columns([STATUS, SOURCE_ROW]))
        else:
            LOG.warning("%s: no usable rows (%s): skipped", label, dict(counts))
    if not prepared:
        raise DatasetFormatError(
            f"no usable rows in any {split} data set:\n" + format_report(report)
        )
    return merge_datasets(prepared, cfg), report


def prepare_examples(cfg, tokenizer, raw_datasets: list[dict], split: str) -> Dataset:
    """The example rows of `raw_datasets` (verbatim config entries), prepared as for training but not cached:
    what the likelihood probe scores (`compare.probe_set`)."""
    return _prepare_split(cfg, tokenizer, raw_datasets, split)[0]


def examples_with_rows(cfg, tokenizer, raw_datasets: list[dict], split: str, limit: int) -> list[tuple[dict, dict]]:
    """The first `limit` usable rows of `raw_datasets` (verbatim config entries), each as (example row, raw row):
    the example as training would tokenize it (same `type:`, template and length policy, never packed) and the
    data set's own row, whose columns the verifier evaluation hands to the user's functions."""
    policy = LengthPolicy(cfg.sequence_len, cfg.excess_length_strategy, packing=False)
    out: list[tuple[dict, dict]] = []
    for idx, ds_cfg in enumerate(raw_datasets):
        label = f"{'datasets' if split == 'train' else 'test_datasets'}[{idx}] ({ds_cfg.get('path')})"
        if is_local_json(ds_cfg):
            rows, _ = read_json_rows(ds_cfg["path"])
            columns = sorted({key for _, row in rows for key in row})
            sample = [row for _, row in rows[:SAMPLE_ROWS]]
        else:  # read row by row: only as far as `limit` usable rows
            raw = _load_raw(ds_cfg, cfg)
            rows, columns = ((i, raw[i]) for i in range(len(raw))), list(raw.column_names)
            sample = [raw[i] for i in range(min(len(raw), SAMPLE_ROWS))]
        if not sample:
            continue
        to_candidate, _, _ = candidate_function(cfg, raw_datasets, idx, tokenizer, columns, label, sample)
        converter = RowConverter(to_candidate, tokenizer, _chat_template(cfg, ds_cfg, tokenizer), policy, label, columns)
        for source, row in rows:
            example = converter(row, source)
            if example[STATUS] in KEPT:
                out.append((example, row))
                if len(out) == limit:
                    return out
    return out


def format_report(report: list[tuple]) -> str:
    """A fixed-width table (one line per data set, one column per status), then, for every reason rows
    were dropped, where: `datasets[0] (a.jsonl): too long: lines 4, 9, 17 (+3 more)`.

    Entries are (label, counts) or (label, counts, {reason: source rows}, "row" | "line").
    """
    statuses = ["kept", "truncated"] + sorted({s for entry in report for s in entry[1]} - set(KEPT))
    header = ["data set", "rows"] + statuses
    rows = [[entry[0], str(sum(entry[1].values()))] + [str(entry[1].get(s, 0)) for s in statuses] for entry in report]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in [header] + rows]
    for entry in report:
        if len(entry) < 4:
            continue
        label, _, where, unit = entry
        for reason, sources in sorted(where.items()):
            shown = ", ".join(str(s) for s in sources[:5])
            more = f" (+{len(sources) - 5} more)" if len(sources) > 5 else ""
            lines.append(f"{label}: {reason}: {unit}s {shown}{more}")
    return "\n".join(lines)


def _digest(value: Any) -> str:
    return md5(json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """A digest of what the tokenizer does, not of where it was loaded from: a tokenizer saved over the
    same path (an added token, other special tokens, a new chat template) gives a new digest."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return _digest({
        "class": type(tokenizer).__name__,
        # A fast tokenizer's whole definition: vocabulary, merges, normalisation, added tokens, BOS/EOS rules.
        "backend": backend.to_str() if backend is not None else None,
        "vocab": sorted(tokenizer.get_vocab().items()) if backend is None else None,
        "added": sorted((int(i), str(t)) for i, t in tokenizer.added_tokens_decoder.items()),
        "special": tokenizer.special_tokens_map,
        "flags": [getattr(tokenizer, name, None) for name in ("add_bos_token", "add_eos_token")],
        "chat_template": tokenizer.chat_template,
    })


def _local_files(ds_cfg: dict, prepared: Path) -> list[tuple[str, int, int]]:
    """(file, size, mtime) of the local files a data set entry reads, so a file rewritten in place is new data.
    Files under the prepared-data directory are left out: writing the cache must not change its key."""
    names, data_files = [ds_cfg.get("path")], ds_cfg.get("data_files")
    for value in (data_files.values() if isinstance(data_files, dict) else [data_files]):
        names += value if isinstance(value, list) else [value]
    found = []
    for name in names:
        if not isinstance(name, str) or not os.path.exists(name):
            continue
        files = [Path(name)] if os.path.isfile(name) else sorted(p for p in Path(name).rglob("*") if p.is_file())
        files = [f for f in files if not f.resolve().is_relative_to(prepared)]
        found += [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return found


def _dataset_hash(cfg, raw_datasets: list[dict], tokenizer) -> str:
    """The prepared-data cache key: a digest of everything that decides the prepared rows.

    Axolotl's own dataset hash reads only some keys of each entry (not field_prompt, a dict `type:`'s
    options, bnf_chat_format, ...) and names the tokenizer and chat template instead of hashing them, so
    the key is built here from the verbatim entries, the chat template each data set is rendered with,
    the tokenizer's content, the length policy, the row order of the merge, and the code versions.
    """
    import axolotl
    import transformers

    return _digest({
        "format": PREPARED_FORMAT,
        "versions": [axolotl.__version__, transformers.__version__],
        "datasets": raw_datasets,
        "local_files": [_local_files(d, get_prepared_dataset_path(cfg, "").resolve()) for d in raw_datasets],
        "chat_templates": [_chat_template(cfg, d, tokenizer) for d in raw_datasets],
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "length": [cfg.sequence_len, cfg.excess_length_strategy, bool(cfg.sample_packing)],
        "method": cfg.bnf_rl,
        "order": [cfg.seed, cfg.shuffle_merged_datasets, cfg.shuffle_before_merging_datasets, cfg.curriculum_sampling],
    })


def _load_or_prepare(cfg, tokenizer, raw_datasets: list[dict], split: str) -> Dataset:
    dataset_hash = _dataset_hash(cfg, raw_datasets, tokenizer)
    path = get_prepared_dataset_path(cfg, dataset_hash)
    dataset = load_preprocessed_dataset(cfg, dataset_hash)
    if dataset is not None:
        LOG.info("BNF/ASFT prepared data (%s split): reused from %s (key %s)", split, path, dataset_hash)
        return dataset
    if path.is_dir() and any(path.iterdir()):
        LOG.info("BNF/ASFT prepared data (%s split): in cache at %s but prepared again (axolotl preprocess or "
                 "skip_prepare_dataset) (key %s)", split, path, dataset_hash)
    else:
        LOG.info("BNF/ASFT prepared data (%s split): not in cache: preparing (key %s)", split, dataset_hash)
    dataset, report = _prepare_split(cfg, tokenizer, raw_datasets, split)
    LOG.info("BNF/ASFT data preparation (%s split), rows by outcome:\n%s", split, format_report(report))
    if not cfg.skip_prepare_dataset:
        save_preprocessed_dataset(cfg, dataset, dataset_hash, split)
    return dataset


def _with_example_ids(dataset: Dataset, start: int) -> Dataset:
    if "example_id" in dataset.column_names:
        return dataset
    return dataset.add_column("example_id", list(range(start, start + len(dataset))))


def _total_steps(cfg, train: Dataset) -> int:
    """Optimiser steps for the run (Axolotl's `max_steps` when the config sets none): one pass over the data
    per epoch.

    `cfg.batch_size` is already the global batch: Axolotl's `normalize_config` multiplied micro-batch x
    accumulation by the number of processes. With packing, the trainer's sampler (`packing.EpochBins`) fixes
    the bins before training, so the same plan gives the exact count."""
    epochs = cfg.num_epochs or 1
    if not cfg.sample_packing:
        return math.ceil(len(train) * epochs / cfg.batch_size)
    from .packing import EpochBins, packing_shape

    processes = max(cfg.batch_size // (cfg.micro_batch_size * cfg.gradient_accumulation_steps), 1)
    capacity, bins_per_batch = packing_shape(cfg.micro_batch_size, cfg.sequence_len, bool(cfg.multipack_real_batches))
    sampler = EpochBins(train["length"], capacity, bins_per_batch, processes, seed=cfg.seed or 0,
                        group_size=cfg.sample_packing_group_size or 100_000, bin_size=cfg.sample_packing_bin_size or 200)
    per_process = len(sampler) // processes
    LOG.info("sample packing: %d examples in %d bins of up to %d tokens (%.0f%% full), %d micro-batches per process "
             "per epoch", len(train), len(sampler.bins), capacity, 100 * sampler.efficiency(capacity), per_process)
    return math.ceil(math.ceil(per_process / cfg.gradient_accumulation_steps) * epochs)


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
    # Identifiers that name examples in messages about a batch (unique across train and eval).
    train = _with_example_ids(train, 0)
    if evaluation is not None:
        evaluation = _with_example_ids(evaluation, len(train))
    total_steps = _total_steps(cfg, train)
    LOG.info("BNF/ASFT data: %d training examples, %s eval examples", len(train), len(evaluation) if evaluation else 0)
    return TrainDatasetMeta(train_dataset=train, eval_dataset=evaluation, total_num_steps=total_steps)
