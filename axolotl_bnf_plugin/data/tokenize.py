"""Prompt + completion text -> token ids with an exact prompt/completion boundary.

The completion is scored on the tokens the full text tokenizes to: the prompt and the prompt followed by
the completion are tokenized, and when the first is a prefix of the second (the normal case) the
boundary sits right there, so the completion's first token is what the whole conversation produces.
When a tokenizer merges across the boundary, the two parts are tokenized separately and concatenated
(what TRL does), so no prompt token is ever scored. The tokenizer's BOS is added once (not when the
prompt text already starts with it), and EOS closes every completion exactly once.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TokenizedResponse:
    input_ids: list[int]
    prompt_len: int

    @property
    def completion_len(self) -> int:
        return len(self.input_ids) - self.prompt_len


class LengthPolicy:
    """`excess_length_strategy`: drop (default), truncate (the completion), or raise.

    Unpacked, `sequence_len` bounds each response (prompt + completion). With sample packing an example
    is never split across packed rows, so its responses share one row: each gets `sequence_len // k`.
    """

    CHOICES = ("drop", "truncate", "raise")

    def __init__(self, sequence_len: int, strategy: str | None, packing: bool = False):
        self.sequence_len = int(sequence_len)
        self.packing = bool(packing)
        self.strategy = (strategy or "drop").lower()
        if self.strategy not in self.CHOICES:
            raise ValueError(f"excess_length_strategy must be one of {self.CHOICES}, got {strategy!r}")

    def budget(self, num_responses: int) -> int:
        return self.sequence_len // num_responses if self.packing else self.sequence_len


def _encode(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def tokenize_response(tokenizer, prompt: str, completion: str) -> TokenizedResponse:
    """Token ids of `prompt + completion` (+ EOS once) and where the completion starts."""
    bos = tokenizer.bos_token
    add_special = not (bos and prompt.startswith(bos))
    prompt_ids = _encode(tokenizer, prompt, add_special)
    full_ids = _encode(tokenizer, prompt + completion, add_special)
    eos_id = tokenizer.eos_token_id
    # Tokenizers that append EOS themselves would put one at the end of the prompt; drop it there.
    if eos_id is not None and prompt_ids and prompt_ids[-1] == eos_id and not prompt.endswith(tokenizer.eos_token or "\0"):
        prompt_ids = prompt_ids[:-1]
        full_ids = full_ids[:-1] if full_ids and full_ids[-1] == eos_id else full_ids
    if full_ids[: len(prompt_ids)] == prompt_ids:
        ids = full_ids
    else:
        ids = prompt_ids + _encode(tokenizer, completion, add_special_tokens=False)
    if eos_id is not None and (len(ids) == len(prompt_ids) or ids[-1] != eos_id):
        ids = ids + [eos_id]
    return TokenizedResponse(ids, len(prompt_ids))


def fit_length(resp: TokenizedResponse, policy: LengthPolicy, num_responses: int = 1) -> tuple[TokenizedResponse | None, str | None]:
    """Apply the length policy: (response, None), (truncated response, "truncated"), or (None, reason)."""
    budget = policy.budget(num_responses)
    if len(resp.input_ids) <= budget:
        return resp, None
    if policy.strategy == "raise":
        where = f"sequence_len={policy.sequence_len}" + (f" shared by {num_responses} packed responses" if policy.packing else "")
        raise ValueError(
            f"a response is {len(resp.input_ids)} tokens, over {budget} ({where}); set "
            "`excess_length_strategy: drop` or `truncate` to handle long rows"
        )
    if policy.strategy == "truncate" and resp.prompt_len < budget:
        return TokenizedResponse(resp.input_ids[:budget], resp.prompt_len), "truncated"
    return None, "too long"
