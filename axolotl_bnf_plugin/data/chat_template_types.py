"""Axolotl's `chat_template.default` and `chat_template.argilla_chat` DPO types, read as chat candidates.

Axolotl's DPO strategies for these types return text: the prompt rendered alone, each answer rendered
after a dummy user turn, every message cut down to role and content. Tool calls, tool results, a row's
`tools` and (in Axolotl 0.19) reasoning fields are lost on the way, and the answer is not what the
template writes for it inside the conversation. The plugin reads the same rows with the same options
(`field_messages`, `field_chosen`, `field_rejected`, `message_property_mappings` or the older
`message_field_role` / `message_field_content`, `roles`) plus `field_tools`, into the chat candidates its
own adapters make, so they are trained on the template's rendering of the whole conversation with every
field the template reads (`messages`, `tokenize.render_final_turn`).

- `chat_template.default`: the prompt is `field_messages` (a message list, or a string as one user
  turn); `field_chosen` / `field_rejected` are each a string, a message, or a message list whose last
  message is the answer.
- `chat_template.argilla_chat`: `field_chosen` / `field_rejected` are whole conversations; the prompt is
  every turn before the last. Where the two conversations differ before their last turn (agent
  trajectories that diverge early), the row is dropped as `chosen/rejected prompts differ`, as the plugin's
  pairwise adapter does (Axolotl's strategy would silently pair the rejected answer with the chosen
  conversation's history).
"""
from __future__ import annotations

from functools import partial
from typing import Any

from axolotl.utils.schemas.utils import handle_legacy_message_fields_logic

from .adapters import Adapter, Candidate, Fields, _tools
from .messages import PASSED_THROUGH, Message, check_tool_turns, normalise_message
from .skip import Skip

READ_BY_PLUGIN = ("chat_template.default", "chat_template.argilla_chat")
DEFAULT_ROLES = {"user": ["user"], "assistant": ["assistant"], "system": ["system"], "tool": ["tool"]}


class MessageMapping:
    """A data set's `message_property_mappings` and `roles`, applied to one raw message."""

    def __init__(self, ds_cfg: dict[str, Any]):
        ds_cfg = handle_legacy_message_fields_logic(dict(ds_cfg))
        self.properties = {"role": "role", "content": "content", **(ds_cfg.get("message_property_mappings") or {})}
        roles = ds_cfg.get("roles") or DEFAULT_ROLES
        self.roles = {source: target for target, sources in roles.items() for source in sources}

    def __call__(self, raw: Any) -> Message:
        if not isinstance(raw, dict):
            raise Skip("malformed message")
        role = raw.get(self.properties["role"])
        if not isinstance(role, str) or role not in self.roles:
            raise Skip(f"unknown role {role!r}")
        message = {"role": self.roles[role], "content": raw.get(self.properties["content"])}
        for target, source in self.properties.items():
            if target not in ("role", "content") and raw.get(source) is not None:
                message[target] = raw[source]
        for key in ("tool_calls",) + PASSED_THROUGH:  # what templates read, under its usual name
            if key not in message and raw.get(key) is not None:
                message[key] = raw[key]
        return normalise_message(message)


def _field(row: dict[str, Any], key: str) -> Any:
    if row.get(key) is None:
        raise Skip("missing value")
    return row[key]


def _answer(value: Any, mapping: MessageMapping) -> Message:
    """An answer given as a string, a message, or a message list ending with it."""
    if isinstance(value, str):
        return {"role": "assistant", "content": value}
    if isinstance(value, list):
        if not value:
            raise Skip("malformed message")
        value = value[-1]
    message = mapping(value)
    if message["role"] != "assistant":
        raise Skip("no final assistant turn")
    return message


def convert_default(row: dict[str, Any], fields: Fields, mapping: MessageMapping) -> Candidate:
    raw = _field(row, fields.messages)
    if isinstance(raw, str):
        prompt = [{"role": "user", "content": raw}]
    elif isinstance(raw, list) and raw:
        prompt = [mapping(m) for m in raw]
        check_tool_turns(prompt)
    else:
        raise Skip("malformed message")
    chosen, rejected = _answer(_field(row, fields.chosen), mapping), _answer(_field(row, fields.rejected), mapping)
    return Candidate(prompt, [(chosen, 1), (rejected, -1)], True,
                     f"prompt from '{fields.messages}', answers from '{fields.chosen}' / "
                     f"'{fields.rejected}', rendered as whole conversations", _tools(row, fields))


def convert_argilla_chat(row: dict[str, Any], fields: Fields, mapping: MessageMapping) -> Candidate:
    conversations = []
    for key in (fields.chosen, fields.rejected):
        raw = _field(row, key)
        if not isinstance(raw, list) or len(raw) < 2:
            raise Skip("malformed message")
        conversation = [mapping(m) for m in raw]
        check_tool_turns(conversation)
        if conversation[-1]["role"] != "assistant":
            raise Skip("no final assistant turn")
        conversations.append(conversation)
    (*history, chosen), (*rejected_history, rejected) = conversations
    if history != rejected_history:
        raise Skip("chosen/rejected prompts differ")
    return Candidate(history, [(chosen, 1), (rejected, -1)], True,
                     f"prompt from {fields.chosen}[:-1], rendered as whole "
                     "conversations", _tools(row, fields))


def chat_template_adapter(ds_type: str, ds_cfg: dict[str, Any]) -> tuple[Adapter, Fields] | None:
    """The plugin's reader for an Axolotl `chat_template.*` DPO type (None for any other type)."""
    if ds_type not in READ_BY_PLUGIN:
        return None
    fields = Fields.from_dataset_config(ds_cfg)
    fields.messages = fields.messages or "messages"
    mapping = MessageMapping(ds_cfg)
    if ds_type == "chat_template.default":
        return Adapter(ds_type, partial(convert_default, mapping=mapping),
                       lambda f: [[f.messages, f.chosen, f.rejected]]), fields
    return Adapter(ds_type, partial(convert_argilla_chat, mapping=mapping), lambda f: [[f.chosen, f.rejected]]), fields
