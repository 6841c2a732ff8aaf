"""Agent and reasoning rows through the plugin's data path: what a message keeps, the readers that carry
`tools`, and bad agent rows costing one row each with a counted reason."""
from __future__ import annotations

import json
from functools import lru_cache

import pytest

from axolotl.utils.chat_templates import get_chat_template
from axolotl.utils.dict import DictDefault
from axolotl_bnf_plugin.data.axolotl_types import DatasetFormatError
from axolotl_bnf_plugin.data.loader import _prepare_split
from axolotl_bnf_plugin.data.messages import RawArguments, normalise_conversation
from axolotl_bnf_plugin.tiny import AGENT_TOOLS, build_chat_tokenizer

ASK = "What is the weather in Oslo?"


def prep_cfg(**overrides):
    return DictDefault({"sequence_len": 4096, "excess_length_strategy": None, "dataset_num_proc": None,
                        "chat_template": None, "hf_use_auth_token": False, "shuffle_merged_datasets": False,
                        "seed": 0, **overrides})


def write_jsonl(path, rows, **entry):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"path": str(path), "ds_type": "json", **entry}


@lru_cache(maxsize=None)
def tokenizer(family: str = "qwen_25"):
    return build_chat_tokenizer(family, vocab_size=1200)


def decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=False)


def call(name="get_weather", arguments='{"city": "Oslo"}', call_id="call00001"):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def calling(*calls):
    return {"role": "assistant", "content": None, "tool_calls": list(calls)}


def result(content="snowy", call_id="call00001"):
    return {"role": "tool", "tool_call_id": call_id, "name": "get_weather", "content": content}


def test_messages_keep_what_templates_read():
    conversation = normalise_conversation([
        {"from": "human", "value": [{"type": "text", "text": "What is the "}, {"type": "text", "text": "weather?"}]},
        {"role": "assistant", "content": None,
         "tool_calls": json.dumps([{"name": "get_weather", "arguments": {"city": "Oslo"}}])},  # flat, JSON text
        {"role": "ipython", "content": "snowy"},  # Llama's name for tool results
        {"role": "assistant", "content": "Snowy.", "reasoning_content": [{"type": "text", "text": "It said snowy."}],
         "tool_calls": None, "tool_call_id": None},  # Arrow fills absent struct fields with None
    ])
    assert conversation == [
        {"role": "user", "content": "What is the weather?"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "content": "snowy"},
        {"role": "assistant", "content": "Snowy.", "reasoning_content": "It said snowy."},
    ]
    raw = normalise_conversation([{"role": "user", "content": ASK}, calling(call(arguments="{city: Oslo"))])
    assert isinstance(raw[1]["tool_calls"][0]["function"]["arguments"], RawArguments)


def pair(chosen_final, rejected_final, history=None, **extra):
    history = history or [{"role": "user", "content": ASK}]
    return {"chosen": history + [chosen_final], "rejected": history + [rejected_final],
            "tools": json.dumps(AGENT_TOOLS), **extra}


def good_pair(i):
    return pair(calling(call(arguments=json.dumps({"city": f"Oslo{i}"}))),
                calling(call(name="get_time", arguments=json.dumps({"city": f"Oslo{i}"}))))


