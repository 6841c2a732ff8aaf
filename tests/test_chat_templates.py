"""Axolotl's chat templates through the plugin's own data path, with tokenizers carrying each family's
special tokens (built locally, `tiny.build_chat_tokenizer`).

For every family, single-turn pairs, multi-turn pairs (system + user / assistant / user + final turn) and
unpaired rows go through `_prepare_split` with `chat_template: <name>`, and each response must be the
template's own tokenization of the whole conversation (`apply_chat_template(..., tokenize=True)`), cut
only after the final turn's end of turn; the completion holds the final turn and its end of turn and
nothing of an earlier turn, the prompt nothing of the final turn, BOS appears once. Templates that
rewrite turns (Qwen3 reasoning, default system prompts, Mistral's system placement), templates that
refuse rows, and SentencePiece-style tokenizers whose pieces span the prompt/completion boundary have
their own tests; every other Axolotl template is swept with the plugin's tiny tokenizer.
"""
from __future__ import annotations

import json
from functools import lru_cache

import pytest

from axolotl.utils.chat_templates import get_chat_template
from axolotl.utils.chat_templates.base import _CHAT_TEMPLATES
from axolotl.utils.dict import DictDefault
from axolotl_bnf_plugin.data.adapters import Candidate
from axolotl_bnf_plugin.data.examples import candidate_example
from axolotl_bnf_plugin.data.loader import _prepare_split
from axolotl_bnf_plugin.data.tokenize import LengthPolicy
from axolotl_bnf_plugin.tiny import CHAT_TOKENIZER_SPECS, build_chat_tokenizer, build_tokenizer, toy_pairs

SYSTEM = "You are brief and kind."
U1, A1, U2 = "Tell me about rain.", "rain is gentle and warm.", "And rivers?"
GOOD, BAD = "rivers are calm and clear, fed by rain.", "rivers are rude and wrong."
SINGLE_U = "Tell me about oceans."


def msg(role, content):
    return {"role": role, "content": content}


def conversation(system: bool, multi: bool) -> list[dict]:
    turns = [msg("user", U1), msg("assistant", A1), msg("user", U2)] if multi else [msg("user", SINGLE_U)]
    return ([msg("system", SYSTEM)] if system else []) + turns


# family -> the end of turn its completions must end with
FAMILIES = {
    "llama3": "<|eot_id|>",
    "llama4": "<|eot|>",
    "qwen_25": "<|im_end|>",
    "qwen3": "<|im_end|>",
    "chatml": "<|im_end|>",
    "gemma": "<end_of_turn>",
    "gemma3": "<end_of_turn>",
    "gemma4": "<turn|>",
    "mistral_v1": "</s>",
    "mistral_v2v3": "</s>",
    "mistral_v3_tekken": "</s>",
    "mistral_v7_tekken": "</s>",
    "phi_3": "<|end|>",
    "phi_35": "<|end|>",
    "phi_4": "<|im_end|>",
    "command_a": "<|END_OF_TURN_TOKEN|>",
    "cohere": "<|END_OF_TURN_TOKEN|>",
    "deepseek_v3": "<｜end▁of▁sentence｜>",
    "llava": "</s>",  # writes nothing after the content: the tokenizer's EOS is appended
}
REFUSED_WITH_SYSTEM = {
    "gemma": "chat template: System role not supported",
    # the system message goes into the last user turn only while that turn is the last message
    "mistral_v2v3": "template not prefix-stable",
    "mistral_v3_tekken": "template not prefix-stable",
}
# what the template writes after the final turn's end of turn, cut from the completion
TRAILERS = {"command_a": "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>"}
# templates whose generation prompt opens the assistant turn differently from a written turn
OPENS_DIFFERENTLY = {"gemma4": "<|turn>model\n"}


def test_every_family_here_is_an_axolotl_template():
    assert set(FAMILIES) <= set(_CHAT_TEMPLATES) and set(FAMILIES) <= set(CHAT_TOKENIZER_SPECS)


@lru_cache(maxsize=None)
def family_tokenizer(family: str):
    return build_chat_tokenizer(family)


