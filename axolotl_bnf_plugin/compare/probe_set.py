"""The probe set: the fixed pairs every compared run scores (`bnf_compare_probe`).

The pairs come from the config's own data: `test_datasets` when it has them (held out), otherwise the
training `datasets` (then the probe watches the likelihood of pairs the model trains on, as the paper's
training-set curves do). They go through the plugin's own loader (`data.loader.prepare_examples`: the same
`type:` strategies, chat template, tokenizer and length policy), so under `rl: dpo` and `rl: bnf` the probe
is the same token sequences. Only pairs are kept, and the first `bnf_compare_probe_size` of them in the
loader's order, which depends on the config alone (its seed and shuffle keys), never on the method.
"""
from __future__ import annotations

from axolotl.utils.dict import DictDefault

from ..data.loader import prepare_examples

EXAMPLE_COLUMNS = ("response_input_ids", "response_prompt_len", "response_sign", "is_pair")


def probe_source(cfg) -> tuple[str, list[dict]]:
    """(which config key the probe pairs come from, its verbatim entries)."""
    if cfg.get("bnf_test_datasets"):
        return "test_datasets", list(cfg["bnf_test_datasets"])
    if cfg.get("bnf_datasets"):
        return "datasets", list(cfg["bnf_datasets"])
    raise ValueError("bnf_compare_probe: the config has neither `test_datasets:` nor `datasets:` to take probe "
                     "pairs from")


def probe_examples(cfg, tokenizer) -> tuple[str, list[dict]]:
    """(source key, the first `bnf_compare_probe_size` pairs as example rows) for the collator.

    Packing never applies to the probe (each response is scored in its own row), whatever the run does.
    """
    source, entries = probe_source(cfg)
    unpacked = DictDefault({**cfg, "sample_packing": False})
    dataset = prepare_examples(unpacked, tokenizer, entries, "test" if source == "test_datasets" else "train")
    pairs = [row for row in dataset.select_columns(list(EXAMPLE_COLUMNS)) if row["is_pair"]]
    size = cfg.get("bnf_compare_probe_size") or 64
    if not pairs:
        raise ValueError(f"bnf_compare_probe: no usable pairs in `{source}:` (the probe compares chosen with "
                         "rejected responses, so it needs paired rows)")
    return source, pairs[:size]
