"""Data set adapters: raw rows in the schemas public data sets use -> one normalised `Candidate` each.

A candidate is a prompt plus one or more responses, each with a sign (+1 preferred, -1 dispreferred),
and whether the responses form a pair. The prompt and responses are either chat messages (rendered
later with the chat template) or plain text used as it is.

Adapters (the `type:` names `bnf.pairs`, `bnf.hh`, `bnf.ranked`, `bnf.unpaired`, `bnf.sft`, or chosen
automatically from the columns when a data set has no `type:`):

- pairs:    prompt / chosen / rejected, where chosen and rejected are strings, a message dict, a list
            holding only the assistant turn, or whole conversations (prompt = everything before the final
            assistant turn, all turns kept); the prompt may also come from `question` / `input` /
            `instruction` (+ `system`), as in the Orca pair sets.
- hh:       Anthropic HH-RLHF transcripts: chosen / rejected are whole "Human: ... Assistant: ..." texts,
            the prompt is their longest common prefix ending at the last "Assistant:".
- ranked:   Nectar: a prompt and a list of ranked answers; rank 1 is chosen, the worst rank rejected.
- unpaired: prompt / completion / boolean label (KTO / TRL "unpaired preference", standard or
            conversational; a completion that is a whole conversation supplies its own prompt).
- sft:      positives-only rows (chat `messages` / ShareGPT `conversations`, or alpaca
            instruction / input / output): every response is preferred.

Chat rows keep every message field a chat template reads (tool calls, tool results, reasoning: see
`messages`), and a row's `tools` column (`field_tools`) travels with the candidate to the template.

A row that cannot be used raises `Skip(reason)`; the loader counts reasons per data set.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from .messages import Message, normalise_conversation, normalise_message, normalise_tools
from .skip import Skip
PROMPT_KEYS = ("prompt", "question", "input", "instruction")


class MissingColumns(ValueError):
    """A data set lacks columns its adapter needs (raised once per data set, before any row is read)."""


@dataclass
class Candidate:
    prompt: str | list[Message]
    responses: list[tuple[str | Message, int]]
    paired: bool
    form: str = ""  # how the row was read, for the detection log
    tools: list[dict] | None = None  # the row's tool schemas, passed to the chat template as `tools=`


@dataclass
class Adapter:
    name: str
    convert: Callable[[dict[str, Any], "Fields"], Candidate]
    required: Callable[["Fields"], list[list[str]]]  # alternatives: each inner list must all be present


@dataclass
class Fields:
    """Column names, overridable per data set with the usual Axolotl `field_*` keys."""

    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    completion: str = "completion"
    label: str = "label"
    messages: str | None = None
    system: str = "system"
    tools: str = "tools"
    chat_format: str = "auto"  # auto | chat | text: how plain-string prompts and responses are read

    @classmethod
    def from_dataset_config(cls, ds_cfg: dict[str, Any]) -> "Fields":
        kwargs = {name: ds_cfg[f"field_{name}"] for name in ("prompt", "chosen", "rejected", "completion", "label",
                                                             "messages", "system", "tools") if ds_cfg.get(f"field_{name}")}
        chat_format = ds_cfg.get("bnf_chat_format", "auto")
        if chat_format not in ("auto", "chat", "text"):
            raise ValueError(f"bnf_chat_format must be auto, chat or text, got {chat_format!r}")
        return cls(**kwargs, chat_format=chat_format)


# --------------------------------------------------------------------------------------------- helpers
def _value(row: dict[str, Any], key: str) -> Any:
    value = row.get(key)
    if value is None:
        raise Skip("missing value")
    return value


def split_last_assistant(messages: list[Message]) -> tuple[list[Message], Message]:
    """(everything before the final assistant turn, that turn)."""
    if messages[-1]["role"] != "assistant":
        raise Skip("no final assistant turn")
    return messages[:-1], messages[-1]


def _as_response(value: Any) -> tuple[str | Message, list[Message] | None]:
    """A response given as text, a message dict or a message list: (response, conversation before it)."""
    if isinstance(value, str):
        return value, None
    if isinstance(value, dict):
        message = normalise_message(value)
        if message["role"] != "assistant":
            raise Skip("no final assistant turn")
        return message, None
    conversation = normalise_conversation(value)
    history, last = split_last_assistant(conversation)
    return last, history or None


def _after_prompt_column(history: list[Message] | None, row: dict[str, Any], fields: Fields) -> list[Message] | None:
    """The turns before a response given as a message list: a whole conversation (from a system or user
    turn) is its own prompt; a list that continues one (it opens with an assistant turn or a tool result,
    TRL's conversational prompt + completion) follows the row's prompt column."""
    if not history or history[0]["role"] not in ("assistant", "tool"):
        return history
    try:
        prompt, _ = _prompt_from_columns(row, fields)
    except Skip:
        return history
    return _as_chat_prompt(prompt, row, fields) + history


def _prompt_from_columns(row: dict[str, Any], fields: Fields) -> tuple[str | list[Message], str]:
    """The prompt column (text or messages) and its name; `system` is prepended to chat prompts."""
    for key in (fields.prompt,) + tuple(k for k in PROMPT_KEYS if k != fields.prompt):
        if row.get(key) is None:
            continue
        value = row[key]
        if key == "input" and row.get("instruction"):  # alpaca-style: instruction + input
            continue
        if isinstance(value, list):
            return normalise_conversation(value), key
        if not isinstance(value, str):
            raise Skip("malformed prompt")
        return value, key
    raise Skip("missing value")


def _tools(row: dict[str, Any], fields: Fields, chat: bool = True) -> list[dict] | None:
    """The row's tool schemas (`field_tools`, default `tools`), for chat rows only: the template prints them."""
    tools = normalise_tools(row.get(fields.tools))
    if tools and not chat:
        raise Skip("tools on a plain-text row")
    return tools


def _use_chat(fields: Fields, prompt_key: str, prompt: Any, responses: list[Any]) -> bool:
    """Plain strings are used as text (TRL's standard format) unless the prompt came from an instruction
    column (question / input / instruction), the other side is already chat, or `bnf_chat_format: chat`."""
    if fields.chat_format != "auto":
        return fields.chat_format == "chat"
    if isinstance(prompt, list) or any(isinstance(r, dict) for r in responses):
        return True
    return prompt_key != "prompt"


def _as_chat_prompt(prompt: str | list[Message], row: dict[str, Any], fields: Fields) -> list[Message]:
    if isinstance(prompt, list):
        return prompt
    system = row.get(fields.system)
    messages = [{"role": "system", "content": system}] if isinstance(system, str) and system.strip() else []
    return messages + [{"role": "user", "content": prompt}]


def _as_chat_response(response: str | Message) -> Message:
    return response if isinstance(response, dict) else {"role": "assistant", "content": response}


def _as_text(value: str | Message | list[Message]) -> str:
    if isinstance(value, str):
        return value
    raise Skip("chat row in text mode")  # bnf_chat_format: text on conversational data


# --------------------------------------------------------------------------------------------- adapters
def convert_pairs(row: dict[str, Any], fields: Fields) -> Candidate:
    chosen, chosen_history = _as_response(_value(row, fields.chosen))
    rejected, rejected_history = _as_response(_value(row, fields.rejected))
    chosen_history = _after_prompt_column(chosen_history, row, fields)
    rejected_history = _after_prompt_column(rejected_history, row, fields)
    if chosen_history is not None or rejected_history is not None:
        if chosen_history != rejected_history:
            raise Skip("chosen/rejected prompts differ")
        prompt, form = chosen_history, f"conversational pairwise, prompt from {fields.chosen}[:-1]"
    else:
        prompt, key = _prompt_from_columns(row, fields)
        shape = "message" if isinstance(chosen, dict) else "text"
        form = f"pairwise, prompt from '{key}', {shape} responses"
        if not _use_chat(fields, key, prompt, [chosen, rejected]):
            return Candidate(_as_text(prompt), [(_as_text(chosen), 1), (_as_text(rejected), -1)], True,
                             form + " (plain text, no chat template)", _tools(row, fields, chat=False))
        prompt = _as_chat_prompt(prompt, row, fields)
    if fields.chat_format == "text":
        raise Skip("chat row in text mode")
    return Candidate(prompt, [(_as_chat_response(chosen), 1), (_as_chat_response(rejected), -1)], True, form,
                     _tools(row, fields))


HH_ASSISTANT = "\n\nAssistant:"


def convert_hh(row: dict[str, Any], fields: Fields) -> Candidate:
    chosen, rejected = _value(row, fields.chosen), _value(row, fields.rejected)
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        raise Skip("malformed transcript")
    common = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        common += 1
    cut = chosen.rfind(HH_ASSISTANT, 0, common)  # the last "Assistant:" both transcripts share
    if cut < 0:
        raise Skip("no shared Assistant: turn")
    cut += len(HH_ASSISTANT)
    prompt = chosen[:cut]
    form = "HH transcripts, prompt = common prefix up to the last 'Assistant:'"
    if fields.chat_format == "chat":
        messages = parse_hh_transcript(prompt)
        return Candidate(messages, [(_as_chat_response(chosen[cut:].strip()), 1),
                                    (_as_chat_response(rejected[cut:].strip()), -1)], True, form + " (as chat)")
    return Candidate(prompt, [(chosen[cut:], 1), (rejected[cut:], -1)], True, form)


def parse_hh_transcript(text: str) -> list[Message]:
    """'\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c\\n\\nAssistant:' -> messages (the open last turn dropped)."""
    messages = []
    for chunk in text.split("\n\n"):
        for prefix, role in (("Human:", "user"), ("Assistant:", "assistant")):
            if chunk.startswith(prefix):
                messages.append({"role": role, "content": chunk[len(prefix):].strip()})
                break
        else:
            if messages and chunk:
                messages[-1]["content"] += "\n\n" + chunk
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    return messages


# The ranked format's column of `{"answer", "rank"}` dicts (it has no `field_*` override).
RANKED_ANSWERS = "answers"


def convert_ranked(row: dict[str, Any], fields: Fields) -> Candidate:
    answers = _value(row, RANKED_ANSWERS)
    if not isinstance(answers, list) or len(answers) < 2:
        raise Skip("fewer than 2 ranked answers")
    try:
        ranked = sorted(answers, key=lambda a: a["rank"])
        best, worst = ranked[0]["answer"], ranked[-1]["answer"]
    except (KeyError, TypeError):
        raise Skip("malformed ranked answers") from None
    if ranked[0]["rank"] == ranked[-1]["rank"]:
        raise Skip("all answers tie")
    prompt, key = _prompt_from_columns(row, fields)
    form = f"ranked answers, prompt from '{key}', rank {ranked[0]['rank']} chosen vs rank {ranked[-1]['rank']}"
    if fields.chat_format == "chat":
        return Candidate(_as_chat_prompt(parse_hh_transcript(prompt) if "Human:" in prompt else prompt, row, fields)
                         if isinstance(prompt, str) else prompt,
                         [(_as_chat_response(best.strip()), 1), (_as_chat_response(worst.strip()), -1)], True, form)
    sep = "" if not isinstance(prompt, str) or prompt.endswith((" ", "\n")) else " "
    return Candidate(_as_text(prompt), [(sep + best.lstrip(), 1), (sep + worst.lstrip(), -1)], True, form)


def label_sign(value: Any) -> int:
    """+1 / -1 from a boolean label (0 / 1 integers are accepted as booleans)."""
    if isinstance(value, bool):
        return 1 if value else -1
    if isinstance(value, int) and value in (0, 1):
        return 1 if value else -1
    raise Skip("label not boolean")


def convert_unpaired(row: dict[str, Any], fields: Fields) -> Candidate:
    if row.get(fields.label) is None:
        raise Skip("missing value")
    sign = label_sign(row[fields.label])
    completion, history = _as_response(_value(row, fields.completion))
    history = _after_prompt_column(history, row, fields)
    if history is not None:
        return Candidate(history, [(completion, sign)], False, f"unpaired, prompt from {fields.completion}[:-1]",
                         _tools(row, fields))
    prompt, key = _prompt_from_columns(row, fields)
    form = f"unpaired, prompt from '{key}'"
    if not _use_chat(fields, key, prompt, [completion]):
        return Candidate(_as_text(prompt), [(_as_text(completion), sign)], False, form + " (plain text, no chat template)",
                         _tools(row, fields, chat=False))
    return Candidate(_as_chat_prompt(prompt, row, fields), [(_as_chat_response(completion), sign)], False, form,
                     _tools(row, fields))


def convert_sft(row: dict[str, Any], fields: Fields) -> Candidate:
    key = fields.messages or next((k for k in ("messages", "conversations") if row.get(k) is not None), None)
    if key is not None:
        history, last = split_last_assistant(normalise_conversation(_value(row, key)))
        if not history:
            raise Skip("no prompt turn")
        return Candidate(history, [(last, 1)], False, f"positives-only chat, prompt from {key}[:-1]",
                         _tools(row, fields))
    instruction = _value(row, "instruction")
    output = _value(row, "output")
    if not isinstance(instruction, str) or not isinstance(output, str):
        raise Skip("malformed alpaca row")
    extra = row.get("input")
    user = f"{instruction}\n\n{extra}" if isinstance(extra, str) and extra.strip() else instruction
    prompt = _as_chat_prompt(user, row, fields)
    return Candidate(prompt, [({"role": "assistant", "content": output}, 1)], False,
                     "positives-only alpaca (instruction + input -> user turn)")


ADAPTERS: dict[str, Adapter] = {
    "pairs": Adapter("pairs", convert_pairs, lambda f: [[f.chosen, f.rejected]]),
    "hh": Adapter("hh", convert_hh, lambda f: [[f.chosen, f.rejected]]),
    "ranked": Adapter("ranked", convert_ranked, lambda f: [[f.prompt, RANKED_ANSWERS]]),
    "unpaired": Adapter("unpaired", convert_unpaired, lambda f: [[f.completion, f.label]]),
    "sft": Adapter("sft", convert_sft, lambda f: [[f.messages]] if f.messages else
                   [["messages"], ["conversations"], ["instruction", "output"]]),
}


def adapter_for_type(ds_type: str) -> Adapter | None:
    """`bnf.<name>` -> that adapter; anything else is not ours (None)."""
    if isinstance(ds_type, str) and ds_type.startswith("bnf."):
        name = ds_type[4:]
        if name not in ADAPTERS:
            raise ValueError(f"unknown type {ds_type!r}; the plugin's own types are "
                             + ", ".join(f"bnf.{n}" for n in ADAPTERS))
        return ADAPTERS[name]
    return None


def detect_adapter(columns: list[str], sample_rows: list[dict[str, Any]], fields: Fields) -> Adapter:
    """Choose an adapter from the columns (and the value types of the first rows that have a value: a bad
    first row does not decide the format) of a data set without `type:`."""
    cols = set(columns)
    if {fields.completion, fields.label} <= cols:
        return ADAPTERS["unpaired"]
    if {fields.prompt, "answers"} <= cols:
        return ADAPTERS["ranked"]
    if {fields.chosen, fields.rejected} <= cols:
        has_prompt = any(k in cols for k in PROMPT_KEYS) or fields.prompt in cols
        chosen = next((row[fields.chosen] for row in sample_rows
                       if isinstance(row.get(fields.chosen), (str, list)) and row[fields.chosen]), None)
        if not has_prompt and isinstance(chosen, str) and HH_ASSISTANT in chosen:
            return ADAPTERS["hh"]
        return ADAPTERS["pairs"]
    if fields.messages in cols or "messages" in cols or "conversations" in cols or {"instruction", "output"} <= cols:
        return ADAPTERS["sft"]
    raise MissingColumns(
        "cannot tell the data format from the columns; expected prompt/chosen/rejected (pairwise), "
        "chosen/rejected transcripts (HH), prompt/answers (ranked), prompt/completion/label (unpaired), "
        "messages or instruction/output (positives-only), or give a `type:`"
    )


def check_columns(adapter: Adapter, columns: list[str], fields: Fields) -> None:
    alternatives = adapter.required(fields)
    if not any(set(alt) <= set(columns) for alt in alternatives):
        wanted = " or ".join("/".join(alt) for alt in alternatives)
        name = adapter.name if "." in adapter.name else f"bnf.{adapter.name}"
        raise MissingColumns(f"type {name} needs columns {wanted}")
