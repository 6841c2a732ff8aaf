"""Batch examples into the rows the model sees, and say which response every token belongs to.

Unpacked (the default), each response is its own row, right-padded, with an attention mask. With
`sample_packing: true`, Axolotl's multipack sampler hands over bins of examples; all responses of a bin
are concatenated into one row, and `position_ids` restart at 0 for every response. No attention mask is
given then: the model's attention keeps the responses apart from the position ids (transformers builds a
block-diagonal causal mask from them) and, under varlen kernels such as flash-attention, from the batch's
sequence boundaries (`cu_seq_lens_q/k`, `max_length_q/k`, see `varlen_boundaries`).

With `bnf_precompute_ref` (and ASFT's shift baseline), the batch also carries the responses' reference
log-probs, laid out like the labels in `ref_logps`: from the examples' own `ref_logps` column, or looked up by
example id in the scores the trainer hands the collator (`initial_scores`). Either way the batch carries, per token, `response_index` (which response, -1 for padding) and, per
response, its `sign` (+1 / -1) and `pair_ids` (a pair's two responses share an id unique in the batch;
-1 = unpaired). Labels are -100 on prompt and padding tokens and on the first token of every response
(which has no predecessor inside its own sequence), so packed and unpacked batches score exactly the
same tokens.
"""
from __future__ import annotations

from dataclasses import InitVar, dataclass
from typing import Any

import torch

IGNORE_INDEX = -100
# The initial policy's log-probs: an example's column (one list per response, one value per scored token,
# `reference.py`) and the batch's key (laid out like the labels).
REF_LOGPS = "ref_logps"