def prep_cfg(**overrides):
    return DictDefault({"sequence_len": 4096, "excess_length_strategy": None, "dataset_num_proc": None,
                        "chat_template": None, "hf_use_auth_token": False, "shuffle_merged_datasets": False,
                        "seed": 0, **overrides})


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"path": str(path), "ds_type": "json"}


def decode(tok, ids) -> str:
    """The text a run of tokens covers (SentencePiece-style: the pieces with "▁" as spaces, since their
    decoder drops the leading space of whatever run it is given)."""
    if type(tok.backend_tokenizer.pre_tokenizer).__name__ == "Metaspace":
        return "".join(tok.convert_ids_to_tokens(list(ids))).replace("▁", " ")
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def bos_added_by_tokenizer(tok, text: str) -> bool:
    """Plain tokenization puts BOS first and the rendering does not start with it (a template that writes
    no BOS on a tokenizer that adds one: the plugin keeps the tokenizer's BOS)."""
    return bool(tok.bos_token) and not text.startswith(tok.bos_token) and \
        tok("x")["input_ids"][:1] == [tok.bos_token_id]


def check_response(tok, template: str, history: list[dict], final: dict, ids: list[int], plen: int,
                   eot: str | None = None, trailer: str | None = None, opens_differently: str | None = None):
    """The response's ids are the whole conversation's, split right after the prompt (module doc)."""
    whole = tok.apply_chat_template(history + [final], tokenize=False, chat_template=template)
    ref = tok.apply_chat_template(history + [final], tokenize=True, return_dict=False, chat_template=template)
    generation_prompt = tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True,
                                                chat_template=template)
    if bos_added_by_tokenizer(tok, whole):
        ref = [tok.bos_token_id] + ref
    add_special = not (tok.bos_token and whole.startswith(tok.bos_token))
    gen_ids = tok(generation_prompt, add_special_tokens=add_special)["input_ids"]
    content = final["content"]

    body = ids
    if whole.rstrip().endswith(content):
        # The template closes nothing after the content (llava): whitespace after it dropped, EOS appended.
        assert ids[-1] == tok.eos_token_id
        body = ids[:-1]
        ref = tok(whole.rstrip(), add_special_tokens=add_special)["input_ids"]
    # The whole conversation's tokens, up to the end of the final turn's end of turn.
    assert body == ref[: len(body)], (decode(tok, body), decode(tok, ref))
    rest = decode(tok, ref[len(body):])
    assert rest.strip() == (trailer or ""), rest
    prompt, completion = decode(tok, ids[:plen]), decode(tok, ids[plen:])
    # The prompt: the template's generation prompt, all of it (or up to a straddling token / where the
    # final turn opens differently); nothing of the final turn in it, nothing of an earlier turn after it.
    assert ids[:plen] == gen_ids[:plen]
    straddle = 0
    if opens_differently:
        assert prompt.endswith(opens_differently), prompt
    elif plen != len(gen_ids):
        # A piece of the whole text spans the boundary: it is scored with the completion, so it may carry
        # the end of the prompt; everything after it is the final turn's.
        assert ids[plen] != gen_ids[plen]
        straddle = 1
    assert content not in prompt and content in completion
    for earlier in history:
        assert earlier["content"] not in decode(tok, ids[plen + straddle:])
    if history:
        assert history[-1]["content"] in decode(tok, ids[: plen + straddle])
    if eot:
        assert completion.endswith(eot), completion
        assert completion.count(eot) == 1
    if tok.bos_token:
        has_bos = whole.startswith(tok.bos_token) or bos_added_by_tokenizer(tok, whole)
        assert ids.count(tok.bos_token_id) == (1 if has_bos else 0)
    return prompt, completion


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_single_multi_and_unpaired(family, tmp_path):
    tok = family_tokenizer(family)
    template = get_chat_template(family)
    tok.chat_template = None  # the config's `chat_template:` must be what renders
    try:
        cases = []  # (ds_cfg, history, [finals], system)
        for system in (True, False):
            s = "sys" if system else "nosys"
            single = {"question": SINGLE_U, "chosen": GOOD, "rejected": BAD, **({"system": SYSTEM} if system else {})}
            multi = {"chosen": conversation(system, True) + [msg("assistant", GOOD)],
                     "rejected": conversation(system, True) + [msg("assistant", BAD)]}
            unpaired = {"prompt": conversation(system, True), "completion": [msg("assistant", BAD)], "label": False}
            for name, row, multi_turn, finals in (("single", single, False, [GOOD, BAD]),
                                                  ("multi", multi, True, [GOOD, BAD]),
                                                  ("unpaired", unpaired, True, [BAD])):
                ds = write_jsonl(tmp_path / f"{name}_{s}.jsonl", [row])
                cases.append((ds, conversation(system, multi_turn), finals, system))
        dataset, report = _prepare_split(prep_cfg(chat_template=family), tok, [c[0] for c in cases], "train")
    finally:
        tok.chat_template = template
    kept = iter(dataset)
    for (ds_cfg, history, finals, system), entry in zip(cases, report):
        counts = dict(entry[1])
        if system and family in REFUSED_WITH_SYSTEM:
            assert counts == {REFUSED_WITH_SYSTEM[family]: 1}, (ds_cfg, counts)
            continue
        assert counts == {"kept": 1}, (ds_cfg, counts)
        example = next(kept)
        assert len(example["response_input_ids"]) == len(finals)
        assert example["response_sign"] == ([1, -1] if len(finals) == 2 else [-1])
        for ids, plen, content in zip(example["response_input_ids"], example["response_prompt_len"], finals):
            check_response(tok, template, history, msg("assistant", content), ids, plen, eot=FAMILIES[family],
                           trailer=TRAILERS.get(family), opens_differently=OPENS_DIFFERENTLY.get(family))
    assert next(kept, None) is None


