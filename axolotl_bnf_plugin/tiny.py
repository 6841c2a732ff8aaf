"""Build a tiny local causal LM, its tokenizer and a separable toy preference data set.

Used by the demo and the end-to-end tests (no model hub is needed): `python -m axolotl_bnf_plugin.tiny
OUT_DIR` writes `OUT_DIR/model` (a randomly initialised Llama-architecture model with a chatml chat
template), `OUT_DIR/pairs_intel.jsonl` (Intel/orca_dpo_pairs columns: system, question, chosen,
rejected), `OUT_DIR/pairs_messages.jsonl` (chat_template.default columns: messages, chosen,
rejected), `OUT_DIR/unpaired.jsonl` (prompt / completion messages / boolean label) and
`OUT_DIR/sft_alpaca.jsonl` (instruction / input / output, positives only). Preferred answers use one word family and dispreferred ones another, so a working
preference method must raise the chosen log-likelihood relative to the rejected one.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "<|im_start|>", "<|im_end|>", "<unk>"]
TOPICS = ["rivers", "mountains", "gardens", "music", "oceans", "forests", "cities", "stars", "bread", "rain"]
GOOD_WORDS = ["bright", "clear", "kind", "calm", "warm", "gentle", "honest", "careful", "helpful", "precise"]
BAD_WORDS = ["dull", "vague", "rude", "noisy", "cold", "harsh", "sloppy", "careless", "useless", "wrong"]


def _answer(rng: random.Random, words: list[str], topic: str) -> str:
    picked = rng.sample(words, 4)
    return f"{topic} are {picked[0]} and {picked[1]}, {picked[2]} and {picked[3]}."


def toy_pairs(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        topic = rng.choice(TOPICS)
        rows.append(
            {
                "system": "You are a helpful assistant.",
                "question": f"Tell me about {topic}.",
                "chosen": _answer(rng, GOOD_WORDS, topic),
                "rejected": _answer(rng, BAD_WORDS, topic),
            }
        )
    return rows


CITIES = ["Paris", "Rome", "Oslo", "Lima", "Cairo", "Tokyo", "Quito", "Perth"]
SKIES = ["sunny", "cloudy", "rainy", "windy", "snowy"]


def _city_tool(name: str, description: str) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


AGENT_TOOLS = [_city_tool("get_weather", "Weather in a city."), _city_tool("get_time", "Local time in a city.")]


def agent_pairs(n: int, seed: int = 0) -> list[dict]:
    """Tool-calling preference rows as agent data sets store them: chosen / rejected whole conversations in
    the OpenAI message format (calls with `content: null` and arguments as JSON text, `tool` results with
    `tool_call_id`), and the tool schemas as a JSON-text `tools` column.

    Even rows end in a call: chosen calls get_weather for the asked city, rejected calls get_time, or
    get_weather for another city. Odd rows have a call and its result in the history and answer in text,
    with reasoning (`reasoning_content`): chosen reports the sky the tool gave, rejected another one."""
    rng = random.Random(seed)

    def calls(name: str, city: str, call_id: str) -> dict:
        return {"role": "assistant", "content": None, "tool_calls": [{"id": call_id, "type": "function", "function": {
            "name": name, "arguments": json.dumps({"city": city})}}]}

    rows = []
    for i in range(n):
        city, other = rng.sample(CITIES, 2)
        ask = [{"role": "user", "content": f"What is the weather in {city}?"}]
        call_id = f"call{i:05d}"
        if i % 2 == 0:
            wrong = calls("get_time", city, call_id) if rng.random() < 0.5 else calls("get_weather", other, call_id)
            chosen, rejected = ask + [calls("get_weather", city, call_id)], ask + [wrong]
        else:
            sky, wrong_sky = rng.sample(SKIES, 2)
            history = ask + [calls("get_weather", city, call_id),
                             {"role": "tool", "tool_call_id": call_id, "name": "get_weather", "content": sky}]
            thought = f"The tool says {city} is {sky}."
            chosen = history + [{"role": "assistant", "content": f"It is {sky} in {city}.", "reasoning_content": thought}]
            rejected = history + [{"role": "assistant", "content": f"It is {wrong_sky} in {city}.",
                                   "reasoning_content": thought}]
        rows.append({"chosen": chosen, "rejected": rejected, "tools": json.dumps(AGENT_TOOLS)})
    return rows


def _corpus(rows: list[dict[str, str]]) -> list[str]:
    texts = [CHATML_TEMPLATE] + [w for w in GOOD_WORDS + BAD_WORDS + TOPICS]
    for row in rows:
        texts += [row["system"], row["question"], row["chosen"], row["rejected"], "user assistant system"]
    return texts


def build_tokenizer(rows: list[dict[str, str]], vocab_size: int = 640):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Every byte is in the alphabet, so any text (not just the toy corpus) tokenizes without <unk>.
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(rows), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


# Tokenizers carrying the special tokens of the families behind Axolotl's chat templates (the keys are
# Axolotl's `chat_template:` names), built locally for tests of chat rendering. `kind` is "bytelevel"
# (GPT-2 / tiktoken style BPE) or "sentencepiece" (BPE with a Metaspace pre-tokenizer: spaces become
# "▁", with the leading "▁" of Llama 2 / Mistral v1 unless `prefix_space` is False, as in Gemma).
# `add_bos`: plain tokenization (`add_special_tokens=True`) puts BOS first, as those families' tokenizers do.
_CHAT_FAMILY_BASE = {
    "llama3": dict(bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|finetune_right_pad_id|>", add_bos=True,
                   specials=["<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
                             "<|python_tag|>"]),
    "llama4": dict(bos="<|begin_of_text|>", eos="<|eot|>", pad="<|finetune_right_pad|>", add_bos=True,
                   specials=["<|end_of_text|>", "<|header_start|>", "<|header_end|>", "<|eom|>",
                             "<|python_start|>", "<|python_end|>"]),
    "qwen_25": dict(bos=None, eos="<|im_end|>", pad="<|endoftext|>", specials=["<|im_start|>"],
                    tokens=["<tool_call>", "</tool_call>"]),
    "qwen3": dict(bos=None, eos="<|im_end|>", pad="<|endoftext|>", specials=["<|im_start|>"],
                  tokens=["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]),
    "chatml": dict(bos="<s>", eos="<|im_end|>", pad="<pad>", add_bos=True, specials=["<|im_start|>"]),
    "gemma": dict(bos="<bos>", eos="<eos>", pad="<pad>", add_bos=True, kind="sentencepiece", prefix_space=False,
                  specials=["<start_of_turn>", "<end_of_turn>"]),
    "gemma3": dict(bos="<bos>", eos="<eos>", pad="<pad>", add_bos=True, kind="sentencepiece", prefix_space=False,
                   specials=["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>"]),
    "gemma4": dict(bos="<bos>", eos="<eos>", pad="<pad>", add_bos=True, kind="sentencepiece", prefix_space=False,
                   specials=["<|turn>", "<turn|>", "<|channel>", "<channel|>", "<|think|>", "<|image|>", "<|tool>",
                             "<tool|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>",
                             '<|"|>']),
    "mistral_v1": dict(bos="<s>", eos="</s>", add_bos=True, kind="sentencepiece"),
    "mistral_v2v3": dict(bos="<s>", eos="</s>", add_bos=True, kind="sentencepiece",
                         specials=["[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
                                   "[/TOOL_RESULTS]", "[TOOL_CALLS]"]),
    "mistral_v3_tekken": dict(bos="<s>", eos="</s>", add_bos=True,
                              specials=["[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                                        "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]"]),
    "mistral_v7_tekken": dict(bos="<s>", eos="</s>", add_bos=True,
                              specials=["[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[AVAILABLE_TOOLS]",
                                        "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]",
                                        "[IMG]"]),
    "phi_3": dict(bos="<s>", eos="<|endoftext|>", add_bos=True, kind="sentencepiece",
                  specials=["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]),
    "phi_35": dict(bos="<s>", eos="<|endoftext|>", kind="sentencepiece",
                   specials=["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]),
    "phi_4": dict(bos="<|endoftext|>", eos="<|im_end|>", pad="<|dummy_85|>", specials=["<|im_start|>", "<|im_sep|>"]),
    "command_a": dict(bos="<BOS_TOKEN>", eos="<|END_OF_TURN_TOKEN|>", pad="<PAD>", add_bos=True,
                      specials=["<|START_OF_TURN_TOKEN|>", "<|SYSTEM_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>",
                                "<|START_RESPONSE|>", "<|END_RESPONSE|>", "<|START_THINKING|>", "<|END_THINKING|>",
                                "<|START_ACTION|>", "<|END_ACTION|>", "<|START_TOOL_RESULT|>", "<|END_TOOL_RESULT|>"]),
    "cohere": dict(bos="<BOS_TOKEN>", eos="<|END_OF_TURN_TOKEN|>", pad="<PAD>", add_bos=True,
                   specials=["<|START_OF_TURN_TOKEN|>", "<|SYSTEM_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>"]),
    "deepseek_v3": dict(bos="<｜begin▁of▁sentence｜>", eos="<｜end▁of▁sentence｜>", pad="<｜▁pad▁｜>", add_bos=True,
                        specials=["<｜User｜>", "<｜Assistant｜>", "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>",
                                  "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>",
                                  "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>",
                                  "<｜tool▁output▁end｜>"],
                        tokens=["<think>", "</think>"]),
    "llava": dict(bos="<s>", eos="</s>", add_bos=True, kind="sentencepiece", specials=["<image>"]),
}
CHAT_TOKENIZER_SPECS = {name: {"kind": "bytelevel", "prefix_space": True, "add_bos": False, "pad": None,
                               "specials": [], "tokens": [], **spec} for name, spec in _CHAT_FAMILY_BASE.items()}
_CHAT_CORPUS_ALPHABET = [chr(i) for i in range(32, 127)] + ["\n", "\t"]


def build_chat_tokenizer(family: str, corpus: list[str] | None = None, vocab_size: int = 800, **spec_overrides):
    """A small tokenizer with the special tokens of `family` (a key of `CHAT_TOKENIZER_SPECS`), trained on
    `corpus` (default: the toy data set's text) and carrying Axolotl's template of that name, if it has one.

    SentencePiece-style tokenizers are trained without splitting at spaces, so their pieces may span
    a space or a newline, as a prompt/completion boundary can."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    spec = {**CHAT_TOKENIZER_SPECS[family], **spec_overrides}
    bos, eos, pad, unk = spec["bos"], spec["eos"], spec["pad"], "<unk>"
    specials = list(dict.fromkeys(t for t in [pad or "<pad>", bos, eos, unk, *spec["specials"]] if t))
    texts = list(corpus) if corpus is not None else _corpus(toy_pairs(32))
    if spec["kind"] == "sentencepiece":
        scheme = "first" if spec["prefix_space"] else "never"
        tok = Tokenizer(models.BPE(unk_token=unk))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
        alphabet = _CHAT_CORPUS_ALPHABET + ["▁"]
    else:
        tok = Tokenizer(models.BPE(unk_token=unk))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=alphabet)
    tok.train_from_iterator(texts, trainer=trainer)
    if spec["add_bos"] and bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad or "<pad>",
                                   unk_token=unk, additional_special_tokens=list(spec["specials"]))
    if spec["tokens"]:
        fast.add_tokens([AddedToken(t, special=False, normalized=False) for t in spec["tokens"]])
    try:
        from axolotl.utils.chat_templates import get_chat_template

        fast.chat_template = get_chat_template(family)
    except (ImportError, ValueError):
        fast.chat_template = CHATML_TEMPLATE
    return fast