def test_bad_agent_rows_cost_one_row_each(tmp_path):
    """Each bad row is dropped with its reason and line, the others train; the run is never aborted."""
    history = [{"role": "user", "content": ASK}, calling(call()), result()]
    bad = {
        "tool call arguments not valid JSON": pair(calling(call(arguments="{city: Oslo")), calling(call(name="get_time"))),
        "tool result without a preceding tool call": pair(
            {"role": "assistant", "content": "Snowy."}, {"role": "assistant", "content": "Sunny."},
            history=[{"role": "user", "content": ASK}, result()]),
        "tool result for unknown call id 'call00009'": pair(
            {"role": "assistant", "content": "Snowy."}, {"role": "assistant", "content": "Sunny."},
            history=history[:2] + [result(call_id="call00009")]),
        "more tool results than tool calls": pair(
            {"role": "assistant", "content": "Snowy."}, {"role": "assistant", "content": "Sunny."},
            history=history + [result()]),
        "tools not valid JSON": {**good_pair(0), "tools": "[{'name': 'get_weather'}"},
        "malformed tool call": pair(calling({"function": {"arguments": "{}"}}), calling(call())),
        "image_url content (image, audio and video messages are not supported)": pair(
            {"role": "assistant", "content": "Snowy."}, {"role": "assistant", "content": "Sunny."},
            history=[{"role": "user", "content": [{"type": "text", "text": ASK},
                                                  {"type": "image_url", "image_url": {"url": "x.png"}}]}]),
        "chosen/rejected prompts differ": {  # trajectories that diverge before the final turn
            "chosen": history + [{"role": "assistant", "content": "Snowy."}],
            "rejected": history[:2] + [result("sunny"), {"role": "assistant", "content": "Sunny."}]},
        "chosen == rejected": pair(calling(call()), calling(call(call_id="call00002"))),  # ids are not rendered
        "malformed message": pair({"role": "assistant", "content": None}, calling(call())),
    }
    rows = [good_pair(i) for i in range(3)] + list(bad.values()) + [good_pair(3)]
    entry = write_jsonl(tmp_path / "agent.jsonl", rows)
    dataset, report = _prepare_split(prep_cfg(chat_template="qwen_25"), tokenizer(), [entry], "train")
    _, counts, where, unit = report[0]
    assert unit == "line" and counts["kept"] == len(dataset) == 4
    assert where == {reason: [4 + i] for i, reason in enumerate(bad)}


def test_a_template_without_tools_costs_the_rows_that_have_them(tmp_path):
    """Llama 3's template (Axolotl's `llama3`) writes neither tools nor calls: rows with them are dropped by
    name, rows without them train."""
    plain = pair({"role": "assistant", "content": "Snowy."}, {"role": "assistant", "content": "Sunny."})
    del plain["tools"]
    entry = write_jsonl(tmp_path / "agent.jsonl", [good_pair(0), plain, {**plain, "tools": json.dumps(AGENT_TOOLS)}],
                        chat_template="llama3")
    _, report = _prepare_split(prep_cfg(), tokenizer("llama3"), [entry], "train")
    assert report[0][2] == {"chat template ignores tools": [1, 3]} and report[0][1]["kept"] == 1


def test_arguments_that_are_not_json_are_kept_by_a_template_that_takes_text(tmp_path):
    """DeepSeek V3 writes the arguments text as it is: a call whose arguments are not JSON is a valid
    (bad) answer there, trained verbatim, while dict arguments are given to it as JSON text."""
    rows = [pair(calling(call(arguments='{"city": "Oslo"}')), calling(call(arguments="{city: Oslo")))]
    entry = write_jsonl(tmp_path / "agent.jsonl", rows)
    tok = tokenizer("deepseek_v3")
    with pytest.raises(DatasetFormatError, match="chat template ignores tools: lines 1"):  # it has no tools section
        _prepare_split(prep_cfg(chat_template="deepseek_v3"), tok, [entry], "train")
    del rows[0]["tools"]
    dataset, report = _prepare_split(prep_cfg(chat_template="deepseek_v3"), tok, [write_jsonl(tmp_path / "b.jsonl", rows)],
                                     "train")
    assert dict(report[0][1]) == {"kept": 1}
    (good, bad), (good_plen, bad_plen) = dataset[0]["response_input_ids"], dataset[0]["response_prompt_len"]
    assert '{"city": "Oslo"}' in decode(tok, good[good_plen:])
    assert "{city: Oslo" in decode(tok, bad[bad_plen:])


