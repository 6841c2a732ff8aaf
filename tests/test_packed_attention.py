"""Packed rows stay apart under every attention implementation and any number of rows per micro-batch.

For every batch the packing sampler produces (`multipack_real_batches`: several bins, each a row, per
micro-batch), every response's token log-probs in the packed batch must equal those of the response scored
alone: attention never crosses a response boundary. Checked with sdpa and eager (transformers' block-diagonal
mask from the position ids) and with transformers' flash-attention path as it selects it: its own
`_flash_attention_forward`, with flash-attention's two kernels replaced by exact PyTorch equivalents (no
flash-attn build runs on a CPU). With more than one row, that path only separates the responses when the batch
hands it `cu_seq_lens_q/k` and `max_length_q/k`: from position ids alone it derives them for one row only.
Axolotl's `sdpa_varlen` patch derives them from the position ids of all rows flattened, which the collator's
layout (every row, and its padding, starting at position 0) makes equal to the batch's own.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_packing import setup  # noqa: F401  (fixture)

from axolotl_bnf_plugin.data.collator import ResponseBatchCollator, response_rows
from axolotl_bnf_plugin.data.packing import EpochBins
from axolotl_bnf_plugin.model_io import response_token_logps


def _attend(q, k, v, causal, scale):
    """[L, H, D] each (k, v with fewer heads under grouped-query attention): one sequence's attention."""
    repeat = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         is_causal=causal, scale=scale)
    return out.transpose(0, 1)


