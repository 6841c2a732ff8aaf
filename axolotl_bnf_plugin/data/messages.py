"""Chat messages as data sets write them -> messages a chat template reads, keeping every field it reads.

Agent and reasoning data carry more than `{role, content}`: assistant turns with `tool_calls` (often with
`content: null`), `tool` turns with the call's result (`tool_call_id`, `name`), reasoning kept apart from
the answer (`reasoning_content`, or `thinking`), content given as a list of text parts, and a row-level
`tools` column with the JSON schemas the template prints into the system turn. All of it is kept here, in
the shapes chat templates read:

- roles: `human`/`user`, `gpt`/`assistant`/`bot`/`model`, `system`, and `tool`/`ipython`/`function`
  (tool results) are accepted, in the role/content or ShareGPT from/value conventions;
- content: a string; a list of text parts is joined; null (or absent) is the empty string, allowed only
  on an assistant turn that calls tools (templates concatenate content: `None` would print or raise);
- `tool_calls`: a list (or its JSON text) of OpenAI-style calls `{id?, type, function: {name,
  arguments}}` or flat `{name, arguments}` ones, written in the OpenAI shape; `arguments` given as JSON
  text are parsed (templates that need text get it back in `tokenize.render_final_turn`), and text that
  is not JSON is kept as text, flagged so a template that needs a dict drops the row;
- `tool_call_id`, `name`, and the reasoning fields `reasoning_content` (Qwen3, ...), `reasoning` (Gemma 4)
  and `thinking` (gpt-oss): passed on when set.

A row that cannot be rendered faithfully raises `Skip` with the reason, e.g. a tool result with no call
before it, or an image part (vision-language data is out of scope: refused by name).
"""
from __future__ import annotations

import json
from typing import Any

from .skip import Skip

Message = dict[str, Any]

ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
                "model": "assistant", "system": "system", "tool": "tool", "ipython": "tool", "function": "tool",
                "observation": "tool", "function_call": "assistant"}
# Message fields passed to the template as they are, when set.
PASSED_THROUGH = ("tool_call_id", "name", "reasoning_content", "reasoning", "thinking")
REASONING_FIELDS = ("reasoning_content", "reasoning", "thinking")
MEDIA_PARTS = ("image", "image_url", "input_image", "audio", "input_audio", "video", "video_url", "file")


class RawArguments(str):
    """Tool-call arguments given as text that is not JSON: rendered only by templates that take text."""


def _json_text(value: Any, what: str) -> Any:
    if not isinstance(value, str):
        return value
    if not value.strip():
        return None
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        raise Skip(f"{what} not valid JSON") from None


def _without_nulls(value: Any, deep: bool) -> Any:
    """A dict without its null-valued keys: Arrow gives every row the keys any row has (as null), so
    hub and Parquet rows come back with other rows' argument names and schema fields."""
    if isinstance(value, dict):
        return {k: (_without_nulls(v, deep) if deep else v) for k, v in value.items() if v is not None}
    if deep and isinstance(value, list):
        return [_without_nulls(v, deep) for v in value]
    return value