def test_chat_template_types_read_tools_and_mappings_like_the_plugin_s_pairs(tmp_path):
    """`chat_template.default` with ShareGPT-style keys mapped by `message_property_mappings`, `roles` and a
    tools column named by `field_tools` gives the same examples as the plugin's pairwise reading of the
    same conversations; `chat_template.argilla_chat` too."""
    history = [{"role": "user", "content": ASK}, calling(call()), result()]
    finals = ({"role": "assistant", "content": "Snowy.", "reasoning_content": "It said snowy."},
              {"role": "assistant", "content": "Sunny.", "reasoning_content": "It said snowy."})

    def sharegpt(message):
        out = {k: v for k, v in message.items() if k not in ("role", "content")}
        return {"speaker": {"user": "person", "assistant": "model", "tool": "tool"}[message["role"]],
                "text": message["content"], **out}

    standard = write_jsonl(tmp_path / "pairs.jsonl", [pair(*finals, history=history)])
    default = write_jsonl(
        tmp_path / "default.jsonl",
        [{"conversation": [sharegpt(m) for m in history], "good": sharegpt(finals[0]), "bad": sharegpt(finals[1]),
          "functions": AGENT_TOOLS}],
        type="chat_template.default", field_messages="conversation", field_chosen="good", field_rejected="bad",
        field_tools="functions", message_property_mappings={"role": "speaker", "content": "text"},
        roles={"user": ["person"], "assistant": ["model"], "tool": ["tool"]})
    argilla = write_jsonl(tmp_path / "argilla.jsonl", [pair(*finals, history=history)], type="chat_template.argilla_chat")
    tok = tokenizer("qwen3")
    dataset, report = _prepare_split(prep_cfg(chat_template="qwen3"), tok, [standard, default, argilla], "train")
    assert [dict(entry[1]) for entry in report] == [{"kept": 1}] * 3
    assert dataset[0] == dataset[1] == dataset[2]
    ids, plen = dataset[1]["response_input_ids"][0], dataset[1]["response_prompt_len"][0]
    assert "It said snowy." in decode(tok, ids[plen:]) and "<tool_response>\nsnowy" in decode(tok, ids[:plen])
    assert decode(tok, ids[:plen]).count("Local time in a city.") == 1


def test_unpaired_and_positives_only_agent_rows(tmp_path):
    """Tool calls as the completion of unpaired (KTO-style) rows and as the final turn of SFT rows."""
    tok = tokenizer()
    unpaired = write_jsonl(tmp_path / "u.jsonl", [
        {"prompt": [{"role": "user", "content": ASK}], "completion": [calling(call())], "label": True,
         "tools": AGENT_TOOLS}])
    sft = write_jsonl(tmp_path / "s.jsonl", [{"messages": [{"role": "user", "content": ASK}, calling(call())],
                                              "tools": json.dumps(AGENT_TOOLS)}], type="bnf.sft")
    dataset, report = _prepare_split(prep_cfg(chat_template="qwen_25"), tok, [unpaired, sft], "train")
    assert [dict(entry[1]) for entry in report] == [{"kept": 1}] * 2
    for example in dataset:
        ids, plen = example["response_input_ids"][0], example["response_prompt_len"][0]
        assert decode(tok, ids[plen:]) == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n' \
                                          '</tool_call><|im_end|>'
        assert decode(tok, ids[:plen]).count("Weather in a city.") == 1


def test_image_and_audio_data_sets_are_refused_by_column(tmp_path):
    entry = write_jsonl(tmp_path / "vl.jsonl", [{**good_pair(0), "images": ["a.png"]}])
    with pytest.raises(DatasetFormatError, match=r"column 'images': image, audio and video preference data"):
        _prepare_split(prep_cfg(chat_template="qwen_25"), tokenizer(), [entry], "train")


