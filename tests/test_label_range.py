"""Token ids outside the model's vocabulary are refused on the CPU, in the collator, naming the example."""
from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from conftest import base_config, run_axolotl

from axolotl_bnf_plugin.data.collator import ResponseBatchCollator

TOKENIZER = SimpleNamespace(pad_token_id=0, eos_token_id=3)
VOCAB = 50


def _example(example_id: int, chosen: list[int], rejected: list[int]) -> dict:
    return {"response_input_ids": [chosen, rejected], "response_prompt_len": [2, 2], "response_sign": [1, -1],
            "is_pair": True, "example_id": example_id}


def _examples(bad_id: int | None = None) -> list[dict]:
    examples = [_example(10, [5, 6, 7, 8], [5, 6, 9]), _example(11, [5, 6, 40, 41], [5, 6, 49, 3]),
                _example(12, [5, 7, 8], [5, 7, 9, 9])]
    if bad_id is not None:
        examples[1]["response_input_ids"][1][2] = bad_id
    return examples


@pytest.mark.parametrize("bad_id", [VOCAB, VOCAB + 1000, -5])
@pytest.mark.parametrize("packed", [False, True])
def test_out_of_vocabulary_id_names_example_response_and_id(bad_id, packed):
    examples = _examples(bad_id)
    features = [examples[:2], examples[2:]] if packed else examples
    with pytest.raises(ValueError) as err:
        ResponseBatchCollator(TOKENIZER, vocab_size=VOCAB)(features)
    message = str(err.value)
    assert f"example 11, response 1: token id {bad_id} is outside the model's vocabulary of {VOCAB} tokens" in message
    assert "resize the model's embeddings" in message


def test_ids_in_range_give_the_same_batch_as_without_the_check():
    checked = ResponseBatchCollator(TOKENIZER, vocab_size=VOCAB)(_examples())
    plain = ResponseBatchCollator(TOKENIZER)(_examples())
    assert checked.keys() == plain.keys()
    assert all(torch.equal(checked[k], plain[k]) if torch.is_tensor(plain[k]) else checked[k] == plain[k]
               for k in plain)
    assert int(checked["input_ids"].max()) == VOCAB - 1  # the largest valid id passes


def test_without_vocab_size_nothing_is_checked():
    batch = ResponseBatchCollator(TOKENIZER)(_examples(VOCAB))
    assert int(batch["input_ids"].max()) == VOCAB


def test_out_of_vocabulary_padding_is_named():
    tokenizer = SimpleNamespace(pad_token_id=VOCAB + 2, eos_token_id=3)
    with pytest.raises(ValueError, match=rf"padding token id {VOCAB + 2} is outside"):
        ResponseBatchCollator(tokenizer, vocab_size=VOCAB)(_examples())


@pytest.fixture(scope="module")
def holed_tokenizer_assets(tiny_assets, tmp_path_factory):
    """The tiny model with a tokenizer whose byte token "z" has id 600, past the model's 483-row vocabulary.

    The tokenizer's length (its token count) still equals the model's vocabulary, so Axolotl resizes nothing
    (it resizes the embeddings up to `len(tokenizer)`, which covers a plainly added token), and the toy data
    has no "z" except in one rejected answer (row 5).
    """
    from transformers import AutoConfig, AutoTokenizer

    out = tmp_path_factory.mktemp("holed")
    model = out / "model"
    shutil.copytree(tiny_assets / "model", model)
    spec = json.loads((model / "tokenizer.json").read_text())
    spec["model"]["vocab"]["z"] = 600
    (model / "tokenizer.json").write_text(json.dumps(spec))
    tokenizer = AutoTokenizer.from_pretrained(model)
    vocab = AutoConfig.from_pretrained(model).vocab_size
    assert len(tokenizer) == vocab < 600 and tokenizer("zebra")["input_ids"][0] == 600
    rows = [json.loads(line) for line in (tiny_assets / "pairs_intel.jsonl").read_text().splitlines()[:8]]
    assert not any("z" in value for row in rows for value in row.values())
    rows[5]["rejected"] += " A zebra."
    (out / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return out, vocab


# The training batches, and (bnf_precompute_ref) the pass that scores the data once before training.
@pytest.mark.parametrize("precompute", [False, True], ids=["train-collator", "scoring-collator"])
def test_axolotl_train_stops_at_out_of_vocabulary_id(holed_tokenizer_assets, tiny_assets, tmp_path, precompute):
    assets, vocab = holed_tokenizer_assets
    cfg = base_config(tiny_assets, tmp_path, "bnf", base_model=str(assets / "model"), shuffle_merged_datasets=False,
                      bnf_precompute_ref=precompute,
                      datasets=[{"path": str(assets / "data.jsonl"), "ds_type": "json", "type": "chatml.intel"}])
    proc = run_axolotl("train", cfg, tmp_path, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert f"example 5, response 1: token id 600 is outside the model's vocabulary of {vocab} tokens" in output, \
        output[-4000:]
    if precompute:
        assert "attach_reference_logps" in output  # raised while scoring, before the first training step
