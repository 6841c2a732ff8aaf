"""Run by `test_initial_policy.py` under `torchrun --nproc_per_node 2` (gloo, CPU): the initial policy's
log-probs of a data set, scored with the pass split across the two processes. Writes every rank's result
and how many forwards it ran to argv[1] as [{"rank": r, "logps": ..., "forwards": n}, ...]."""
from __future__ import annotations

import json
import os
import sys

import torch.distributed as dist
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from axolotl_bnf_plugin.data.collator import ResponseBatchCollator
from axolotl_bnf_plugin.reference import initial_policy_logps


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    assets = os.environ["BNF_TINY_ASSETS"]
    tokenizer = AutoTokenizer.from_pretrained(assets + "/model")
    model = AutoModelForCausalLM.from_pretrained(assets + "/model").float()
    dataset = Dataset.from_json(os.environ["BNF_EXAMPLES"])
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    logps = initial_policy_logps(model, dataset, ResponseBatchCollator(tokenizer), batch_size=3, device="cpu")
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {"rank": rank, "logps": logps, "forwards": len(forwards)})
    if rank == 0:
        with open(out, "w", encoding="utf-8") as f:
            json.dump(gathered, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
