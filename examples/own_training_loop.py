"""BNF or ASFT in a plain PyTorch training loop: a transformers model, the plugin's collator and `batch_loss`.

No Axolotl is involved: the plugin's core (the fused op `kernels`, `methods`, `step_loss.batch_loss`,
`initial_policy`, `reference` and `data.collator`) needs only torch, transformers and pydantic.

    python examples/own_training_loop.py --method bnf --steps 20
    python examples/own_training_loop.py --method asft --steps 20
    python examples/own_training_loop.py --method bnf --reference precomputed --device cuda

The script builds a tiny Llama-architecture model and a BPE tokenizer locally (`axolotl_bnf_plugin.tiny`; no
model hub), turns a handful of preference pairs (the chosen answers use one word family, the rejected ones
another) into token ids, batches them with the plugin's collator and trains with AdamW on `batch_loss`, all
pairs in every step. Each step prints the loss and the chosen-over-rejected margin at the weights it starts
from: the mean per-token log-prob of the chosen answers minus that of the rejected ones, measured with the fused
op directly (`mean_response_logps`); the last line, the margin after the last update.

BNF needs the initial policy's log-prob of every scored token. `--reference copy` keeps a frozen copy of the
model (`initial_policy.live_reference`) that `batch_loss` scores each batch with; `--reference precomputed`
scores the examples once before training (`reference.initial_policy_logps`) and stores the log-probs in each
example's `ref_logps`, so training holds no second model. Both give the same loss. ASFT needs neither.

The level below `batch_loss` is `kernels.token_logprobs(hidden [N, H], weight [V, H], labels [N])`: each row's
label log-prob (differentiable) and negative entropy, computed block by block from the final hidden states and
the output embedding, never as `[N, V]` logits; `mean_response_logps` below calls it. For a loss whose gradient
w.r.t. each token's log-prob is known before the backward, the op also builds that gradient in its forward (one
pass over the logits instead of two): BNF's is

    token_logprobs(hidden, weight, labels, grad_rule=BNF_GRAD_RULE, grad_inputs=(ref_logp, token_scale))

with `BNF_GRAD_RULE` and the per-response `token_scale` (`bnf_response_scale`) from `methods.bnf`.
`kernels.token_logprobs` says what the loss must then do with it; `batch_loss` does that for BNF.
"""
from __future__ import annotations

import argparse

import torch

from axolotl_bnf_plugin.data.collator import IGNORE_INDEX, REF_LOGPS, ResponseBatchCollator
from axolotl_bnf_plugin.initial_policy import live_reference
from axolotl_bnf_plugin.kernels import token_logprobs
from axolotl_bnf_plugin.reference import initial_policy_logps
from axolotl_bnf_plugin.step_loss import LossSettings, batch_loss
from axolotl_bnf_plugin.tiny import build_model, build_tokenizer, toy_pairs


def preference_example(tokenizer, prompt: str, chosen: str, rejected: str) -> dict:
    """One example as the collator takes it: per response, the prompt's and the answer's token ids (the answer
    closed by EOS), where the answer starts (only answer tokens are scored) and its sign (+1 chosen, -1
    rejected); `is_pair` ties the two responses into one pair."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answers = [tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
               for text in (chosen, rejected)]
    return {
        "response_input_ids": [prompt_ids + answer for answer in answers],
        "response_prompt_len": [len(prompt_ids)] * 2,
        "response_sign": [1, -1],
        "is_pair": True,
    }


@torch.no_grad()
def mean_response_logps(model, batch: dict) -> torch.Tensor:
    """Each response's mean per-token log-prob, from the fused op called directly.

    The decoder's final hidden state at position t predicts the token at t + 1; the collator's labels are
    IGNORE_INDEX on prompt and padding tokens, which the op drops before any matmul. Rows of an unpacked batch
    are responses.
    """
    hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    labels = batch["labels"][:, 1:]
    logp = token_logprobs(hidden[:, :-1].flatten(0, 1), model.get_output_embeddings().weight, labels.flatten())[0]
    scored = labels != IGNORE_INDEX
    return (logp.view_as(labels) * scored).sum(1) / scored.sum(1)


def margin(model, batch: dict) -> float:
    """Mean log-prob per token of the chosen answers minus that of the rejected ones."""
    logps = mean_response_logps(model, batch)
    return (logps[batch["sign"] > 0].mean() - logps[batch["sign"] < 0].mean()).item()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=("bnf", "asft"), default="bnf")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--pairs", type=int, default=8, help="preference pairs, all in one batch")
    parser.add_argument("--reference", choices=("copy", "precomputed"), default="copy",
                        help="BNF: a frozen copy of the initial model, or its log-probs scored once before training")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    rows = toy_pairs(args.pairs, seed=args.seed)
    tokenizer = build_tokenizer(rows)
    model = build_model(len(tokenizer), seed=args.seed).to(args.device)
    collator = ResponseBatchCollator(tokenizer, vocab_size=len(tokenizer))
    examples = []
    for row in rows:
        prompt = tokenizer.apply_chat_template(  # the conversation up to the assistant's answer, as text
            [{"role": "system", "content": row["system"]}, {"role": "user", "content": row["question"]}],
            tokenize=False, add_generation_prompt=True)
        examples.append(preference_example(tokenizer, prompt, row["chosen"], row["rejected"]))

    settings = LossSettings(args.method)  # the method's defaults; LossSettings(BNF(length_norm=...)) sets them
    reference = None
    if settings.method.needs_ref_logps and args.reference == "copy":
        reference = live_reference(model)  # taken before the first update: the initial policy
    elif settings.method.needs_ref_logps:
        ref_logps = initial_policy_logps(model, examples, collator, batch_size=len(examples), device=args.device)
        examples = [dict(example, **{REF_LOGPS: ref}) for example, ref in zip(examples, ref_logps)]
    batch = {key: value.to(args.device) if torch.is_tensor(value) else value
             for key, value in collator(examples).items()}

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    model.train()
    for step in range(1, args.steps + 1):
        before = margin(model, batch)
        loss, _ = batch_loss(model, batch, settings, reference=reference)  # and the metrics the plugin logs
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        print(f"step {step:3d}  loss {loss.item():.4f}  margin {before:+.4f}", flush=True)
    print(f"after {args.steps} steps: margin {margin(model, batch):+.4f}")


if __name__ == "__main__":
    main()