def test_reasoning_a_template_does_not_write_costs_the_row(tmp_path):
    """Qwen2.5's template has no reasoning section: a final turn with `reasoning_content` would train
    without it, so the row is dropped by name; Qwen3 keeps it."""
    row = pair({"role": "assistant", "content": "Snowy.", "reasoning_content": "It is winter."},
               {"role": "assistant", "content": "Sunny."})
    entry = write_jsonl(tmp_path / "r.jsonl", [row])
    with pytest.raises(DatasetFormatError, match="chat template ignores the final turn's reasoning_content: lines 1"):
        _prepare_split(prep_cfg(chat_template="qwen_25"), tokenizer(), [entry], "train")
    dataset, report = _prepare_split(prep_cfg(chat_template="qwen3"), tokenizer("qwen3"), [entry], "train")
    ids, plen = dataset[0]["response_input_ids"][0], dataset[0]["response_prompt_len"][0]
    assert "It is winter." in decode(tokenizer("qwen3"), ids[plen:])


def completion_and_prompt(tok, example, i=0):
    ids, plen = example["response_input_ids"][i], example["response_prompt_len"][i]
    return decode(tok, ids[plen:]), decode(tok, ids[:plen])


def test_a_continuation_follows_the_prompt_column(tmp_path):
    """chosen / rejected that continue the conversation (a call and its result, then the answer) come after
    the row's prompt column, as in TRL's conversational prompt + completion; whole conversations do not."""
    tail = [calling(call()), result()]
    row = {"prompt": [{"role": "system", "content": "You are WeatherBot."}, {"role": "user", "content": ASK}],
           "chosen": tail + [{"role": "assistant", "content": "Snowy."}],
           "rejected": tail + [{"role": "assistant", "content": "Sunny."}], "tools": AGENT_TOOLS}
    tok = tokenizer()
    dataset, _ = _prepare_split(prep_cfg(chat_template="qwen_25"), tok, [write_jsonl(tmp_path / "c.jsonl", [row])], "train")
    completion, prompt = completion_and_prompt(tok, dataset[0])
    call_written = prompt.index('<tool_call>\n{"name": "get_weather"')
    assert prompt.index("You are WeatherBot.") < prompt.index(ASK) < call_written < prompt.index("snowy")
    assert completion == "Snowy.<|im_end|>"


@pytest.mark.parametrize("template,family", [("llama3_2_vision", "llama3"), ("llama4", "llama4"),
                                             ("command_a_tool_use", "command_a"), ("qwen_25", "qwen_25")])
def test_structured_tool_results_are_kept_by_templates_that_escape_them(tmp_path, template, family):
    """Llama 3.1+ / 4 and Command A write a result with `| tojson` (quotes and newlines escaped)."""
    content = json.dumps({"sky": "snowy", "temp": -3}, indent=1)
    history = [{"role": "user", "content": ASK}, calling(call()), result(content)]
    row = pair({"role": "assistant", "content": "Snowy."}, {"role": "assistant", "content": "Sunny."}, history=history)
    _, report = _prepare_split(prep_cfg(chat_template=template, sequence_len=16384), tokenizer(family),
                               [write_jsonl(tmp_path / "r.jsonl", [row])], "train")
    assert dict(report[0][1]) == {"kept": 1}