def content_text(content: Any) -> str:
    """The message's text: a string as it is, a list of text parts joined; media parts are refused."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise Skip("malformed message")
    texts = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, dict):
            raise Skip("malformed message")
        kind = part.get("type") or ("text" if "text" in part else None)
        if kind in MEDIA_PARTS or (kind is None and any(part.get(k) is not None for k in MEDIA_PARTS)):
            raise Skip(f"{kind or 'media'} content (image, audio and video messages are not supported)")
        text = part.get("text")
        if kind != "text" or not isinstance(text, str):
            raise Skip("malformed message")
        texts.append(text)
    return "".join(texts)


def tool_call(call: Any) -> dict[str, Any]:
    """One call in the OpenAI shape `{id?, type: function, function: {name, arguments}}`."""
    if not isinstance(call, dict):
        raise Skip("malformed tool call")
    function = call.get("function") if isinstance(call.get("function"), dict) else call
    name, arguments = function.get("name"), function.get("arguments", function.get("parameters"))
    if not isinstance(name, str) or not name:
        raise Skip("malformed tool call")
    if arguments is None:
        arguments = {}
    for _ in range(2):  # JSON text, or JSON text of JSON text (a doubly encoded object)
        if not isinstance(arguments, str):
            break
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            arguments = RawArguments(arguments)
            break
    arguments = _without_nulls(arguments, deep=False)
    out = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if call.get("id") is not None:
        out["id"] = call["id"]
    return out


def normalise_message(message: Any) -> Message:
    """A message with the fields its template reads (module doc)."""
    if not isinstance(message, dict):
        raise Skip("malformed message")
    role = message.get("role", message.get("from"))
    if not isinstance(role, str):
        raise Skip("malformed message")
    if role.lower() not in ROLE_ALIASES:
        raise Skip(f"unknown role {role!r}")
    raw_content = message["content"] if "content" in message else message.get("value")
    calls = _json_text(message.get("tool_calls"), "tool_calls")
    if calls is None and message.get("function_call") is not None:  # OpenAI's older single call
        calls = [_json_text(message["function_call"], "function_call")]
    if role.lower() == "function_call":  # ShareGPT (LLaMA-Factory, APIGen): the call as the turn's JSON text
        calls, raw_content = _json_text(raw_content, "tool call"), None
        calls = calls if isinstance(calls, list) else [calls]
    role = ROLE_ALIASES[role.lower()]
    if isinstance(calls, dict):
        calls = [calls]
    if calls is not None and not isinstance(calls, list):
        raise Skip("malformed tool call")
    if raw_content is None and not (calls and role == "assistant"):
        raise Skip("malformed message")
    out: Message = {"role": role, "content": content_text(raw_content)}
    if calls:
        if role != "assistant":
            raise Skip(f"tool_calls on a {role} turn")
        out["tool_calls"] = [tool_call(c) for c in calls]
    for key in PASSED_THROUGH:
        value = message.get(key)
        if value is not None:
            if key in REASONING_FIELDS:
                value = content_text(value)
            elif not isinstance(value, str):
                raise Skip(f"malformed {key}")
            out[key] = value
    return out


def check_tool_turns(messages: list[Message]) -> None:
    """Every tool result answers a call: it follows an assistant turn (directly or after other results);
    where that turn's calls are structured, results are at most as many as calls, and a result's
    `tool_call_id` names one of them. (Calls written inside the text, as Hermes-style ShareGPT data does,
    have no structure to check.)"""
    calls: list[dict] | None = None
    answered = 0
    for message in messages:
        if message["role"] == "assistant":
            calls, answered = message.get("tool_calls"), 0
            calls = calls if calls else None
            if calls is None:
                calls = []  # a turn whose calls, if any, are in its text
                answered = -1
            continue
        if message["role"] == "user":
            calls = None
        if message["role"] != "tool":
            continue
        if calls is None:
            raise Skip("tool result without a preceding tool call")
        if answered < 0:
            continue
        answered += 1
        if answered > len(calls):
            raise Skip("more tool results than tool calls")
        call_id = message.get("tool_call_id")
        ids = [c.get("id") for c in calls if c.get("id") is not None]
        if call_id is not None and ids and call_id not in ids:
            raise Skip(f"tool result for unknown call id {call_id!r}")


def normalise_conversation(messages: Any) -> list[Message]:
    if not isinstance(messages, list) or not messages:
        raise Skip("malformed message")
    conversation = [normalise_message(m) for m in messages]
    check_tool_turns(conversation)
    return conversation


def normalise_tools(value: Any) -> list[dict] | None:
    """A row's `tools` column (a list of JSON schemas, or its JSON text) as the template's `tools=`;
    None when the row has none. A schema's `parameters` given as JSON text is parsed."""
    tools = _without_nulls(_json_text(value, "tools"), deep=True)
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise Skip("malformed tools")
    out = []
    for tool in tools:
        wrapped = isinstance(tool.get("function"), dict)
        function = tool["function"] if wrapped else tool
        if not isinstance(function.get("name"), str):
            raise Skip("malformed tools")
        if isinstance(function.get("parameters"), str):
            function = {**function, "parameters": _json_text(function["parameters"], "tools")}
        # (a flat schema, as xlam / APIGen / ToolACE store it, goes in the `{type, function}` shape templates read)
        out.append({**tool, "function": function} if wrapped else {"type": "function", "function": function})
    return out


def tool_names(tools: list[dict] | None) -> list[str]:
    return [(t["function"] if isinstance(t.get("function"), dict) else t)["name"] for t in tools or []]
