"""Packed batches (several responses per row, position ids restarting per response, no attention mask)
give the same loss, metrics and gradients as one response per row, for both methods."""
from __future__ import annotations

import pytest
import torch

from axolotl_bnf_plugin.data.adapters import Candidate
from axolotl_bnf_plugin.data.collator import ResponseBatchCollator, response_rows
from axolotl_bnf_plugin.data.examples import candidate_example
from axolotl_bnf_plugin.data.tokenize import LengthPolicy
from axolotl_bnf_plugin.tiny import build_model, build_tokenizer, toy_pairs
from axolotl_bnf_plugin.methods import batch_normalizer
from axolotl_bnf_plugin.methods.asft import ASFT
from axolotl_bnf_plugin.methods.bnf import BNF
from axolotl_bnf_plugin.step_loss import LossSettings, batch_loss


@pytest.fixture(scope="module")
def setup():
    rows = toy_pairs(8, seed=3)
    tokenizer = build_tokenizer(rows)
    policy = LengthPolicy(256, "drop")

    def example(candidate):
        out = candidate_example(candidate, tokenizer, tokenizer.chat_template, policy)
        assert out["bnf_status"] == "kept"
        return out

    def chat(row):
        return [{"role": "system", "content": row["system"]}, {"role": "user", "content": row["question"]}]

    examples = [
        example(Candidate(chat(rows[0]), [({"role": "assistant", "content": rows[0]["chosen"]}, 1),
                                          ({"role": "assistant", "content": rows[0]["rejected"]}, -1)], True)),
        example(Candidate(chat(rows[1]), [({"role": "assistant", "content": rows[1]["rejected"]}, -1)], False)),
        example(Candidate(rows[2]["question"], [(" " + rows[2]["chosen"], 1), (" " + rows[2]["rejected"], -1)], True)),
        example(Candidate(chat(rows[3]), [({"role": "assistant", "content": rows[3]["chosen"] * 2}, 1)], False)),
        example(Candidate(chat(rows[4]), [({"role": "assistant", "content": rows[4]["chosen"]}, 1),
                                          ({"role": "assistant", "content": rows[4]["rejected"][:20]}, -1)], True)),
    ]
    policy_model = build_model(len(tokenizer), seed=1).float()
    reference = build_model(len(tokenizer), seed=2).float().eval()
    return tokenizer, examples, policy_model, reference


def _run(model, reference, batch, settings):
    model.zero_grad()
    loss, metrics = batch_loss(model, batch, settings, reference=reference)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return loss.detach(), metrics, grads


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("settings", [LossSettings("bnf"), LossSettings(BNF(length_norm="batch_min")),
                                      LossSettings(ASFT(lam=0.7, beta=1.3, sft_weight=0.5))],
                         ids=["bnf", "bnf-batch_min", "asft"])
def test_packed_equals_unpacked(setup, settings, attn):
    tokenizer, examples, model, reference = setup
    model.config._attn_implementation = attn
    reference.config._attn_implementation = attn
    collate = ResponseBatchCollator(tokenizer, pad_to_multiple_of=8)
    unpacked = collate(examples)
    packed = collate([examples[:2], examples[2:4], examples[4:]])
    assert packed["input_ids"].shape[0] == 3 and "attention_mask" not in packed
    assert unpacked["input_ids"].shape[0] == 8
    assert torch.equal(packed["sign"], unpacked["sign"]) and torch.equal(packed["pair_ids"], unpacked["pair_ids"])

    loss_u, metrics_u, grads_u = _run(model, reference, unpacked, settings)
    loss_p, metrics_p, grads_p = _run(model, reference, packed, settings)
    torch.testing.assert_close(loss_p, loss_u, rtol=1e-5, atol=1e-6)
    for name in metrics_u:
        torch.testing.assert_close(metrics_p[name], metrics_u[name], rtol=1e-5, atol=1e-5)
        assert torch.equal(metrics_p.counts[name], metrics_u.counts[name])
    for name in grads_u:
        torch.testing.assert_close(grads_p[name], grads_u[name], rtol=1e-4, atol=1e-6)


def test_packing_without_isolation_would_differ(setup):
    """The equality above is not vacuous: attending across responses changes the loss."""
    tokenizer, examples, model, reference = setup
    model.config._attn_implementation = "sdpa"
    collate = ResponseBatchCollator(tokenizer)
    unpacked = collate(examples)
    leaky = collate([examples[:2], examples[2:4], examples[4:]])
    leaky["attention_mask"] = (leaky["response_index"] >= 0).long()  # a plain mask: no block boundaries
    settings = LossSettings("asft")
    with torch.no_grad():
        loss_u, _ = batch_loss(model, unpacked, settings)
        loss_l, _ = batch_loss(model, leaky, settings)
    assert abs(loss_u.item() - loss_l.item()) > 1e-3


def test_response_rows_are_identical_for_both_layouts(setup):
    tokenizer, examples, _, _ = setup
    collate = ResponseBatchCollator(tokenizer)
    unpacked, packed = collate(examples), collate([examples[:3], examples[3:]])
    values_u = torch.arange(unpacked["labels"].numel(), dtype=torch.float32).view_as(unpacked["labels"])
    # The value at each position is a function of (response, position-in-response): the same in both layouts.
    def positional(batch):
        return (batch["response_index"] * 1000 + batch["position_ids"]).float()
    mask_u, vals_u = response_rows(unpacked, positional(unpacked))
    mask_p, vals_p = response_rows(packed, positional(packed))
    # Rows are as wide as the batch's rows; beyond the longest response both are empty.
    width = min(mask_u.shape[1], mask_p.shape[1])
    assert not mask_u[:, width:].any() and not mask_p[:, width:].any()
    assert torch.equal(mask_u[:, :width], mask_p[:, :width]) and torch.equal(vals_u[:, :width], vals_p[:, :width])
    lengths = [len(ids) - max(p, 1) for ex in examples for ids, p in zip(ex["response_input_ids"], ex["response_prompt_len"])]
    assert mask_u.sum(1).tolist() == lengths
    assert values_u.shape == unpacked["labels"].shape


