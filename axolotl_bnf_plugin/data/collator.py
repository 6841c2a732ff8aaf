"""Batch examples into the per-response layout the BNF/ASFT trainer consumes.

Each example contributes its responses as rows; a pair's two rows share a pair id (unique within the
batch), an unpaired response gets -1. Labels are -100 on prompt and padding tokens, so only completion
tokens are scored; the trainer shifts them by one position.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

IGNORE_INDEX = -100


@dataclass
class ResponseBatchCollator:
    tokenizer: Any
    padding: bool | str = True
    pad_to_multiple_of: int | None = None
    return_tensors: str = "pt"

    def __post_init__(self):
        if self.return_tensors != "pt":
            raise ValueError(f"ResponseBatchCollator returns PyTorch tensors only, not {self.return_tensors!r}")
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.tokenizer.eos_token_id
        if self.pad_id is None:
            raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad with; set `special_tokens: {pad_token: ...}`")

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        sequences, prompt_lens, signs, pair_ids = [], [], [], []
        for idx, example in enumerate(examples):
            for ids, plen, sign in zip(example["response_input_ids"], example["response_prompt_len"], example["response_sign"]):
                sequences.append(ids)
                prompt_lens.append(plen)
                signs.append(sign)
                pair_ids.append(idx if example["is_pair"] else -1)
        width = max(len(s) for s in sequences)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        rows = len(sequences)
        input_ids = torch.full((rows, width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((rows, width), dtype=torch.long)
        labels = torch.full((rows, width), IGNORE_INDEX, dtype=torch.long)
        for r, (ids, plen) in enumerate(zip(sequences, prompt_lens)):
            ids_t = torch.as_tensor(ids, dtype=torch.long)
            input_ids[r, : len(ids)] = ids_t
            attention_mask[r, : len(ids)] = 1
            labels[r, plen : len(ids)] = ids_t[plen:]
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "sign": torch.as_tensor(signs, dtype=torch.long),
            "pair_ids": torch.as_tensor(pair_ids, dtype=torch.long),
        }