def examples_for(tok, template, history, finals):
    candidate = Candidate(history, [(msg("assistant", c), 1 if i == 0 else -1) for i, c in enumerate(finals)],
                          len(finals) == 2)
    example = candidate_example(candidate, tok, template, LengthPolicy(4096, "drop"))
    return example


def test_default_system_prompts_are_in_the_prompt():
    """Templates that insert a default system prompt when the conversation has none: it is part of the
    prompt, as in the template's generation prompt."""
    for family, default in (("qwen_25", "You are Qwen"), ("phi_4", "You are Phi"),
                            ("mistral_v7_tekken", "You are Mistral Small 3"), ("command_a", "System Preamble")):
        tok = family_tokenizer(family)
        example = examples_for(tok, get_chat_template(family), conversation(False, True), [GOOD, BAD])
        assert example["bnf_status"] == "kept", (family, example["bnf_status"])
        for ids, plen in zip(example["response_input_ids"], example["response_prompt_len"]):
            assert default in decode(tok, ids[:plen]) and default not in decode(tok, ids[plen:])


REASONING = "the user asks about rivers; keep it short."


@pytest.mark.parametrize("family", ["qwen3", "deepseek_v3"])
def test_reasoning_turns_follow_the_template(family):
    """Qwen3 drops the <think> block of earlier assistant turns and keeps the final turn's; DeepSeek V3
    drops it from every assistant turn. The training sequence is the template's rendering either way."""
    tok = family_tokenizer(family)
    template = get_chat_template(family)
    history = [msg("system", SYSTEM), msg("user", U1), msg("assistant", f"<think>\nearlier thoughts\n</think>\n\n{A1}"),
               msg("user", U2)]
    finals = [f"<think>\n{REASONING}\n</think>\n\n{GOOD}", BAD]
    example = examples_for(tok, template, history, finals)
    assert example["bnf_status"] == "kept"
    (good_ids, bad_ids), (good_plen, bad_plen) = example["response_input_ids"], example["response_prompt_len"]
    for ids in (good_ids, bad_ids):
        assert "earlier thoughts" not in decode(tok, ids)  # earlier reasoning dropped, as the template does
    whole = tok.apply_chat_template(history + [msg("assistant", finals[0])], tokenize=True, return_dict=False,
                                    chat_template=template)
    assert good_ids == whole[: len(good_ids)] and decode(tok, whole[len(good_ids):]).strip() == ""
    good_prompt, good_completion = decode(tok, good_ids[:good_plen]), decode(tok, good_ids[good_plen:])
    bad_prompt, bad_completion = decode(tok, bad_ids[:bad_plen]), decode(tok, bad_ids[bad_plen:])
    if family == "qwen3":
        # The generation prompt opens an empty <think> block; a turn with its own reasoning parts from it
        # after "<think>\n": the reasoning is scored, the prompt ends inside the template's own text.
        assert bad_prompt.endswith("<|im_start|>assistant\n<think>\n\n")
        assert bad_completion == f"</think>\n\n{BAD}<|im_end|>"
        assert good_prompt == bad_prompt[:-1]
        assert good_completion == f"{REASONING}\n</think>\n\n{GOOD}<|im_end|>"
    else:
        assert REASONING not in decode(tok, good_ids)  # the template drops it from the final turn too
        # (it keeps what follows "</think>", newlines included)
        assert good_prompt == bad_prompt and good_completion == f"\n\n{GOOD}<｜end▁of▁sentence｜>"
    check_response(tok, template, history, msg("assistant", BAD), bad_ids, bad_plen, eot=tok.eos_token)