def test_older_and_sharegpt_call_shapes_become_tool_calls(tmp_path):
    """OpenAI's `function_call`, ShareGPT's `function_call` / `observation` turns (LLaMA-Factory, APIGen),
    doubly encoded arguments, flat tool schemas, an empty `tools` text, and a system note between a call
    and its result are all read; the call is written by the template in the prompt and the completion."""
    args = json.dumps({"city": "Oslo"})
    rows = [
        pair({"role": "assistant", "content": "", "function_call": {"name": "get_weather", "arguments": args}},
             calling(call(name="get_time"))),
        {"conversations": [{"from": "human", "value": ASK},
                           {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Oslo"}})},
                           {"from": "observation", "value": "snowy"},
                           {"from": "gpt", "value": "Snowy."}],
         "tools": json.dumps([t["function"] for t in AGENT_TOOLS])},  # flat schemas
        pair(calling(call(arguments=json.dumps(args))), calling(call(name="get_time")), tools=""),
        pair({"role": "assistant", "content": "Snowy."}, {"role": "assistant", "content": "Sunny."},
             history=[{"role": "user", "content": ASK}, calling(call()),
                      {"role": "system", "content": "Tools may be slow."}, result()]),
    ]
    tok = tokenizer()
    entries = [write_jsonl(tmp_path / f"{i}.jsonl", [row], **({"type": "bnf.sft"} if i == 1 else {}))
               for i, row in enumerate(rows)]
    dataset, report = _prepare_split(prep_cfg(chat_template="qwen_25"), tok, entries, "train")
    assert [dict(entry[1]) for entry in report] == [{"kept": 1}] * 4
    written = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    assert completion_and_prompt(tok, dataset[0])[0] == written + "<|im_end|>"
    completion, prompt = completion_and_prompt(tok, dataset[1])
    assert written in prompt and "<tool_response>\nsnowy" in prompt and prompt.count("Local time in a city.") == 1
    assert completion_and_prompt(tok, dataset[2])[0] == written + "<|im_end|>"
    assert "Tools may be slow." in completion_and_prompt(tok, dataset[3])[1]


def test_content_beside_a_call_that_the_template_drops_costs_the_row(tmp_path):
    """Llama 3.1+'s template writes a tool-call turn as the call alone: text beside it would vanish."""
    row = pair({**calling(call()), "content": "Let me look that up."}, calling(call(name="get_time")))
    entry = write_jsonl(tmp_path / "c.jsonl", [row, good_pair(0)])
    _, report = _prepare_split(prep_cfg(chat_template="llama3_2_vision"), tokenizer("llama3"), [entry], "train")
    assert report[0][2] == {"chat template ignores the content of a tool-call turn": [1]}
    tok = tokenizer()
    dataset, _ = _prepare_split(prep_cfg(chat_template="qwen_25"), tok, [entry], "train")
    assert completion_and_prompt(tok, dataset[0])[0].startswith("Let me look that up.\n<tool_call>")


def test_rows_through_arrow_keep_their_own_argument_and_schema_fields(tmp_path):
    """Parquet / hub rows: Arrow gives every row the struct keys of all rows, as nulls; they are not
    written into a row's call or schema."""
    from datasets import Dataset

    rows = [pair(calling(call(arguments={"city": "Oslo"})), calling(call(name="get_time", arguments={"city": "Oslo"}))),
            pair(calling(call(arguments={"query": "x", "limit": 3})), calling(call(name="get_time", arguments={"q": "y"})))]
    for r in rows:
        r["tools"] = AGENT_TOOLS + [{"type": "function", "function": {"name": "search", "parameters": {
            "type": "object", "properties": {"query": {"type": "string"}}}, "strict": True}}] * (r is rows[1])
    path = tmp_path / "agent.parquet"
    Dataset.from_list(rows).to_parquet(str(path))
    tok = tokenizer()
    dataset, report = _prepare_split(prep_cfg(chat_template="qwen_25"), tok,
                                     [{"path": str(path), "ds_type": "parquet"}], "train")
    assert dict(report[0][1]) == {"kept": 2}
    completion, prompt = completion_and_prompt(tok, dataset[0])
    assert completion == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>'
    assert "null" not in prompt and "strict" not in prompt


# A template that prints arguments as given (`{{ ... }}`): a dict would come out as Python's repr.
PRINTS_ARGUMENTS = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] }}"
    "{% for c in m.tool_calls or [] %}{{ '<call>' + c.function.name + ' ' }}{{ c.function.arguments }}{{ '</call>' }}"
    "{% endfor %}{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_a_template_that_prints_arguments_as_given_gets_json_text(tmp_path):
    row = pair(calling(call(arguments={"city": "Oslo"})), calling(call(name="get_time")))
    del row["tools"]
    entry = write_jsonl(tmp_path / "p.jsonl", [row], chat_template="jinja", chat_template_jinja=PRINTS_ARGUMENTS)
    tok = tokenizer()
    dataset, _ = _prepare_split(prep_cfg(), tok, [entry], "train")
    assert completion_and_prompt(tok, dataset[0])[0] == '<call>get_weather {"city": "Oslo"}</call><|im_end|>'
