"""Agent and reasoning conversations through Axolotl's shipped tool-capable chat templates.

Each template renders four kinds of rows, with a tokenizer carrying its family's special tokens (built
locally, `tiny.build_chat_tokenizer`):

- `tool call`: the final assistant turn is a tool call (content null); chosen and rejected differ only in
  the call (another function, or other arguments);
- `tool results`: an earlier call and its result are in the history, the final turn answers in text;
- `tools schema`: the row's `tools` column, which the template prints into the prompt;
- `reasoning`: the final turn carries `reasoning_content` after an earlier turn that also has some.

A kept response must be the template's own tokenization of the whole conversation (with `tools=`), cut
after the final turn's end of turn; its prompt the template's generation prompt (up to where the final
turn opens differently); the call in the completion; the tools in the prompt exactly once and never in the
completion; the final turn's reasoning in the completion. A template that cannot write a row (it refuses
the `tool` role, ignores tools or calls, or drops the final reasoning) costs that row, with a reason.
`EXPECTED` below is the outcome per template; the docs' table is this one.
"""
from __future__ import annotations

import json
from functools import lru_cache

import pytest

from axolotl.utils.chat_templates import get_chat_template
from axolotl_bnf_plugin.data.adapters import Fields, convert_pairs
from axolotl_bnf_plugin.data.examples import candidate_example
from axolotl_bnf_plugin.data.tokenize import LengthPolicy
from axolotl_bnf_plugin.tiny import build_chat_tokenizer

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_local_time", "description": "Local time in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TOOLS = [WEATHER, TIME]
DESCRIPTIONS = ["Current weather in a city.", "Local time in a city."]
ASK, ASK_AGAIN = "What is the weather in Paris?", "And in Rome?"
RESULT, ANSWER = "sunny and 21 degrees", "It is sunny in Paris, 21 degrees."
GOOD_TEXT, BAD_TEXT = "Rome is cloudy and 17 degrees.", "Rome is always sunny."
EARLIER_THOUGHT, FINAL_THOUGHT = "the tool answered for Paris", "the user now wants Rome; the tool said cloudy"


def call(name: str, arguments, call_id: str) -> dict:
    """An OpenAI-style call; ids of nine alphanumerics, as Mistral's templates require."""
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def assistant_calls(*calls) -> dict:
    return {"role": "assistant", "content": None, "tool_calls": list(calls)}


# The history with an earlier call and its result (arguments as JSON text, as OpenAI logs store them).
TOOL_HISTORY = [
    {"role": "user", "content": ASK},
    assistant_calls(call("get_weather", json.dumps({"city": "Paris"}), "call00001")),
    {"role": "tool", "tool_call_id": "call00001", "name": "get_weather", "content": RESULT},
    {"role": "assistant", "content": ANSWER},
    {"role": "user", "content": ASK_AGAIN},
]


def rows() -> dict[str, dict]:
    final_call = [{"role": "user", "content": ASK}]
    return {
        "tool call": {  # the same function with other arguments, and another function
            "chosen": final_call + [assistant_calls(call("get_weather", {"city": "Paris"}, "call00002"))],
            "rejected": final_call + [assistant_calls(call("get_local_time", {"city": "Paris"}, "call00002"))],
        },
        "tool results": {
            "chosen": TOOL_HISTORY + [{"role": "assistant", "content": GOOD_TEXT}],
            "rejected": TOOL_HISTORY + [{"role": "assistant", "content": BAD_TEXT}],
        },
        "tools schema": {
            "chosen": TOOL_HISTORY[:1] + [assistant_calls(call("get_weather", {"city": "Paris"}, "call00002"))],
            "rejected": TOOL_HISTORY[:1] + [{"role": "assistant", "content": BAD_TEXT}],
            "tools": json.dumps(TOOLS),  # a JSON string column, as many public sets store it
        },
        "reasoning": {
            "chosen": [{"role": "user", "content": ASK},
                       {"role": "assistant", "content": ANSWER, "reasoning_content": EARLIER_THOUGHT},
                       {"role": "user", "content": ASK_AGAIN},
                       {"role": "assistant", "content": GOOD_TEXT, "reasoning_content": FINAL_THOUGHT}],
            "rejected": [{"role": "user", "content": ASK},
                         {"role": "assistant", "content": ANSWER, "reasoning_content": EARLIER_THOUGHT},
                         {"role": "user", "content": ASK_AGAIN},
                         {"role": "assistant", "content": BAD_TEXT, "reasoning_content": FINAL_THOUGHT}],
        },
    }


KINDS = ["tool call", "tool results", "tools schema", "reasoning"]
KEPT = "kept"
IGNORES_CALLS, IGNORES_TOOLS = "chat template ignores tool_calls", "chat template ignores tools"
IGNORES_REASONING = "chat template ignores the final turn's reasoning_content"