# Generation prompt opening a reasoning block that written assistant turns do not have.
OPENS_THINKING = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n\\n' }}{% endif %}"
)


def test_final_turn_text_never_enters_the_prompt_where_the_turn_opens_differently(tmp_path):
    """Where the final turn opens differently from the generation prompt, the prompt stops before the
    message's own text, even when that text starts like the generation prompt's continuation."""
    tok = family_tokenizer("qwen3")
    content = f"<think>\nsecond thoughts</think>{GOOD}"
    rows = [{"prompt": conversation(True, True), "completion": [msg("assistant", content)], "label": True}]
    ds = {**write_jsonl(tmp_path / "d.jsonl", rows), "chat_template": "jinja", "chat_template_jinja": OPENS_THINKING}
    dataset, _ = _prepare_split(prep_cfg(), tok, [ds], "train")
    ids, plen = dataset[0]["response_input_ids"][0], dataset[0]["response_prompt_len"][0]
    assert decode(tok, ids[:plen]).endswith(f"{U2}<|im_end|>\n<|im_start|>assistant\n")
    assert decode(tok, ids[plen:]) == f"{content}<|im_end|>"


def test_rows_a_template_refuses_are_counted_not_raised():
    tok = family_tokenizer("gemma")
    template = get_chat_template("gemma")
    refused = examples_for(tok, template, conversation(True, False), [GOOD, BAD])
    assert refused["bnf_status"] == "chat template: System role not supported"
    not_alternating = examples_for(tok, template, [msg("user", U1), msg("user", U2)], [GOOD])
    assert not_alternating["bnf_status"].startswith("chat template: Conversation roles must alternate")


