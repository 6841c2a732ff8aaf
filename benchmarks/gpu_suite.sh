#!/usr/bin/env bash
# One run on a CUDA machine: the bf16 correctness tests of the fused log-prob kernels, the kernel benchmark
# tables (and the roofline comparison, when benchmarks/roofline.py is there), one optimiser step of every method
# on a model of real layer shapes (benchmarks/train_step_bench.py), then `axolotl train` as a user runs it, for
# rl: bnf (full fine-tuning) and rl: asft (LoRA) on a tiny local model.
#
#     OUT=/some/empty/dir bash benchmarks/gpu_suite.sh                    # from the repository root
#     OUT=/tmp/gpu_suite_out GPU_SUITE_SMOKE=1 bash benchmarks/gpu_suite.sh   # the same steps, tiny shapes, CPU too
#
# Needs what a stock CUDA image has: python3, torch, triton, transformers, peft, accelerate, pytest, pyyaml, numpy
# (no network, no axolotl: the repository is imported from the working tree through PYTHONPATH, not installed).
# What it lacks comes as wheels in .whl/ (ignored by git), from three lists:
#   - benchmarks/suite_wheels.txt, for every step: pydantic, pydantic_core, annotated_types, typing_inspection
#     (the methods declare their config keys as pydantic models, so `axolotl_bnf_plugin.methods` (the BNF kernel
#     rows, the training step) imports pydantic, which the GPU machines do not have; pydantic_core is the one
#     compiled wheel: CPython 3.12, x86_64, at exactly the version its pydantic requires), and liger-kernel (pure
#     Python, `py3-none-any`; its only requirements are torch and triton) for the `liger flce` rows, which are
#     reported as skipped without it;
#   - benchmarks/axolotl_wheels.txt and benchmarks/axolotl_wheels_built.txt, for the `axolotl train` step only:
#     Axolotl 0.19.0, TRL, datasets and the rest of what Axolotl needs that the machines lack (16 pure-Python
#     wheels, about 3.9 MB; two of them, axolotl-contribs-lgpl and axolotl-contribs-mit, are published as
#     source only and are built into wheels by the second command below).
# Each is installed with --no-deps, unless this machine has that distribution at the same or a newer version:
# those of suite_wheels.txt (and any wheel no list names) into $SUITE_SITE (default /tmp/site), put first on
# PYTHONPATH for every step; those of the two Axolotl lists into $SUITE_SITE-axolotl, put on PYTHONPATH for the
# `axolotl train` step only. .whl/ is filled, on any machine with network access and Python 3.12, by:
#
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#         -d .whl -r benchmarks/suite_wheels.txt -r benchmarks/axolotl_wheels.txt
#     python3 -m pip wheel --no-deps -w .whl -r benchmarks/axolotl_wheels_built.txt
#
# The `axolotl train` step runs in a scratch folder (a new one under $TMPDIR or /tmp, removed at its end):
# `python3 -m axolotl_bnf_plugin.tiny` builds a 2-layer Llama-architecture model, its tokenizer and a separable
# preference set (64 pairs); then, for examples/tiny-bnf.yml (rl: bnf, full fine-tuning) and
# examples/tiny-asft-lora.yml (rl: asft, LoRA), a copy with the paths moved into the scratch folder, 12 steps
# (max_steps) and, on CUDA, bf16 goes through `python3 -m axolotl.cli.main preprocess` and then
# `python3 -m axolotl.cli.main train` (which relaunches itself through `accelerate launch`, as `axolotl train`
# does), with AXOLOTL_DO_NOT_TRACK=1, HF_HUB_OFFLINE=1, HF_DATASETS_OFFLINE=1, WANDB_MODE=disabled and HF_HOME in
# the scratch folder. Axolotl imports bitsandbytes and wandb at module level, which neither config uses and
# which are too large to carry: where the machine has neither, the placeholders of benchmarks/axolotl_placeholders/
# go last on that step's PYTHONPATH (never on any other step's; they are unsafe for quantisation, 8-bit
# optimisers and W&B logging). summary.txt gets each command's exit status and time and, from the run's
# bnf_log_history.jsonl (written by the plugin), the steps trained and the first and last logged loss and
# chosen-over-rejected margin (rewards/margins), train and eval; their output is appended to train_step.log.
#
# Files written to $OUT (8):
#   summary.txt         the machine (nvidia-smi; python, torch, triton, transformers, peft, pydantic, liger-kernel
#                       versions), then each step's exit status and time
#   gpu_tests.log       pytest tests/test_gpu_kernels.py tests/test_triton_kernel.py tests/test_device_map.py
#                       tests/test_fsdp2_mixed_precision.py
#   kernel_bench.jsonl  one JSON object per (shape, method), appended as each is measured
#   kernel_bench_frozen.jsonl   the same for a frozen weight (LoRA: d hidden only), one shape
#   kernel_bench.log    both kernel benchmarks' output (progress, tables, tracebacks of failed rows), and the
#                       roofline's messages
#   train_step.jsonl    one JSON object per (model, full / LoRA, unpacked / packed, method), appended as measured
#   train_step.log      the training-step benchmark's output, then the `axolotl train` step's
#   tables.md           the README-ready markdown: the kernel tables (trainable, then frozen weight), the roofline
#                       model beside the measured times, the training-step tables
#
# Time: everything is kept within SUITE_BUDGET_S seconds (default 530). The steps after the kernel benchmark
# have fixed reserves: the frozen-weight rows 40 s, roofline and tables 40 s, the training step 150 s (15 of them
# for its table; it starts no new case in its last 40 s, so it ends by itself) and `axolotl train` 75 s. The
# tests get at most SUITE_TEST_TIMEOUT_S (default 180); the kernel benchmark what is left less all the reserves
# (after 10-15 s of set-up, still about 30 s when the tests take their full time, 2-3 minutes when they take
# one); the frozen-weight rows what is left less the reserves after them; the training step what is left less
# its table's and `axolotl train`'s; `axolotl train` everything that remains but 5 s (at least its 75 s; with
# fewer it is not run and says so). Within it, the tiny assets get at most 20 s, then each method an equal share
# of what remains (one hard limit for its preprocess and train). Smoke mode: a budget of 1800 s, 900 s for the
# tests, 600 s kept for `axolotl train` and 180 s for its assets. A benchmark stopped by its time limit keeps
# the rows it finished. Every step runs whatever the previous ones gave; the exit status is 0 only when the
# tests, the kernel benchmark (trainable weight), the training step and `axolotl train` (both methods) passed.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
: "${OUT:?set OUT to the folder the results go to}"
mkdir -p "$OUT" || exit 2

