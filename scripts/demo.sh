#!/usr/bin/env bash
# Set up (or reuse) the environment, build a tiny model + toy preference data locally, and train it
# with rl: bnf (full fine-tuning) and rl: asft (LoRA) through `axolotl train`, and BNF on tool-calling
# preference data (examples/tiny-agent-bnf.yml). Results: demo_runs/.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bootstrap.sh
start=$SECONDS
python -m axolotl_bnf_plugin.tiny demo_runs/assets --rows 64 >/dev/null
for config in examples/tiny-bnf.yml examples/tiny-asft-lora.yml examples/tiny-agent-bnf.yml; do
  name="$(basename "$config" .yml)"
  echo "[demo] axolotl train $config  (log: demo_runs/$name.log)"
  axolotl train "$config" > "demo_runs/$name.log" 2>&1 || { tail -n 40 "demo_runs/$name.log"; exit 1; }
done
python -m axolotl_bnf_plugin.summary demo_runs/tiny-bnf demo_runs/tiny-asft-lora demo_runs/tiny-agent-bnf
echo "[demo] done in $((SECONDS - start)) s; models, logs and bnf_log_history.jsonl files are under $(pwd)/demo_runs/"
