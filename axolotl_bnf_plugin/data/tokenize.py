"""Prompt + completion -> token ids with an exact prompt/completion boundary.

Text rows (`tokenize_response`): the prompt and the prompt followed by the completion are tokenized, and
when the first is a prefix of the second (the normal case) the boundary sits right there, so the
completion's first token is what the whole text produces. When a tokenizer merges across the boundary,
the two parts are tokenized separately and concatenated (what TRL does), so no prompt token is ever
scored. The tokenizer's BOS is added once (not when the prompt text already starts with it), and EOS
closes every completion exactly once.

Chat rows (`render_final_turn` + `tokenize_chat_turn`): the training sequence is the chat template's own
rendering of the whole conversation, tokenized as one text, and the completion is the final assistant
turn with the template's end of turn:

- the prompt is the template's generation prompt for the turns before the final one
  (`add_generation_prompt=True`), which the whole rendering must start with. What the template does to
  earlier turns (Qwen3 drops the `<think>` blocks of earlier assistant turns; Qwen2.5, Phi-4,
  Mistral Small 3 and Command A insert their default system prompt) is therefore in both, as the
  template writes it for generation.
- When the final turn opens differently from the generation prompt (Qwen3 writes the turn's own
  `<think>` block where the generation prompt opens an empty one; Gemma 4's generation prompt adds an
  empty thought channel), the prompt ends where the two renderings part, and never inside the message's
  own text (renderings of the turn with a one-character stand-in content bound it), provided every
  earlier turn is rendered identically. A template that renders earlier turns differently once the final
  turn is there (Mistral v2/v3 and Pixtral put the system message into the last user turn only while
  that turn is the last message, so a whole conversation renders without it) gives no boundary that
  keeps all of the final turn and nothing else in the completion: such rows are dropped as
  "template not prefix-stable".
- The completion ends at the template's end of turn: at the tokenizer's EOS if the turn contains one
  (what follows it is dropped, e.g. the opener of a next turn Command A writes after every
  conversation), else after the template's closing text with trailing whitespace dropped (Gemma's
  `<end_of_turn>`, Llama 3's `<|eot_id|>`, Phi-3's `<|end|>`). Only a template that writes nothing after
  the message content gets the tokenizer's EOS appended.
- Prompt and whole text are tokenized with the same settings: no special tokens added when the rendering
  starts with BOS (the template wrote it), else what the tokenizer adds by itself; so BOS appears once.
  The sequence is always the whole text's tokens. If a token of the whole text straddles the boundary
  (a piece spanning the end of the prompt and the start of the turn), the prompt ends before that
  token: the prompt is the longest run of leading tokens shared with the prompt's own tokenization, and
  the straddling token is scored with the completion. So no text of the final turn is ever in the
  prompt, and no token sequence other than the whole conversation's is ever trained on; the price is
  that the straddling token may carry the prompt's last characters (with the usual byte-level and
  SentencePiece vocabularies, whose pieces do not span a space inside, a whitespace run at most).

A chat template that raises for a row (Gemma: "System role not supported") drops that row with the
template's message as the reason.

Agent rows: a row's `tools` are passed to every rendering (`tools=`), so they are in the prompt as the
template writes them. Tool-call arguments reach the template in the form it takes: dicts for templates that
serialise them (`| tojson`), JSON text for those that concatenate them (DeepSeek V3), told apart by probing
the template once. A row the template renders without its tools, an earlier call, a tool result, a final
call or the final turn's reasoning is dropped, naming what the template ignores: training on it would train
on a conversation other than the row's.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from jinja2.exceptions import TemplateError, TemplateSyntaxError

from .messages import REASONING_FIELDS, RawArguments, tool_names
from .skip import Skip


@dataclass
class TokenizedResponse:
    input_ids: list[int]
    prompt_len: int


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


# --------------------------------------------------------------------------------------------- chat rows
@dataclass
class ChatTurnText:
    """One response of a chat row as text: the prompt, the final turn as the template renders it, and
    whether the tokenizer's EOS must close it (only when the template writes nothing after the content)."""

    prompt: str
    completion: str
    append_eos: bool