def test_triton_and_torch_give_the_same_training_loss(setup):
    """The whole trainer loss (policy + reference, packed batch) through both kernel implementations."""
    from axolotl_bnf_plugin.kernels import triton_available

    if not triton_available(torch.device("cpu")) and not torch.cuda.is_available():
        pytest.skip("Triton cannot run here")
    tokenizer, examples, model, reference = setup
    model.config._attn_implementation = reference.config._attn_implementation = "sdpa"
    packed = ResponseBatchCollator(tokenizer)([examples[:3], examples[3:]])
    loss_t, metrics_t, grads_t = _run(model, reference, packed, LossSettings("bnf", impl="torch", chunk_size=64))
    loss_x, metrics_x, grads_x = _run(model, reference, packed, LossSettings("bnf", impl="triton", chunk_size=64))
    torch.testing.assert_close(loss_x, loss_t, rtol=1e-5, atol=1e-6)
    for name in metrics_t:
        torch.testing.assert_close(metrics_x[name], metrics_t[name], rtol=1e-5, atol=1e-5)
    for name in grads_t:
        torch.testing.assert_close(grads_x[name], grads_t[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
def test_precomputed_reference_equals_live_reference(setup, packed):
    """bnf_precompute_ref: the initial policy's log-probs, stored per response, give the live loss."""
    import copy

    from datasets import Dataset

    from axolotl_bnf_plugin.reference import REF_COLUMN, ScoresByExample, initial_policy_scores, with_reference_logps

    tokenizer, examples, model, _ = setup
    model.config._attn_implementation = "sdpa"
    collate = ResponseBatchCollator(tokenizer)
    dataset = Dataset.from_list(examples)
    with_ref = with_reference_logps(dataset, model, collate, batch_size=2, device="cpu", cache_dir=None)
    assert [len(r) for r in with_ref[REF_COLUMN]] == [len(e["response_sign"]) for e in examples]
    # The policy moves away from its initial weights (as after some training), so that margins are not
    # exactly zero and knife-edge metrics (accuracy of a zero margin) compare meaningfully.
    frozen = copy.deepcopy(model).eval()
    policy = copy.deepcopy(model)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    rows = list(with_ref)
    batch_pre = collate([rows[:2], rows[2:]] if packed else rows)
    batch_live = collate([examples[:2], examples[2:]] if packed else examples)
    assert "ref_logps" in batch_pre and "ref_logps" not in batch_live
    # The trainer's route: the scores handed to the collator, looked up by example id (ids in another order
    # than the data's, as a shuffled split has them), give the same batch.
    ids = [10, 3, 7, 0, 5, 1, 2, 4, 6, 8][: len(examples)]
    lookup = ScoresByExample()
    lookup.add(ids, initial_policy_scores(model, dataset, collate, batch_size=2, device="cpu"))
    by_id = ResponseBatchCollator(tokenizer, initial_scores=lookup)
    with_ids = [{**e, "example_id": i} for e, i in zip(examples, ids)]
    looked_up = by_id([with_ids[:2], with_ids[2:]] if packed else with_ids)
    torch.testing.assert_close(looked_up["ref_logps"], batch_pre["ref_logps"], rtol=0, atol=0)
    assert lookup(99) is None and "ref_logps" not in by_id([{**examples[0], "example_id": 99}])
    settings = LossSettings("bnf")
    loss_pre, metrics_pre, grads_pre = _run(policy, None, batch_pre, settings)
    loss_live, metrics_live, grads_live = _run(policy, frozen, batch_live, settings)
    assert float(metrics_live["rewards/margins"]) != 0.0
    torch.testing.assert_close(loss_pre, loss_live, rtol=1e-5, atol=1e-6)
    for name in metrics_live:
        torch.testing.assert_close(metrics_pre[name], metrics_live[name], rtol=1e-4, atol=1e-5)
    for name in grads_live:
        torch.testing.assert_close(grads_pre[name], grads_live[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["bnf", "asft"])
def test_step_normalizer_makes_unequal_micro_batches_add_up(setup, method):
    """Micro-batches with different n (as packing produces), each divided by the step's total n, sum to
    the gradient of the whole step as one batch; dividing each by its own n (then averaging) does not."""
    tokenizer, examples, model, reference = setup
    collate = ResponseBatchCollator(tokenizer)
    settings = LossSettings(method)
    whole = collate(examples)
    parts = [collate(examples[:1]), collate(examples[1:])]  # n = 1 and n = 4
    _, _, g_whole = _run(model, reference, whole, settings)

    model.zero_grad()
    n_step = sum(float(batch_normalizer(p["pair_ids"], p["sign"].shape[0])) for p in parts)
    for part in parts:
        loss, _ = batch_loss(model, part, settings, reference=reference, normalizer=n_step)
        loss.backward()
    g_step = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name in g_whole:
        torch.testing.assert_close(g_step[name], g_whole[name], rtol=1e-4, atol=1e-6)

    model.zero_grad()
    for part in parts:
        loss, _ = batch_loss(model, part, settings, reference=reference)
        (loss / len(parts)).backward()
    g_avg = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert max((g_avg[n] - g_whole[n]).abs().max().item() for n in g_whole) > 1e-4