class TorchFlashKernels:
    """flash_attn_func / flash_attn_varlen_func in PyTorch, recording which one transformers chose."""

    def __init__(self):
        self.calls = {"dense": 0, "varlen": 0}

    def dense(self, q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
        self.calls["dense"] += 1
        return torch.stack([_attend(q[i], k[i], v[i], causal, softmax_scale) for i in range(q.shape[0])])

    def varlen(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
               softmax_scale=None, causal=False):
        self.calls["varlen"] += 1
        assert isinstance(max_seqlen_q, int) and isinstance(max_seqlen_k, int)  # flash-attention takes ints
        assert torch.equal(cu_seqlens_q, cu_seqlens_k) and cu_seqlens_q.dtype == torch.int32
        cu = cu_seqlens_q.tolist()
        assert max(b - a for a, b in zip(cu, cu[1:])) == max_seqlen_q
        return torch.cat([_attend(q[a:b], k[a:b], v[a:b], causal, softmax_scale) for a, b in zip(cu, cu[1:])])


@pytest.fixture
def flash_attention_on_cpu(monkeypatch):
    """transformers' flash-attention path (`flash_attention_2`), running the PyTorch kernels above."""
    import transformers.modeling_flash_attention_utils as fa

    kernels = TorchFlashKernels()
    monkeypatch.setattr(fa, "_loaded_implementation", "flash_attention_2")
    monkeypatch.setattr(fa, "_flash_fn", kernels.dense)
    monkeypatch.setattr(fa, "_flash_varlen_fn", kernels.varlen)
    monkeypatch.setattr(fa, "_pad_fn", fa._pad_input)
    monkeypatch.setattr(fa, "_unpad_fn", fa._unpad_input)
    monkeypatch.setattr(fa, "_process_flash_kwargs_fn", fa._lazy_define_process_function(kernels.varlen))
    return kernels


def _sampler_batches(examples, capacity: int, bins_per_batch: int):
    lengths = [sum(len(ids) for ids in example["response_input_ids"]) for example in examples]
    sampler = EpochBins(lengths, capacity, bins_per_batch, processes=1, seed=0)
    return [[[examples[i] for i in bin_] for bin_ in batch] for batch in sampler]


def _response_logps(model, batch):
    with torch.no_grad():
        logp, _, _ = response_token_logps(model, batch, check_head=True)
    mask, dense = response_rows(batch, logp)
    return [dense[r][mask[r]] for r in range(mask.shape[0])]


@pytest.fixture
def axolotl_sdpa_varlen():
    """Axolotl's `sdpa_varlen` patch (on by default for sdpa + sample packing on CUDA), applied as Axolotl applies
    it: the registered `sdpa` attention and mask replaced. On CUDA it runs `varlen_attn` with boundaries derived
    from the position ids of all rows flattened; elsewhere it rebuilds the block-diagonal mask from them."""
    patch = pytest.importorskip("axolotl.monkeypatch.attention.sdpa_varlen")
    if not patch.patch_sdpa_varlen():
        pytest.skip("this torch has no varlen_attn: Axolotl does not apply the patch")
    yield patch
    patch.unpatch_sdpa_varlen()


@pytest.mark.parametrize("attention", ["sdpa", "eager", "flash_attention_2", "axolotl_sdpa_varlen"])
def test_packed_responses_never_attend_to_each_other(setup, attention, request):  # noqa: F811
    tokenizer, examples, policy, _ = setup
    collate = ResponseBatchCollator(tokenizer)
    alone = _response_logps(policy, collate(examples))  # one response per row, padded, with its mask
    kernels = request.getfixturevalue("flash_attention_on_cpu") if attention == "flash_attention_2" else None
    if attention == "axolotl_sdpa_varlen":
        request.getfixturevalue("axolotl_sdpa_varlen")
        from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids
    policy.config._attn_implementation = "sdpa" if attention == "axolotl_sdpa_varlen" else attention
    try:
        lengths = sorted(sum(len(ids) for ids in e["response_input_ids"]) for e in examples)
        multi_row = 0
        for capacity in (lengths[-1], lengths[-1] + lengths[0], sum(lengths)):
            for bins_per_batch in (1, 2, 3):
                for features in _sampler_batches(examples, capacity, bins_per_batch):
                    batch = collate(features)
                    multi_row += batch["input_ids"].shape[0] > 1
                    if attention == "axolotl_sdpa_varlen":  # the boundaries its CUDA path derives: the batch's
                        (cu_q, _), (max_q, _) = prepare_fa_kwargs_from_position_ids(batch["position_ids"])
                        assert torch.equal(cu_q.int(), batch["cu_seq_lens_q"].int())
                        assert int(max_q) == batch["max_length_q"]
                    packed = _response_logps(policy, batch)
                    numbers = batch["response_index"].unique()
                    # The batch's responses are numbered in packing order; find each one's own number.
                    order = [e for bin_ in features for e in bin_]
                    expected = [alone[sum(len(x["response_sign"]) for x in examples[:examples.index(e)]) + j]
                                for e in order for j in range(len(e["response_sign"]))]
                    assert len(packed) == len(expected) == int((numbers >= 0).sum())
                    for got, want in zip(packed, expected):
                        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        assert multi_row > 0  # batches with several rows were checked
    finally:
        policy.config._attn_implementation = "sdpa"
    if kernels is not None:
        assert kernels.calls["varlen"] > 0 and kernels.calls["dense"] == 0


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_layout_noise_in_bf16_is_not_a_fall(setup, device):  # noqa: F811
    """The initial policy's scores taken unpacked (as `bnf_precompute_ref` and ASFT's baseline take them) and the
    same weights scored packed, as training runs, in bf16: at step 0 no chosen response counts as having gone
    down, whatever the layout noise (on a GPU, bf16 kernels differ by shape)."""
    import copy

    from axolotl_bnf_plugin.telemetry import shift_metrics

    tokenizer, examples, policy, _ = setup
    model = copy.deepcopy(policy).to(device=device, dtype=torch.bfloat16)
    collate = ResponseBatchCollator(tokenizer)
    lengths = sorted(sum(len(ids) for ids in e["response_input_ids"]) for e in examples)
    for features in _sampler_batches(examples, lengths[-1] + lengths[0], 2):
        order = [e for bin_ in features for e in bin_]
        packed, unpacked = (collate(b) for b in (features, order))
        now, start = (_response_logps(model, {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()})
                      for b in (packed, unpacked))
        width = max(len(t) for t in now)
        dense = [torch.stack([torch.nn.functional.pad(t, (0, width - len(t))) for t in ts]) for ts in (now, start)]
        mask = torch.stack([torch.arange(width, device=device) < len(t) for t in now])
        sign = unpacked["sign"].to(device).abs()  # every response counted as chosen
        metrics = shift_metrics(dense[0], dense[1], mask, sign, compute_dtype=torch.bfloat16)
        assert float(metrics["shift/chosen_down_frac"]) == 0.0