def build_model(vocab_size: int, seed: int = 0, hidden_size: int = 64, layers: int = 2, tie: bool = False):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=3,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config)


# Tiny random models of other causal-LM families, on the same tokenizer (ids 0 / 1 / 3 = pad / bos / eos).
# Each entry: (config class, model class, the family's own keys). Soft-capped, scaled and tied heads use
# values far enough from the identity that scoring without them would give other log-probs.
FAMILY_SPECS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               {"head_dim": 8, "query_pre_attn_scalar": 8, "final_logit_softcapping": 2.0, "tie_word_embeddings": True}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               {"head_dim": 8, "query_pre_attn_scalar": 8, "final_logit_softcapping": 2.0, "sliding_window": 16,
                "tie_word_embeddings": True}),
    "cohere": ("CohereConfig", "CohereForCausalLM", {"logit_scale": 0.25, "tie_word_embeddings": True}),
    "granite": ("GraniteConfig", "GraniteForCausalLM",
                {"logits_scaling": 4.0, "embedding_multiplier": 4.0, "residual_multiplier": 0.5,
                 "attention_multiplier": 0.125}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {"num_key_value_heads": None}),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", {"tie_word_embeddings": True}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  {"head_dim": 8, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                   "norm_topk_prob": True}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
}


def family_config(family: str, vocab_size: int, hidden_size: int = 32, layers: int = 2, **overrides):
    """A transformers config for a tiny model of `family` (a key of `FAMILY_SPECS`)."""
    import transformers

    config_name, _, own = FAMILY_SPECS[family]
    keys = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=3,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    keys.update(own)
    keys.update(overrides)
    keys = {k: v for k, v in keys.items() if not (k == "num_key_value_heads" and v is None)}
    return getattr(transformers, config_name)(**keys)


