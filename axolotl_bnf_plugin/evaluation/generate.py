"""Completions of prompts given as token ids: batched, left-padded, cut after the end-of-turn token.

The prompts are the token ids training scored its responses after (the rendered chat prompt with its
generation prompt), so the model continues exactly where a trained response starts. Generation stops at
the token that ends the training responses (the template's end of turn, found from the data:
`end_of_turn_ids`), or at the model's own end-of-sequence tokens.
"""
from __future__ import annotations

import torch

from ..initial_policy import eval_mode
from ..model_io import resharded_after_each_forward


def end_of_turn_ids(model, tokenizer, examples: list[dict]) -> list[int]:
    """Token ids that end a completion: the last special token of each example's first response (what the
    chat template closes an assistant turn with), the tokenizer's EOS and the model's `generation_config` EOS."""
    special = set(tokenizer.all_special_ids)
    ids = set()
    for example in examples:
        response = example["response_input_ids"][0][example["response_prompt_len"][0]:]
        last_special = next((t for t in reversed(response) if t in special), None)
        if last_special is not None:
            ids.add(int(last_special))
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for token in ([configured] if isinstance(configured, int) else list(configured or [])) + [tokenizer.eos_token_id]:
        if token is not None:
            ids.add(int(token))
    return sorted(ids)


def cut_at_stop(tokens: list[int], stop_ids: list[int]) -> list[int]:
    """`tokens` up to and including the first stop token (all of them when there is none)."""
    for i, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[:i + 1]
    return tokens


@torch.no_grad()
def generate_batch(model, prompts: list[list[int]], *, pad_id: int, stop_ids: list[int], max_new_tokens: int,
                   device, samples: int = 0, temperature: float = 1.0, synced: bool = False) -> list[list[list[int]]]:
    """Per prompt: its completions' token ids, greedy (`samples=0`: one) or `samples` drawn at `temperature`.

    `synced`: every process keeps stepping until all have finished (a sharded model's forwards are
    collective), as `generate(synced_gpus=True)` does. `device`: the process's own (the Trainer's
    `args.device`), where a sharded model's collectives run, also when its parameters are offloaded.
    Sampling and the length are set here; the model's `generation_config` supplies the rest (a repetition
    penalty, say), as when it is deployed.
    """
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):  # left padding: every prompt ends where generation starts
        input_ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, width - len(prompt):] = 1
    options = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0, num_return_sequences=samples) \
        if samples else dict(do_sample=False, num_beams=1)
    with eval_mode(model), resharded_after_each_forward(model):
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                             eos_token_id=stop_ids, pad_token_id=pad_id, synced_gpus=synced, use_cache=True,
                             **options)
    completions = [cut_at_stop(row.tolist(), stop_ids) for row in out[:, width:]]
    per_prompt = max(samples, 1)
    return [completions[i * per_prompt:(i + 1) * per_prompt] for i in range(len(prompts))]