@pytest.mark.parametrize("family", ["mistral_v1", "phi_3", "gemma3", "llava"])
def test_sentencepiece_boundary_keeps_the_whole_conversation_tokens(family):
    """SentencePiece-style tokenizers (Metaspace "▁" spaces; Llama 2 / Mistral v1 / Phi-3 with the prefix
    space, Gemma without) trained on the conversations themselves, so that their pieces span the
    prompt/completion boundary: the sequence stays the whole conversation's tokens and the straddling
    piece is scored with the completion, where tokenizing prompt and completion apart would train on a
    sequence the template never produces."""
    template = get_chat_template(family)
    histories = [conversation(False, False), conversation(False, True)]
    if family not in REFUSED_WITH_SYSTEM:
        histories.append(conversation(True, True))
    finals = [GOOD, BAD]
    scratch = family_tokenizer(family)
    corpus = [scratch.apply_chat_template(h + [msg("assistant", f)], tokenize=False, chat_template=template)
              for h in histories for f in finals] * 50
    tok = build_chat_tokenizer(family, corpus=corpus, vocab_size=1200)
    straddles = 0
    for history in histories:
        example = examples_for(tok, template, history, finals)
        assert example["bnf_status"] == "kept"
        for ids, plen, content in zip(example["response_input_ids"], example["response_prompt_len"], finals):
            check_response(tok, template, history, msg("assistant", content), ids, plen, eot=FAMILIES[family])
            generation_prompt = tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True,
                                                        chat_template=template)
            whole = tok.apply_chat_template(history + [msg("assistant", content)], tokenize=False,
                                            chat_template=template)
            add_special = not whole.startswith(tok.bos_token)
            gen_ids = tok(generation_prompt, add_special_tokens=add_special)["input_ids"]
            if ids[: len(gen_ids)] != gen_ids:
                straddles += 1
                # The piece at the boundary starts in the generation prompt and ends in the final turn.
                pieces = tok.convert_ids_to_tokens(ids)
                covered = len("".join(pieces[:plen]))
                offset = 1 if add_special else 0  # BOS the tokenizer put first (llava's template writes none)
                assert covered - len(tok.bos_token) * offset < len(generation_prompt) < \
                    covered - len(tok.bos_token) * offset + len(pieces[plen]), pieces[plen - 1: plen + 2]
                apart = gen_ids + tok(whole[len(generation_prompt):].rstrip(), add_special_tokens=False)["input_ids"]
                assert apart[: len(ids)] != ids  # what a separate tokenization would have trained on instead
    if family in ("mistral_v1", "llava"):  # boundaries in plain text; the others cut after a special token
        assert straddles, "the corpus was meant to give pieces spanning the boundary"


def test_template_without_bos_on_a_tokenizer_that_adds_it():
    """chatml on a tokenizer that puts BOS first by itself: BOS once, then the template's text."""
    tok = family_tokenizer("chatml")
    example = examples_for(tok, get_chat_template("chatml"), conversation(True, True), [GOOD, BAD])
    for ids in example["response_input_ids"]:
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


def test_config_chat_template_wins_over_the_tokenizer_s_own(tmp_path):
    """`chat_template: llama3` on a tokenizer whose own template is chatml renders with llama3; without a
    `chat_template:` the tokenizer's own is used."""
    tok = family_tokenizer("llama3")
    own = tok.chat_template
    tok.chat_template = get_chat_template("chatml")
    try:
        ds = write_jsonl(tmp_path / "d.jsonl", [{"question": SINGLE_U, "chosen": GOOD, "rejected": BAD}])
        llama, _ = _prepare_split(prep_cfg(chat_template="llama3"), tok, [ds], "train")
        chatml, _ = _prepare_split(prep_cfg(), tok, [ds], "train")
    finally:
        tok.chat_template = own
    assert "<|start_header_id|>" in decode(tok, llama[0]["response_input_ids"][0])
    assert "<|im_start|>" in decode(tok, chatml[0]["response_input_ids"][0])


# Every other Axolotl template, with the plugin's tiny tokenizer (chatml specials, EOS <|im_end|>).
SWEPT = sorted(set(_CHAT_TEMPLATES) - set(FAMILIES))
SWEEP_REFUSALS = {("pixtral", True): "template not prefix-stable"}  # Mistral's system placement
SWEEP_OPENS_DIFFERENTLY = {"gemma4_unified": "<|turn>model\n"}


@lru_cache(maxsize=None)
def tiny_tokenizer():
    return build_tokenizer(toy_pairs(16))


@pytest.mark.parametrize("name", SWEPT)
def test_other_axolotl_templates(name):
    tok = tiny_tokenizer()
    template = get_chat_template(name)
    for system in (True, False):
        for multi in (False, True):
            history = conversation(system, multi)
            example = examples_for(tok, template, history, [GOOD, BAD])
            if (name, system) in SWEEP_REFUSALS:
                assert example["bnf_status"] == SWEEP_REFUSALS[(name, system)]
                continue
            assert example["bnf_status"] == "kept", (name, system, multi, example["bnf_status"])
            for ids, plen, content in zip(example["response_input_ids"], example["response_prompt_len"], [GOOD, BAD]):
                # (EOS here is <|im_end|>: Command A's trailing turn opener stays in the completion)
                check_response(tok, template, history, msg("assistant", content), ids, plen,
                               opens_differently=SWEEP_OPENS_DIFFERENTLY.get(name))