def build_family_model(family: str, vocab_size: int, seed: int = 0, **config_overrides):
    """A randomly initialised tiny causal LM of `family`; `config_overrides` go to `family_config`."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, FAMILY_SPECS[family][1])(family_config(family, vocab_size, **config_overrides))
    return model.float()


def save_family_model(family: str, tokenizer_dir: str | Path, out_dir: str | Path, seed: int = 0,
                      **config_overrides) -> Path:
    """`build_family_model` saved with `save_pretrained` to `out_dir`, with the tokenizer of `tokenizer_dir`
    (a `build_assets` model directory), ready to be an Axolotl `base_model`."""
    from transformers import AutoTokenizer

    out = Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    build_family_model(family, len(tokenizer), seed=seed, **config_overrides).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_assets(out_dir: str | Path, n_rows: int = 64, seed: int = 0, tie: bool = False) -> Path:
    """Write model, tokenizer and data sets under `out_dir`; returns `out_dir` as a Path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = toy_pairs(n_rows, seed)
    tokenizer = build_tokenizer(rows)
    model = build_model(len(tokenizer), seed=seed, tie=tie)
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    with open(out / "pairs_intel.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    with open(out / "pairs_messages.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            message_row = {
                "messages": [
                    {"role": "system", "content": row["system"]},
                    {"role": "user", "content": row["question"]},
                ],
                "chosen": {"role": "assistant", "content": row["chosen"]},
                "rejected": {"role": "assistant", "content": row["rejected"]},
            }
            f.write(json.dumps(message_row) + "\n")
    with open(out / "unpaired.jsonl", "w", encoding="utf-8") as f:  # TRL conversational unpaired preference
        for i, row in enumerate(rows):
            good = i % 2 == 0
            f.write(json.dumps({"prompt": [{"role": "user", "content": row["question"]}],
                                "completion": [{"role": "assistant", "content": row["chosen" if good else "rejected"]}],
                                "label": good}) + "\n")
    with open(out / "sft_alpaca.jsonl", "w", encoding="utf-8") as f:  # positives only
        for row in rows:
            f.write(json.dumps({"instruction": row["question"], "input": "", "output": row["chosen"]}) + "\n")
    with open(out / "agent_pairs.jsonl", "w", encoding="utf-8") as f:  # tool calls, tool results, reasoning
        for row in agent_pairs(n_rows, seed):
            f.write(json.dumps(row) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--displacement", action="store_true",
                        help="build the likelihood-displacement toy instead (compare/toy.py): near-identical "
                             "math solutions, an SFT-warmed model and a compare.yml for axolotl_bnf_plugin.compare")
    parser.add_argument("--sort-task", action="store_true",
                        help="build the verifiable sorting task instead (compare/sort_task.py): a model warmed up "
                             "below mastery, verifier-labelled pairs of its own answers, held-out prompts, a "
                             "retention set, and compare_sort.yml with the task's verifier")
    parser.add_argument("--warmup-steps", type=int, default=None,
                        help="SFT steps before saving (--displacement: 150, --sort-task: 320)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="max_steps of the comparison config (--displacement: 60, --sort-task: 64)")
    args = parser.parse_args(argv)
    if args.sort_task:
        from .compare.sort_task import build_sort_task

        print(build_sort_task(args.out_dir, seed=args.seed, warmup_steps=args.warmup_steps or 320,
                              max_steps=args.max_steps or 64))
        return
    if args.displacement:
        from .compare.toy import build_displacement_assets

        print(build_displacement_assets(args.out_dir, n_rows=args.rows if args.rows != 64 else 128, seed=args.seed,
                                        warmup_steps=args.warmup_steps or 150, max_steps=args.max_steps or 60))
        return
    print(build_assets(args.out_dir, n_rows=args.rows, seed=args.seed))


if __name__ == "__main__":
    main()