# template -> (tokenizer family, {kind: outcome}); a kind not listed is kept.
EXPECTED = {
    "llama3_2_vision": ("llama3", {"reasoning": IGNORES_REASONING}),  # Llama 3.1 / 3.2's tool format
    "llama4": ("llama4", {"reasoning": IGNORES_REASONING}),
    "qwen_25": ("qwen_25", {"reasoning": IGNORES_REASONING}),  # Hermes-style chatml with <tool_call>
    "qwen3": ("qwen3", {}),
    "qwen3_5": ("qwen3", {}),
    "mistral_v3_tekken": ("mistral_v3_tekken", {"reasoning": IGNORES_REASONING}),
    "mistral_v7_tekken": ("mistral_v7_tekken", {
        "tool call": IGNORES_CALLS, "tool results": "chat template: Only user, system and assistant roles are supported!",
        "tools schema": IGNORES_TOOLS, "reasoning": IGNORES_REASONING}),
    "command_a_tool_use": ("command_a", {"reasoning": IGNORES_REASONING}),  # (its own plan field, tool_plan)
    "command_a": ("command_a", {"tool call": IGNORES_CALLS, "tool results": IGNORES_CALLS, "tools schema": IGNORES_TOOLS,
                                "reasoning": IGNORES_REASONING}),
    "deepseek_v3": ("deepseek_v3", {"tools schema": IGNORES_TOOLS, "reasoning": IGNORES_REASONING}),
    "phi_4": ("phi_4", {"tool call": IGNORES_CALLS, "tool results": IGNORES_CALLS, "tools schema": IGNORES_TOOLS,
                        "reasoning": IGNORES_REASONING}),
    "gemma3": ("gemma3", {"tool call": IGNORES_CALLS,
                          "tool results": "chat template: Conversation roles must alternate user/assistant/user/assistant/...",
                          "tools schema": IGNORES_TOOLS, "reasoning": IGNORES_REASONING}),
    "gemma4": ("gemma4", {"reasoning": IGNORES_REASONING}),  # (it writes reasoning on tool-call turns only)
}


@lru_cache(maxsize=None)
def tokenizer_for(family: str):
    return build_chat_tokenizer(family, vocab_size=1200)


def outcome(template_name: str, kind: str) -> tuple[dict, dict]:
    family, _ = EXPECTED[template_name]
    tok, template = tokenizer_for(family), get_chat_template(template_name)
    row = rows()[kind]
    candidate = convert_pairs(row, Fields())
    return row, candidate_example(candidate, tok, template, LengthPolicy(8192, "drop"))


def test_expected_outcomes_are_what_the_templates_do():
    """The matrix, as a table: what each template does with each kind of row."""
    observed = {(name, kind): outcome(name, kind)[1]["bnf_status"] for name in EXPECTED for kind in KINDS}
    expected = {(name, kind): EXPECTED[name][1].get(kind, KEPT) for name in EXPECTED for kind in KINDS}
    wrong = {key: value for key, value in observed.items() if value != expected[key]}
    assert not wrong, wrong


KEPT_CASES = [(name, kind) for name in EXPECTED for kind in KINDS if EXPECTED[name][1].get(kind, KEPT) == KEPT]


def decode(tok, ids) -> str:
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("name,kind", KEPT_CASES)
def test_kept_rows_train_the_template_s_own_rendering(name, kind):
    family, _ = EXPECTED[name]
    tok, template = tokenizer_for(family), get_chat_template(name)
    row, example = outcome(name, kind)
    tools = json.loads(row["tools"]) if "tools" in row else None
    for side, ids, plen in zip(("chosen", "rejected"), example["response_input_ids"], example["response_prompt_len"]):
        conversation = [dict(m) for m in row[side]]
        history, final = conversation[:-1], conversation[-1]
        args = {"chat_template": template, **({"tools": tools} if tools else {})}
        rendered = _for_reference(tok, template, conversation)
        whole = tok.apply_chat_template(rendered, tokenize=False, **args)
        reference = tok(whole, add_special_tokens=not (tok.bos_token and whole.startswith(tok.bos_token)))["input_ids"]
        # The training sequence is the whole conversation's tokens, up to the final turn's end of turn.
        assert ids == reference[: len(ids)], (decode(tok, ids), whole)
        assert decode(tok, reference[len(ids):]).strip() in ("", "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>")
        generation = tok.apply_chat_template(rendered[:-1], tokenize=False, add_generation_prompt=True, **args)
        prompt, completion = decode(tok, ids[:plen]), decode(tok, ids[plen:])
        assert generation.startswith(prompt.removeprefix(tok.bos_token or "") if not generation.startswith(
            tok.bos_token or "\0") else prompt), (prompt, generation)
        # Nothing of the final turn is in the prompt; all of it is in the completion.
        for call_ in final.get("tool_calls") or []:
            assert call_["function"]["name"] in completion
            assert "Paris" in completion
        if final.get("content"):
            assert final["content"] in completion and final["content"] not in prompt
        if final.get("reasoning_content"):
            assert FINAL_THOUGHT in completion and FINAL_THOUGHT not in prompt
        # Earlier turns (tool results included) are prompt.
        for earlier in history:
            if earlier.get("content"):
                assert earlier["content"] in prompt
        if tools:
            for description in DESCRIPTIONS:
                assert prompt.count(description) == 1 and description not in completion
        if kind == "reasoning" and name.startswith("qwen3"):
            assert EARLIER_THOUGHT not in decode(tok, ids)  # Qwen3 drops earlier turns' reasoning


def _for_reference(tok, template: str, conversation: list[dict]) -> list[dict]:
    """The conversation as a caller of `apply_chat_template` would pass it: empty content for calls, and
    arguments as JSON text for templates that concatenate them (DeepSeek V3), else as dicts."""
    out = []
    for message in conversation:
        message = {**message, "content": message.get("content") or ""}
        if message.get("tool_calls"):
            calls = []
            for c in message["tool_calls"]:
                arguments = c["function"]["arguments"]
                arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
                if "tool▁sep" in template:
                    arguments = json.dumps(arguments)
                calls.append({**c, "function": {**c["function"], "arguments": arguments}})
            message["tool_calls"] = calls
        out.append(message)
    return out