def _common_prefix_len(a, b) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


STAND_INS = ("\x01", "\x02")


def _with_stand_in(message: dict, stand_in: str) -> dict:
    """The final turn with its own text (content, reasoning, the first call's function name) replaced by a
    one-character stand-in: where its rendering parts from the real one, the message's text begins."""
    out = {**message, "content": stand_in}
    for key in REASONING_FIELDS:
        if out.get(key):
            out[key] = stand_in
    if out.get("tool_calls"):
        first = out["tool_calls"][0]
        out["tool_calls"] = [{**first, "function": {**first["function"], "name": stand_in}}] + out["tool_calls"][1:]
    return out


_TEXT_ARGUMENTS: dict[str, bool] = {}


def _takes_text_arguments(tokenizer, chat_template: str) -> bool:
    """Whether the template writes tool-call arguments as text it is given (DeepSeek V3 concatenates
    them) rather than serialising a dict (`| tojson`: Llama, Mistral, Qwen, ...). Probed once per template:
    a call with dict arguments that fails to render, or renders as a Python dict (`{{ arguments }}`), while
    the same call with JSON text renders."""
    if chat_template not in _TEXT_ARGUMENTS:
        call = {"type": "function", "id": "abcdefghi", "function": {"name": "probe", "arguments": {"x": 1}}}
        messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [call]}]

        def renders(arguments) -> str | None:
            probe = [messages[0], {**messages[1], "tool_calls": [{**call, "function": {"name": "probe",
                                                                                         "arguments": arguments}}]}]
            try:
                return tokenizer.apply_chat_template(probe, tokenize=False, chat_template=chat_template)
            except Exception:  # noqa: BLE001 - any failure means "not in this form"
                return None

        as_dict = renders({"x": 1})
        _TEXT_ARGUMENTS[chat_template] = (as_dict is None or "{'x': 1}" in as_dict) and \
            renders('{"x": 1}') is not None
    return _TEXT_ARGUMENTS[chat_template]


def _arguments_for_template(message: dict, as_text: bool) -> dict:
    """The message with its calls' arguments in the form the template takes: dicts, or JSON text.
    Arguments that are not JSON can only be written by a template that takes text."""
    if not message.get("tool_calls"):
        return message
    calls = []
    for call in message["tool_calls"]:
        arguments = call["function"]["arguments"]
        if isinstance(arguments, RawArguments):
            if not as_text:
                raise Skip("tool call arguments not valid JSON")
            arguments = str(arguments)
        elif as_text:
            arguments = json.dumps(arguments, ensure_ascii=False)
        calls.append({**call, "function": {**call["function"], "arguments": arguments}})
    return {**message, "tool_calls": calls}


def _written(text: str, rendering: str) -> bool:
    """`text` is in `rendering` as it is, or as a JSON string's inside (templates that write a tool's
    result with `| tojson` escape its quotes and newlines)."""
    text = text.strip()
    return text in rendering or json.dumps(text, ensure_ascii=False)[1:-1] in rendering


THINK_BLOCK = re.compile(r"^\s*<think>.*?</think>", re.DOTALL)


def _check_rendered(prompt: str, completion: str, history: list[dict], message: dict, tools: list | None) -> None:
    """Nothing of the conversation vanished in the rendering: a template that does not write tools, tool
    calls, tool results, the final turn's content beside its calls, or the final turn's reasoning would
    train on a conversation other than the row's. (A `<think>` block written inside the content follows
    the template: DeepSeek V3 drops it, as it does at inference.)"""
    if any(name not in prompt for name in tool_names(tools)):
        raise Skip("chat template ignores tools")
    for turn in history:
        if any(call["function"]["name"] not in prompt for call in turn.get("tool_calls") or []):
            raise Skip("chat template ignores tool_calls")
        if turn["role"] == "tool" and not _written(turn["content"], prompt):
            raise Skip("chat template ignores tool results")
    if any(call["function"]["name"] not in completion for call in message.get("tool_calls") or []):
        raise Skip("chat template ignores tool_calls")
    content = THINK_BLOCK.sub("", message["content"])
    if message.get("tool_calls") and content.strip() and not _written(content, completion):
        raise Skip("chat template ignores the content of a tool-call turn")
    for key in REASONING_FIELDS:
        if (message.get(key) or "").strip() and message[key].strip() not in completion:
            raise Skip(f"chat template ignores the final turn's {key}")