PY=${PYTHON:-python3}
SMOKE=${GPU_SUITE_SMOKE:-0}
BUDGET=${SUITE_BUDGET_S:-530}
SITE=${SUITE_SITE:-/tmp/site}
[[ "$SITE" = /* ]] || SITE="$PWD/$SITE"  # also on the path of commands run in another folder
AXSITE=${SITE%/}-axolotl  # the Axolotl wheels: on PYTHONPATH for the `axolotl train` step only
RESERVE=40  # seconds kept for the roofline and the kernel tables after the kernel benchmarks
FROZEN_RESERVE=40  # seconds kept for the frozen-weight rows after the main table
TRAIN_RESERVE=150  # seconds kept for the training step after the kernel benchmarks and their tables
TRAIN_TABLE_RESERVE=15  # seconds kept for the training-step table
AX_RESERVE=75  # seconds kept for `axolotl train` (both methods) after the training step; its least
AX_ASSETS_LIMIT=20  # its tiny model and data
AX_STEPS=12  # max_steps of each `axolotl train` run
SECONDS=0

say() { echo "[gpu_suite ${SECONDS}s] $*"; }
record() { echo "$*" >>"$OUT/summary.txt"; say "$*"; }
: >"$OUT/summary.txt"
: >"$OUT/kernel_bench.log"

if [ "$SMOKE" = 1 ]; then
  TEST_TIMEOUT=${SUITE_TEST_TIMEOUT_S:-900}
  SHAPES=(96x16x211 128x32x1000)
  FROZEN_SHAPES=(128x32x1000)
  ITERS=1
  BUDGET=${SUITE_BUDGET_S:-1800}
  AX_RESERVE=600  # a slow CPU: each Axolotl command imports torch, transformers and Axolotl (train twice)
  AX_ASSETS_LIMIT=180
  ROOF_LIMIT=180  # a slow CPU spends most of it importing torch
  TRAIN_ARGS=(--smoke)
else
  TEST_TIMEOUT=${SUITE_TEST_TIMEOUT_S:-180}
  SHAPES=()
  for v in 128256 151936; do for n in 4096 16384 32768; do SHAPES+=("${n}x4096x${v}"); done; done
  FROZEN_SHAPES=(16384x4096x128256)
  ITERS=5
  ROOF_LIMIT=30
  TRAIN_ARGS=(--models llama3-8b qwen2.5-7b --layers 2 --pairs 4 --prompt-len 512 --response-len 512 --warmup 2
              --steps 3)
fi
record "mode: $([ "$SMOKE" = 1 ] && echo smoke || echo gpu); budget ${BUDGET}s; shapes ${SHAPES[*]}; iters $ITERS"

# 1. The carried wheels (those this machine lacks, or has older); the repository from the working tree.
# SUITE_WHEELS names another folder of them (CI: the cached download and build of the three lists).
WHEEL_DIR=${SUITE_WHEELS:-.whl}
AX_LISTS=(benchmarks/axolotl_wheels.txt benchmarks/axolotl_wheels_built.txt)
if compgen -G "$WHEEL_DIR/*.whl" >/dev/null; then
  mapfile -t WHEELS < <("$PY" - "${AX_LISTS[@]}" -- "$WHEEL_DIR"/*.whl <<'PYEOF'
import importlib.metadata as md
import os
import re
import sys


def key(version):
    return tuple(int(x) for x in re.findall(r"\d+", version)[:4])


def canon(name):
    return re.sub(r"[-_.]+", "-", name).lower()


split = sys.argv.index("--")
axolotl = set()  # the names the Axolotl lists give: those wheels go to the `axolotl train` step's folder
for path in sys.argv[1:split]:
    for line in open(path, encoding="utf-8"):
        line = line.split("#")[0].strip()
        if line:
            axolotl.add(canon(line.split("==")[0]))
for path in sys.argv[split + 1:]:
    name, version = os.path.basename(path).split("-")[:2]
    try:
        installed = md.version(name)
    except md.PackageNotFoundError:
        installed = None
    if installed is not None and key(installed) >= key(version):
        print(f"kept {name} {installed}")
    else:
        print(f"{'axolotl' if canon(name) in axolotl else 'site'} {path}")
PYEOF
  )
  INSTALL=() AX_INSTALL=() KEPT=()
  for line in "${WHEELS[@]}"; do
    case "$line" in
      "kept "*) KEPT+=("${line#kept }") ;;
      "axolotl "*) AX_INSTALL+=("${line#axolotl }") ;;
      *) INSTALL+=("${line#site }") ;;
    esac
  done
  KEPT_NOTE=""
  [ "${#KEPT[@]}" -gt 0 ] && KEPT_NOTE="; kept this machine's $(IFS=,; echo "${KEPT[*]}")"
  if [ "${#INSTALL[@]}" -gt 0 ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${INSTALL[@]}"
    record "install $WHEEL_DIR -> $SITE: exit $? (${INSTALL[*]##*/})$KEPT_NOTE"
  else
    record "install $WHEEL_DIR: nothing to install$KEPT_NOTE"
  fi
  if [ "${#AX_INSTALL[@]}" -gt 0 ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$AXSITE" \
      "${AX_INSTALL[@]}"
    record "install $WHEEL_DIR -> $AXSITE (axolotl train step only): exit $? (${AX_INSTALL[*]##*/})"
  else
    record "install $WHEEL_DIR: no Axolotl wheels to install (axolotl train uses what is importable)"
  fi
else
  record "install: no $WHEEL_DIR/*.whl here; using what is importable (without liger-kernel its rows are skipped," \
    "without pydantic the BNF rows fail, without axolotl the axolotl train step fails)"
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"

# 2. What this machine is.
say "environment"
echo "===== environment" >>"$OUT/summary.txt"
{
  echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.memory,power.limit --format=csv
    nvidia-smi
  else
    echo "nvidia-smi: not found"
  fi
  "$PY" - <<'PYEOF'
import importlib.metadata as md
import sys

print("python", sys.version.split()[0], sys.executable)
for dist in ("torch", "triton", "liger-kernel", "transformers", "peft", "accelerate", "numpy", "pytest", "pydantic",
             "pydantic_core"):
    try:
        print(dist, md.version(dist))
    except md.PackageNotFoundError:
        print(dist, "not installed")
import torch

print("torch.version.cuda", torch.version.cuda, "| cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    print("device", props.name, "| capability", f"{props.major}.{props.minor}", "| SMs", props.multi_processor_count,
          "| memory GiB", round(props.total_memory / 2**30, 1))
import axolotl_bnf_plugin.kernels as kernels

print("axolotl_bnf_plugin.kernels from", kernels.__file__)
for module in ("axolotl_bnf_plugin.methods", "axolotl_bnf_plugin.step_loss"):
    try:
        __import__(module)
        print("import", module, "ok")
    except Exception as exc:  # noqa: BLE001 - reported; the steps that need it report their own failure
        print("import", module, "FAILED:", type(exc).__name__, exc)
PYEOF
} 2>&1 | tee -a "$OUT/summary.txt"
echo "=====" >>"$OUT/summary.txt"
CUDA_OK=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
record "cuda available: $CUDA_OK"

# 3. Correctness first (bf16 on the GPU; without CUDA those tests skip and the Triton ones use the interpreter).
# One pytest per file, so a file cut short by the time limit leaves the other's full report. test_gpu_kernels.py
# holds the confident-token regimes compiled; without a GPU, test_confident_tokens.py runs them in the
# interpreter instead.
: >"$OUT/gpu_tests.log"
TESTS_RC=0
TESTS_END=$((SECONDS + TEST_TIMEOUT))
TEST_FILES=(tests/test_gpu_kernels.py tests/test_triton_kernel.py tests/test_device_map.py
            tests/test_fsdp2_mixed_precision.py)
[ "$CUDA_OK" = 1 ] || TEST_FILES+=(tests/test_confident_tokens.py)
for test_file in "${TEST_FILES[@]}"; do
  limit=$((TESTS_END - SECONDS))
  [ "$limit" -lt 30 ] && limit=30
  say "pytest $test_file (time limit ${limit}s)"
  echo "===== $test_file" >>"$OUT/gpu_tests.log"
  first_line=$(($(wc -l <"$OUT/gpu_tests.log") + 1))
  timeout -k 10 "$limit" "$PY" -m pytest "$test_file" -v -p no:cacheprovider -rfEs --tb=short --durations=10 \
    --maxfail=20 2>&1 | tee -a "$OUT/gpu_tests.log"
  rc=${PIPESTATUS[0]}
  summary=$(tail -n +"$first_line" "$OUT/gpu_tests.log" | grep -E '^=+ .*(passed|failed|skipped|error).* =+$' | tail -1)
  record "tests $test_file: exit $rc$([ "$rc" = 124 ] && echo ' (time limit)') -- ${summary:-no summary}"
  [ "$rc" != 0 ] && TESTS_RC=$rc
done

# 4. The kernel table: each row is appended to kernel_bench.jsonl as soon as it is measured.
BENCH_LIMIT=$((BUDGET - SECONDS - RESERVE - FROZEN_RESERVE - TRAIN_RESERVE - AX_RESERVE))
if [ "$SMOKE" != 1 ] && [ "$CUDA_OK" != 1 ]; then
  BENCH_RC=3
  record "benchmark: not run (no CUDA device visible to torch)"
elif [ "$BENCH_LIMIT" -lt 30 ]; then
  BENCH_RC=3
  record "benchmark: not run (only ${BENCH_LIMIT}s of the budget left)"
else
  say "benchmark (time limit ${BENCH_LIMIT}s)"
  timeout -k 15 "$BENCH_LIMIT" "$PY" benchmarks/kernel_bench.py --shapes "${SHAPES[@]}" --iters "$ITERS" --warmup 1 \
    --jsonl "$OUT/kernel_bench.jsonl" 2>&1 | tee -a "$OUT/kernel_bench.log"
  BENCH_RC=${PIPESTATUS[0]}
  ROWS=$(grep -c . "$OUT/kernel_bench.jsonl" 2>/dev/null) || ROWS=${ROWS:-0}
  record "benchmark: exit $BENCH_RC$([ "$BENCH_RC" = 124 ] && echo ' (time limit)'); $ROWS rows in kernel_bench.jsonl"
fi

# 4b. A frozen weight (LoRA): our op builds d hidden in the forward; against naive and Liger, one shape.
FROZEN_LIMIT=$((BUDGET - SECONDS - RESERVE - TRAIN_RESERVE - AX_RESERVE))
if [ "$BENCH_RC" = 3 ]; then
  record "frozen-weight benchmark: not run (see above)"
elif [ "$FROZEN_LIMIT" -lt 20 ]; then
  record "frozen-weight benchmark: not run (only ${FROZEN_LIMIT}s of the budget left)"
else
  say "frozen-weight benchmark (time limit ${FROZEN_LIMIT}s)"
  echo "===== frozen weight" >>"$OUT/kernel_bench.log"
  timeout -k 10 "$FROZEN_LIMIT" "$PY" benchmarks/kernel_bench.py --frozen-weight --shapes "${FROZEN_SHAPES[@]}" \
    --iters "$ITERS" --warmup 1 --methods "two-pass op (ours)" "bnf single pass (ours)" naive "liger flce" \
    --jsonl "$OUT/kernel_bench_frozen.jsonl" 2>&1 | tee -a "$OUT/kernel_bench.log"
  rc=${PIPESTATUS[0]}
  FROZEN_ROWS=$(grep -c . "$OUT/kernel_bench_frozen.jsonl" 2>/dev/null) || FROZEN_ROWS=${FROZEN_ROWS:-0}
  record "frozen-weight benchmark: exit $rc$([ "$rc" = 124 ] && echo ' (time limit)'); $FROZEN_ROWS rows"
fi

# 5. The README-ready kernel tables, from the rows that were measured.
printf '# Kernel benchmark\n\n' >"$OUT/tables.md"
if [ -s "$OUT/kernel_bench.jsonl" ]; then
  "$PY" benchmarks/kernel_bench.py --table-from "$OUT/kernel_bench.jsonl" >>"$OUT/tables.md"
  record "kernel table: exit $? -> tables.md"
  if [ -s "$OUT/kernel_bench_frozen.jsonl" ]; then
    echo >>"$OUT/tables.md"
    "$PY" benchmarks/kernel_bench.py --table-from "$OUT/kernel_bench_frozen.jsonl" >>"$OUT/tables.md"
  fi
else
  echo "No kernel benchmark rows were measured (see kernel_bench.log)." >>"$OUT/tables.md"
  record "kernel table: no rows"
fi

# 6. The roofline model beside the measured times (someone else's script: optional, failures tolerated).
if [ -f benchmarks/roofline.py ] && [ -s "$OUT/kernel_bench.jsonl" ]; then
  say "roofline"
  ROOF_ARGS=(--gpu H200 --measured "$OUT/kernel_bench.jsonl")
  ROOF_HELP=$(timeout "$ROOF_LIMIT" "$PY" benchmarks/roofline.py --help 2>/dev/null)
  if grep -q -- "--liger-accum" <<<"$ROOF_HELP"; then ROOF_ARGS+=(--liger-accum fp32); fi  # as kernel_bench calls Liger
  if [ "$SMOKE" = 1 ] && grep -q -- "--shapes" <<<"$ROOF_HELP"; then ROOF_ARGS+=(--shapes "${SHAPES[@]}"); fi
  echo >>"$OUT/tables.md"
  echo "===== roofline" >>"$OUT/kernel_bench.log"
  timeout -k 5 "$ROOF_LIMIT" "$PY" benchmarks/roofline.py "${ROOF_ARGS[@]}" \
    >>"$OUT/tables.md" 2>>"$OUT/kernel_bench.log"
  record "roofline: exit $? (${ROOF_ARGS[*]}) -> tables.md"
else
  record "roofline: skipped ($([ -f benchmarks/roofline.py ] && echo 'no measured rows' || echo 'benchmarks/roofline.py absent'))"
fi
cat "$OUT/tables.md"

# 7. One optimiser step of every method on a model of real layer shapes (a few layers): s/step, peak memory.
TRAIN_LIMIT=$((BUDGET - SECONDS - TRAIN_TABLE_RESERVE - AX_RESERVE))
if [ "$SMOKE" != 1 ] && [ "$CUDA_OK" != 1 ]; then
  TRAIN_RC=3
  record "train step: not run (no CUDA device visible to torch)"
elif [ "$TRAIN_LIMIT" -lt 60 ]; then
  TRAIN_RC=3
  record "train step: not run (only ${TRAIN_LIMIT}s of the budget left)"
else
  say "train step (time limit ${TRAIN_LIMIT}s): ${TRAIN_ARGS[*]}"
  timeout -k 15 "$TRAIN_LIMIT" "$PY" benchmarks/train_step_bench.py "${TRAIN_ARGS[@]}" \
    --time-budget $((TRAIN_LIMIT - 40)) --jsonl "$OUT/train_step.jsonl" 2>&1 | tee "$OUT/train_step.log"
  TRAIN_RC=${PIPESTATUS[0]}
  TRAIN_ROWS=$(grep -c '"s_per_step"' "$OUT/train_step.jsonl" 2>/dev/null) || TRAIN_ROWS=${TRAIN_ROWS:-0}
  ALL_ROWS=$(grep -c . "$OUT/train_step.jsonl" 2>/dev/null) || ALL_ROWS=${ALL_ROWS:-0}
  record "train step: exit $TRAIN_RC$([ "$TRAIN_RC" = 124 ] && echo ' (time limit)');" \
    "$TRAIN_ROWS of $ALL_ROWS rows measured in train_step.jsonl"
fi

# 8. Its README-ready table.
if [ -s "$OUT/train_step.jsonl" ]; then
  {
    printf '\n# Training step\n\n'
    "$PY" benchmarks/train_step_bench.py --table-from "$OUT/train_step.jsonl"
  } >>"$OUT/tables.md"
  record "train step table: exit $? -> tables.md"
  sed -n '/^# Training step$/,$p' "$OUT/tables.md"
else
  printf '\nNo training-step rows were measured (see train_step.log).\n' >>"$OUT/tables.md"
  record "train step table: no rows"
fi

# 9. `axolotl train` as a user runs it, both methods, on a tiny local model: the carried Axolotl wheels (and the
# placeholders for what the machine lacks of bitsandbytes and wandb) on this step's PYTHONPATH only.
AX_LIMIT=$((BUDGET - SECONDS - 5))
AX_RC=0
if [ "$SMOKE" != 1 ] && [ "$CUDA_OK" != 1 ]; then
  AX_RC=3
  record "axolotl train: not run (no CUDA device visible to torch)"
elif [ "$AX_LIMIT" -lt "$AX_RESERVE" ]; then
  AX_RC=3
  record "axolotl train: not run (budget: ${AX_LIMIT}s left, it needs ${AX_RESERVE}s)"
else
  AX_END=$((SECONDS + AX_LIMIT))
  AXWORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_suite_axolotl.XXXXXX")
  AX_PATH="$AXSITE:$PYTHONPATH"
  PLACEHOLDERS=()
  for name in bitsandbytes wandb; do
    if ! PYTHONPATH="$AX_PATH" "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('$name') is None)"; then
      mkdir -p "$AXWORK/placeholders"
      cp -r "benchmarks/axolotl_placeholders/$name" "$AXWORK/placeholders/"
      PLACEHOLDERS+=("$name")
    fi
  done
  [ "${#PLACEHOLDERS[@]}" -gt 0 ] && AX_PATH="$AX_PATH:$AXWORK/placeholders"
  # `train` relaunches through the `accelerate` command: the one beside this interpreter.
  AX_BIN=$(dirname "$("$PY" -c 'import sys; print(sys.executable)')")
  if [ ! -x "$AX_BIN/accelerate" ]; then
    AX_BIN="$AXWORK/bin"
    mkdir -p "$AX_BIN"
    printf '#!/bin/sh\nexec %q -m accelerate.commands.accelerate_cli "$@"\n' "$PY" >"$AX_BIN/accelerate"
    chmod +x "$AX_BIN/accelerate"
  fi
  AX_STACK=$(PYTHONPATH="$AX_PATH" "$PY" -c '
import importlib.metadata as md
out = []
for dist in ("axolotl", "trl", "datasets", "transformers", "peft", "accelerate"):
    try:
        out.append(f"{dist} {md.version(dist)}")
    except md.PackageNotFoundError:
        out.append(f"{dist} not installed")
print(", ".join(out))')
  AX_PRECISION=$([ "$CUDA_OK" = 1 ] && echo bf16 || echo fp32)
  AX_PLACED=$(IFS=,; echo "${PLACEHOLDERS[*]:-none}")
  record "axolotl train (time limit ${AX_LIMIT}s): $AX_STACK; placeholders: $AX_PLACED; $AX_PRECISION," \
    "$AX_STEPS steps each; scratch $AXWORK"

  # ax_cmd NAME LIMIT COMMAND...: one command in the scratch folder, its output appended to train_step.log.
  ax_cmd() {
    local name=$1 limit=$2 started=$SECONDS rc
    shift 2
    [ "$limit" -lt 5 ] && limit=5
    say "axolotl $name (time limit ${limit}s)"
    echo "===== axolotl $name (time limit ${limit}s): $*" >>"$OUT/train_step.log"
    (
      cd "$AXWORK" || exit 2
      export PYTHONPATH="$AX_PATH" PATH="$AX_BIN:$PATH" HF_HOME="$AXWORK/hf_home" AXOLOTL_DO_NOT_TRACK=1 \
        HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
      exec timeout -k 10 "$limit" "$@"
    ) >>"$OUT/train_step.log" 2>&1
    rc=$?
    AX_LAST="exit $rc$([ "$rc" = 124 ] && echo ' (time limit)') ($((SECONDS - started))s)"
    if [ "$rc" != 0 ]; then
      AX_RC=$rc
      tail -n 25 "$OUT/train_step.log"
    fi
    return "$rc"
  }

  ax_cmd assets $((AX_END - SECONDS < AX_ASSETS_LIMIT ? AX_END - SECONDS : AX_ASSETS_LIMIT)) \
    "$PY" -m axolotl_bnf_plugin.tiny "$AXWORK/assets" --rows 64
  ASSETS_RC=$?
  record "axolotl assets: $AX_LAST"
  AX_METHODS=(bnf:examples/tiny-bnf.yml asft:examples/tiny-asft-lora.yml)
  for i in "${!AX_METHODS[@]}"; do
    method=${AX_METHODS[$i]%%:*} example=${AX_METHODS[$i]#*:}
    method_end=$((SECONDS + (AX_END - SECONDS) / (${#AX_METHODS[@]} - i)))  # an equal share of what remains
    if [ "$ASSETS_RC" != 0 ]; then
      record "axolotl $method: not run (no tiny assets)"
      continue
    fi
    # The example, with its paths in the scratch folder, a few steps, and bf16 on CUDA (the examples are for a CPU).
    "$PY" - "$example" "$AXWORK" "$method" "$AX_STEPS" "$CUDA_OK" >"$AXWORK/$method.yml" <<'PYEOF'
import os
import sys

import yaml

example, work, method, steps, cuda = sys.argv[1:]
with open(example, encoding="utf-8") as f:
    cfg = yaml.safe_load(f)
cfg["base_model"] = os.path.join(work, "assets", "model")
for dataset in cfg["datasets"]:
    dataset["path"] = os.path.join(work, "assets", os.path.basename(dataset["path"]))
cfg["dataset_prepared_path"] = os.path.join(work, "prepared", method)
cfg["output_dir"] = os.path.join(work, "runs", method)
cfg["max_steps"] = int(steps)
cfg["eval_steps"] = int(steps) // 2
if cuda == "1":
    cfg.update(bf16=True, fp16=False)
yaml.safe_dump(cfg, sys.stdout, sort_keys=False)
PYEOF
    ax_cmd "$method preprocess" $((method_end - SECONDS)) "$PY" -m axolotl.cli.main preprocess "$AXWORK/$method.yml"
    rc=$?
    record "axolotl $method preprocess: $AX_LAST"
    if [ "$rc" != 0 ]; then
      record "axolotl $method train: not run (preprocess failed)"
      continue
    fi
    ax_cmd "$method train" $((method_end - SECONDS)) "$PY" -m axolotl.cli.main train "$AXWORK/$method.yml"
    TRAIN_NOTE=$(cd "$AXWORK" && "$PY" - "runs/$method/bnf_log_history.jsonl" "$AX_STEPS" <<'PYEOF'
import json
import os
import sys

path, steps = sys.argv[1], int(sys.argv[2])
if not os.path.exists(path):
    print(f"no {path}")
    sys.exit()
with open(path, encoding="utf-8") as f:
    records = [json.loads(line) for line in f if line.strip()]
train = [r for r in records if "loss" in r and "eval_loss" not in r]
evals = [r for r in records if "eval_loss" in r]


def first_last(rows, key):
    values = [r[key] for r in rows if isinstance(r.get(key), float)]
    return f"{values[0]:.4g} -> {values[-1]:.4g}" if values else "none"


done = max((r.get("step", 0) for r in records), default=0)
print(f"{done} of {steps} steps; loss {first_last(train, 'loss')}; margin {first_last(train, 'rewards/margins')};"
      f" eval margin {first_last(evals, 'eval_rewards/margins')}")
PYEOF
    )
    record "axolotl $method train: $AX_LAST; $TRAIN_NOTE"
  done
  rm -rf "$AXWORK"
fi
record "axolotl train step: $([ "$AX_RC" = 0 ] && echo ok || echo "failed (exit $AX_RC)")"

record "total: ${SECONDS}s"
[ "$TESTS_RC" = 0 ] && [ "$BENCH_RC" = 0 ] && [ "$TRAIN_RC" = 0 ] && [ "$AX_RC" = 0 ]
