"""Candidate (prompt + signed responses) -> the tokenized example rows the collator batches.

Chat candidates are rendered with the chat template (the tokenizer's, or Axolotl's `chat_template` /
`chat_template_jinja` choice): each response is the final turn of the whole conversation as the template
renders it, and the prompt the template's generation prompt before it (`tokenize.render_final_turn`
has the rules). Text candidates are used as they are.
"""
from __future__ import annotations

from typing import Any

from .adapters import Candidate, Skip
from .tokenize import LengthPolicy, fit_length, render_final_turn, tokenize_chat_turn, tokenize_response

STATUS = "bnf_status"
KEPT = ("kept", "truncated")


def dropped(reason: str) -> dict[str, Any]:
    return {
        "response_input_ids": [],
        "response_prompt_len": [],
        "response_sign": [],
        "is_pair": False,
        "length": 0,
        STATUS: reason,
    }


def render(candidate: Candidate, tokenizer, chat_template: str | None) -> list:
    """Per response: (prompt text, completion text, sign) for text candidates, or
    (`ChatTurnText`, sign) for chat candidates."""
    if isinstance(candidate.prompt, str):
        return [(candidate.prompt, text, sign) for text, sign in candidate.responses]
    if not chat_template:
        raise Skip("no chat template")
    return [(render_final_turn(tokenizer, chat_template, candidate.prompt, message, candidate.tools), sign)
            for message, sign in candidate.responses]


def _is_empty(response: str | dict) -> bool:
    """A response with nothing to train: blank text, or a turn with blank content that calls no tool."""
    if isinstance(response, str):
        return not response.strip()
    return not response["content"].strip() and not response.get("tool_calls")


def candidate_example(candidate: Candidate, tokenizer, chat_template: str | None, policy: LengthPolicy) -> dict[str, Any]:
    """One example row (or a dropped row naming why). Raises nothing for bad rows: they become statuses."""
    try:
        rendered = render(candidate, tokenizer, chat_template)
    except Skip as skip:
        return dropped(skip.args[0])
    if any(_is_empty(r) for r, _ in candidate.responses):
        return dropped("empty completion")
    # (chat responses compare as rendered: content, tool calls and reasoning, as the template writes them)
    completions = [item[1] if len(item) == 3 else item[0].completion for item in rendered]
    if candidate.paired and completions[0] == completions[1]:
        return dropped("chosen == rejected")
    responses, status = [], "kept"
    for item in rendered:
        tokenized = (tokenize_chat_turn(tokenizer, item[0]) if len(item) == 2
                     else tokenize_response(tokenizer, item[0], item[1]))
        resp, note = fit_length(tokenized, policy, len(rendered))
        if resp is None:
            return dropped(note)
        status = note or status
        responses.append(resp)
    return {
        "response_input_ids": [r.input_ids for r in responses],
        "response_prompt_len": [r.prompt_len for r in responses],
        "response_sign": [item[-1] for item in rendered],
        "is_pair": candidate.paired,
        "length": sum(len(r.input_ids) for r in responses),
        STATUS: status,
    }