@dataclass
class ResponseBatchCollator:
    tokenizer: Any
    # Axolotl's collator builder always passes `padding=True`; rows are always padded to the longest, so
    # the value is accepted and not kept.
    padding: InitVar[bool | str] = True
    pad_to_multiple_of: int | None = None
    return_tensors: str = "pt"
    # Rows of the model's output embedding (set by the trainer). The fused op indexes it with the labels
    # without a range check of its own (on CUDA an out-of-range id is an out-of-bounds read), so every id
    # is checked here, on the CPU, where the failing example can still be named.
    vocab_size: int | None = None
    # The initial policy's scores looked up by example id (`reference.ScoresByExample`, set by the trainer
    # once they are scored), for examples that carry no `ref_logps` of their own.
    initial_scores: Any = None

    def __post_init__(self, padding):
        if self.return_tensors != "pt":
            raise ValueError(f"ResponseBatchCollator returns PyTorch tensors only, not {self.return_tensors!r}")
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.tokenizer.eos_token_id
        if self.pad_id is None:
            raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad with; set `special_tokens: {pad_token: ...}`")

    def __call__(self, features: list[dict[str, Any]] | list[list[dict[str, Any]]]) -> dict[str, torch.Tensor]:
        packed = bool(features) and isinstance(features[0], list)
        bins = features if packed else [[example] for example in features]
        rows: list[list[tuple]] = []  # per row: (token ids, prompt length, response number, reference log-probs)
        signs, pair_ids, example_ids = [], [], []
        example_number = 0
        for bin_ in bins:
            row: list[tuple] = []
            for example in bin_:
                pair_id = example_number if example["is_pair"] else -1
                example_number += 1
                example_ids.append(int(example.get("example_id", -1)))
                refs = example.get(REF_LOGPS)
                if refs is None and self.initial_scores is not None:
                    refs = self.initial_scores(example_ids[-1])
                refs = refs if refs is not None else [None] * len(example["response_sign"])
                for ids, plen, sign, ref in zip(example["response_input_ids"], example["response_prompt_len"],
                                                example["response_sign"], refs):
                    segment = (list(ids), int(plen), len(signs), ref)
                    signs.append(int(sign))
                    pair_ids.append(pair_id)
                    if packed:
                        row.append(segment)
                    else:
                        rows.append([segment])
            if packed:
                rows.append(row)
        batch = self._tensors(rows, signs, pair_ids, packed)
        batch["example_ids"] = torch.as_tensor(example_ids, dtype=torch.long)
        from ..methods.common import batch_normalizer

        # The batch's n (pairs + unpaired responses) as a Python number, so that the trainer can add up an
        # optimiser step's n without a device sync per micro-batch.
        batch[NORMALIZER_UNITS] = float(batch_normalizer(batch["pair_ids"], len(signs)))
        if self.vocab_size is not None:
            ids = batch["input_ids"]
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
                self._raise_out_of_vocab([example for bin_ in bins for example in bin_])
        return batch

    def _raise_out_of_vocab(self, examples: list[dict[str, Any]]) -> None:
        """Name the first example (and response) holding a token id outside [0, vocab_size)."""
        fix = ("the tokenizer produces ids the model's output embedding has no row for (it has more tokens, or "
               "higher ids, than the model): resize the model's embeddings to cover every id the tokenizer "
               "produces (`model.resize_token_embeddings(...)`, then save it), or check that the tokenizer "
               "(`tokenizer_config`) belongs to this model")
        for example in examples:
            for number, ids in enumerate(example["response_input_ids"]):
                bad = [int(i) for i in ids if not 0 <= int(i) < self.vocab_size]
                if bad:
                    raise ValueError(
                        f"example {int(example.get('example_id', -1))}, response {number}: token id {bad[0]} is "
                        f"outside the model's vocabulary of {self.vocab_size} tokens; {fix}"
                    )
        raise ValueError(f"the padding token id {self.pad_id} is outside the model's vocabulary of "
                         f"{self.vocab_size} tokens; {fix}")

    def _tensors(self, rows, signs, pair_ids, packed: bool) -> dict[str, torch.Tensor]:
        width = max(sum(len(segment[0]) for segment in row) for row in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        shape = (len(rows), width)
        input_ids = torch.full(shape, self.pad_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        response_index = torch.full(shape, -1, dtype=torch.long)
        # Padding gets positions of its own (0, 1, ...), so in a packed row it forms a separate block.
        position_ids = torch.arange(width).repeat(len(rows), 1)
        attention_mask = torch.zeros(shape, dtype=torch.long)
        has_ref = all(segment[3] is not None for row in rows for segment in row)
        ref_logps = torch.zeros(shape, dtype=torch.float32) if has_ref else None
        segments: list[int] = []  # lengths of the rows' sequences (responses, trailing padding), flattened
        for r, row in enumerate(rows):
            start = 0
            for ids, plen, number, ref in row:
                stop = start + len(ids)
                segments.append(len(ids))
                ids_t = torch.as_tensor(ids, dtype=torch.long)
                input_ids[r, start:stop] = ids_t
                labels[r, start + max(plen, 1):stop] = ids_t[max(plen, 1):]
                if has_ref:  # position t holds the reference log-prob of the label at t + 1
                    ref_logps[r, start + max(plen, 1) - 1:stop - 1] = torch.as_tensor(ref, dtype=torch.float32)
                response_index[r, start:stop] = number
                position_ids[r, start:stop] = torch.arange(len(ids))
                attention_mask[r, start:stop] = 1
                start = stop
            position_ids[r, start:] = torch.arange(width - start)
            if width > start:
                segments.append(width - start)
        # Flat indices of the positions that score a label (position t scores label t + 1), computed
        # here on the CPU so the fused op and the re-layout need no device-to-host synchronisation.
        scored_index = (labels[:, 1:] != IGNORE_INDEX).nonzero()
        scored_flat = scored_index[:, 0] * width + scored_index[:, 1]
        batch = {
            "input_ids": input_ids,
            "labels": labels,
            "scored_index": scored_flat,
            SCORED_LENGTHS: scored_lengths(response_index, scored_flat, len(signs)),
            "position_ids": position_ids,
            "response_index": response_index,
            "sign": torch.as_tensor(signs, dtype=torch.long),
            "pair_ids": torch.as_tensor(pair_ids, dtype=torch.long),
        }
        if not packed:
            batch["attention_mask"] = attention_mask
        else:
            batch.update(varlen_boundaries(segments))
        if has_ref:
            batch[REF_LOGPS] = ref_logps
        return batch


# Scored tokens of each response, in response order (= the order of their rows in the fused op), as host
# integers: a gradient rule over whole responses cuts the op's blocks at their boundaries with no device sync.
SCORED_LENGTHS = "scored_lengths"


def scored_lengths(response_index: torch.Tensor, scored_flat: torch.Tensor, num_responses: int) -> list[int]:
    """How many scored positions each response has (position t scores label t + 1, of response
    `response_index` at t + 1); responses are laid out in order, so each one's positions are consecutive."""
    response = response_index.view(-1)[scored_flat + 1]
    return torch.bincount(response, minlength=num_responses).tolist()


NORMALIZER_UNITS = "normalizer_units"
VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def varlen_boundaries(segments: list[int]) -> dict[str, Any]:
    """A packed batch's sequences as varlen attention arguments, over the batch's rows flattened into one.

    Under a varlen kernel (flash-attention, xformers) the model is run on the rows as one row with these
    boundaries (`model_io.forward_hidden`): from `position_ids` transformers derives them for one row only, and
    it would need a device sync to do so. The lengths are known here, on the CPU. The maximum length is a
    Python int, as flash-attention takes it.
    """
    cu = torch.zeros(len(segments) + 1, dtype=torch.int32)
    cu[1:] = torch.as_tensor(segments, dtype=torch.int32).cumsum(0)
    longest = max(segments, default=0)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu.clone(), "max_length_q": longest, "max_length_k": longest}


def response_rows(batch: dict[str, torch.Tensor], *token_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Re-lay per-position values `[rows, T]` (position t scores label t + 1) as one row per response.

    Returns `(mask, *values)`, each `[num_responses, T]`, with a response's j-th scored token at its own
    position j, so packed and unpacked batches give identical `[B, T]` inputs to the losses.
    Differentiable w.r.t. the values.
    """
    rows, width = batch["labels"].shape
    scored = batch["scored_index"]
    # The label scored at flat position i sits at i + 1: its response and its position in that response.
    index = (batch["response_index"].view(-1)[scored + 1], batch["position_ids"].view(-1)[scored + 1])
    num_responses = batch["sign"].shape[0]
    mask = torch.zeros(num_responses, width, dtype=torch.bool, device=scored.device)
    mask[index] = True
    out = [mask]
    for values in token_values:
        dense = values.new_zeros(num_responses, width)
        out.append(dense.index_put(index, values.reshape(-1)[scored]))
    return tuple(out)


def per_position(batch: dict[str, torch.Tensor], response_values: torch.Tensor) -> torch.Tensor:
    """`[rows, T]` per-position values (position t scores label t + 1) from one value per response.

    The inverse direction of `response_rows`: every scored position gets its response's value, every other
    position 0. Used to hand BNF's per-response gradient scale to the fused op in its own layout.
    """
    rows, width = batch["labels"].shape
    scored = batch["scored_index"]
    response = batch["response_index"].view(-1)[scored + 1]
    out = response_values.new_zeros(rows * width)
    return out.index_put((scored,), response_values[response]).view(rows, width)


def leading_examples(batch: dict[str, torch.Tensor], keep: int) -> dict[str, torch.Tensor]:
    """The first `keep` examples of an unpacked collated batch, as the collator would have batched them.

    Rows are responses in example order; a pair's two responses share a pair id, any other example has
    one response. So the examples' responses are a prefix of the rows (trailing padding columns are harmless).
    """
    pair_ids = batch["pair_ids"]
    starts = torch.ones_like(pair_ids, dtype=torch.bool)
    starts[1:] = (pair_ids[1:] < 0) | (pair_ids[1:] != pair_ids[:-1])
    example = starts.cumsum(0) - 1
    if int(example[-1]) + 1 != batch["example_ids"].numel():
        raise RuntimeError("cannot tell which responses belong to which example in this batch")
    rows, width = batch["labels"].shape
    kept_rows = int((example < keep).sum())
    out = {}
    for key, value in batch.items():
        if key == "example_ids":
            out[key] = value[:keep]
        elif key == "scored_index":
            out[key] = value[value < kept_rows * width]
        elif key == SCORED_LENGTHS:  # one per response, and unpacked responses are rows
            out[key] = value[:kept_rows]
        elif torch.is_tensor(value) and value.dim() and value.shape[0] == rows:
            out[key] = value[:kept_rows]
        else:
            out[key] = value
    return out
