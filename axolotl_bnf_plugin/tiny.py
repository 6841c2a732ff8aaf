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
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build_assets(args.out_dir, n_rows=args.rows, seed=args.seed))


if __name__ == "__main__":
    main()