def render_final_turn(tokenizer, chat_template: str, history: list[dict], message: dict,
                      tools: list[dict] | None = None) -> ChatTurnText:
    """Split the template's rendering of `history + [message]` (with the row's `tools`) into prompt and
    final turn (module doc).

    Raises `Skip` for a row the template refuses, renders without some of its content, or that has no
    clean boundary."""
    as_text = _takes_text_arguments(tokenizer, chat_template)
    history = [_arguments_for_template(m, as_text) for m in history]
    message = _arguments_for_template(message, as_text)
    extra = {"tools": tools} if tools else {}

    def apply(messages: list[dict], generation: bool) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation,
                                             chat_template=chat_template, **extra)

    try:
        whole = apply(history + [message], False)
        generation_prompt = apply(history, True)
        if whole.startswith(generation_prompt):
            boundary = len(generation_prompt)
        else:
            # The final turn opens differently from the generation prompt: cut where they part, but never
            # inside the message's own text (the renderings with a one-character stand-in content part
            # there at the latest), and only after every earlier turn (rendered without a generation
            # prompt) is complete.
            boundary = _common_prefix_len(generation_prompt, whole)
            for stand_in in STAND_INS:
                alt = apply(history + [_with_stand_in(message, stand_in)], False)
                boundary = min(boundary, _common_prefix_len(alt, whole))
            earlier = apply(history, False) if history else ""
            if not (whole.startswith(earlier) and boundary >= len(earlier)):
                raise Skip("template not prefix-stable")
    except TemplateSyntaxError:
        raise
    except TemplateError as err:
        raise Skip(f"chat template: {err.message or type(err).__name__}") from None
    except (TypeError, KeyError, AttributeError) as err:  # a template indexing a field the row lacks
        raise Skip(f"chat template: {type(err).__name__}: {err}") from None
    completion = whole[boundary:]
    eos = tokenizer.eos_token
    if eos and eos in completion:
        completion = completion[: completion.rindex(eos) + len(eos)]
        append_eos = False
    else:
        completion = completion.rstrip()
        content = message["content"].strip()
        append_eos = bool(content) and completion.endswith(content)
    _check_rendered(whole[:boundary], completion, history, message, tools)
    return ChatTurnText(whole[:boundary], completion, append_eos)


def tokenize_chat_turn(tokenizer, turn: ChatTurnText) -> TokenizedResponse:
    """Token ids of the whole text `turn.prompt + turn.completion` and where the completion starts."""
    text = turn.prompt + turn.completion
    bos, eos = tokenizer.bos_token, tokenizer.eos_token
    add_special = not (bos and text.startswith(bos))
    ids = _encode(tokenizer, text, add_special)
    prompt_ids = _encode(tokenizer, turn.prompt, add_special)
    eos_id = tokenizer.eos_token_id
    if eos_id is not None:  # an EOS the tokenizer appended by itself is not part of the text
        if ids and ids[-1] == eos_id and not text.endswith(eos or "\0"):
            ids = ids[:-1]
        if prompt_ids and prompt_ids[-1] == eos_id and not turn.prompt.endswith(eos or "\0"):
            prompt_ids = prompt_ids[:-1]
    prompt_len = _common_prefix_len(prompt_ids, ids)
    if turn.append_eos and eos_id is not None:
        ids = ids + [eos_id]
    return TokenizedResponse(ids, prompt_len)
