"""Candidate (prompt + signed responses) -> the tokenized example rows the collator batches.

Chat candidates are rendered with the chat template (the tokenizer's, or Axolotl's `chat_template` /
`chat_template_jinja` choice): the prompt with the generation prompt, and each response as the text the
whole conversation adds after that prompt, so the completion is exactly what the template produces for
the assistant turn (trailing whitespace after a final EOS dropped). Text candidates are used as they are.
"""
from __future__ import annotations

from typing import Any

from .adapters import Candidate, Skip
from .tokenize import LengthPolicy, fit_length, tokenize_response

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


def _trim_after_eos(text: str, eos: str | None) -> str:
    stripped = text.rstrip()
    return stripped if eos and stripped.endswith(eos) else text


def render(candidate: Candidate, tokenizer, chat_template: str | None) -> tuple[str, list[tuple[str, int]]]:
    """(prompt text, [(completion text, sign)]) for a candidate."""
    if isinstance(candidate.prompt, str):
        return candidate.prompt, [(text, sign) for text, sign in candidate.responses]
    if not chat_template:
        raise Skip("no chat template")
    prompt = candidate.prompt
    prompt_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False,
                                                chat_template=chat_template)
    completions = []
    for message, sign in candidate.responses:
        full = tokenizer.apply_chat_template(prompt + [message], tokenize=False, chat_template=chat_template)
        if not full.startswith(prompt_text):
            raise Skip("template not prefix-stable")
        completions.append((_trim_after_eos(full[len(prompt_text):], tokenizer.eos_token), sign))
    return prompt_text, completions


def candidate_example(candidate: Candidate, tokenizer, chat_template: str | None, policy: LengthPolicy) -> dict[str, Any]:
    """One example row (or a dropped row naming why). Raises nothing for bad rows: they become statuses."""
    try:
        prompt_text, completions = render(candidate, tokenizer, chat_template)
    except Skip as skip:
        return dropped(skip.args[0])
    contents = [(r if isinstance(r, str) else r["content"]) for r, _ in candidate.responses]
    if any(not c.strip() for c in contents):
        return dropped("empty completion")
    if candidate.paired and contents[0] == contents[1]:
        return dropped("chosen == rejected")
    responses, status = [], "kept"
    for text, _ in completions:
        resp, note = fit_length(tokenize_response(tokenizer, prompt_text, text), policy, len(completions))
        if resp is None:
            return dropped(note)
        status = note or status
        responses.append(resp)
    return {
        "response_input_ids": [r.input_ids for r in responses],
        "response_prompt_len": [r.prompt_len for r in responses],
        "response_sign": [sign for _, sign in completions],
        "is_pair": candidate.paired,
        "length": sum(len(r.input_ids) for r in responses),
        STATUS: status,
    }
