#!/usr/bin/env bash
# One run on a CUDA machine: the bf16 correctness tests of the fused log-prob kernels, the kernel benchmark
# tables (and the roofline comparison, when benchmarks/roofline.py is there), then one optimiser step of
# every method on a model of real layer shapes (benchmarks/train_step_bench.py).
#
#     OUT=/some/empty/dir bash benchmarks/gpu_suite.sh                    # from the repository root
#     OUT=/tmp/gpu_suite_out GPU_SUITE_SMOKE=1 bash benchmarks/gpu_suite.sh   # the same steps, tiny shapes, CPU too
#
# Needs what a stock CUDA image has: python3, torch, triton, transformers, peft, pytest, pyyaml, numpy (no
# network, no axolotl: the repository is imported from the working tree through PYTHONPATH, not installed).
# What it lacks comes as wheels in .whl/ (ignored by git), the list in benchmarks/suite_wheels.txt:
#   - pydantic, pydantic_core, annotated_types, typing_inspection: the methods declare their config keys as
#     pydantic models, so `axolotl_bnf_plugin.methods` (the BNF kernel rows, the training step) imports
#     pydantic, which the GPU machines do not have (pydantic_core is the one compiled wheel: CPython 3.12,
#     x86_64, at exactly the version its pydantic requires);
#   - liger-kernel (pure Python, `py3-none-any`; its only requirements are torch and triton) for the
#     `liger flce` rows, which are reported as skipped without it.
# Each is installed with --no-deps into $SUITE_SITE (default /tmp/site), put first on PYTHONPATH, unless this
# machine has that distribution at the same or a newer version. .whl/ is made, on any machine with network
# access, by:
#
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#         -d .whl -r benchmarks/suite_wheels.txt
#
# Files written to $OUT (8):
#   summary.txt         the machine (nvidia-smi; python, torch, triton, transformers, peft, pydantic, liger-kernel
#                       versions), then each step's exit status and time
#   gpu_tests.log       pytest tests/test_gpu_kernels.py tests/test_triton_kernel.py
#   kernel_bench.jsonl  one JSON object per (shape, method), appended as each is measured
#   kernel_bench_frozen.jsonl   the same for a frozen weight (LoRA: d hidden only), one shape
#   kernel_bench.log    both kernel benchmarks' output (progress, tables, tracebacks of failed rows), and the
#                       roofline's messages
#   train_step.jsonl    one JSON object per (model, full / LoRA, unpacked / packed, method), appended as measured
#   train_step.log      the training-step benchmark's output
#   tables.md           the README-ready markdown: the kernel tables (trainable, then frozen weight), the roofline
#                       model beside the measured times, the training-step tables
#
# Time: everything is kept within SUITE_BUDGET_S seconds (default 530): the tests get at most
# SUITE_TEST_TIMEOUT_S (default 200); the kernel benchmark what is left less the reserves of the steps after
# it (frozen weight 50 s, roofline and tables 45 s, training step 150 s); the frozen-weight rows what is left
# less the last two; the training step everything that remains but 15 s for its table (it starts no new case
# in its last 40 s, so it ends by itself). A benchmark stopped by its time limit keeps the rows it finished.
# Every step runs whatever the previous ones gave; the exit status is 0 only when the tests, the kernel
# benchmark (trainable weight) and the training step all passed.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
: "${OUT:?set OUT to the folder the results go to}"
mkdir -p "$OUT" || exit 2

PY=${PYTHON:-python3}
SMOKE=${GPU_SUITE_SMOKE:-0}
BUDGET=${SUITE_BUDGET_S:-530}
SITE=${SUITE_SITE:-/tmp/site}
RESERVE=45  # seconds kept for the roofline and the kernel tables after the kernel benchmarks
FROZEN_RESERVE=50  # seconds kept for the frozen-weight rows after the main table
TRAIN_RESERVE=150  # seconds kept for the training step after the kernel benchmarks and their tables
TRAIN_TABLE_RESERVE=15  # seconds kept for the training-step table
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
  ROOF_LIMIT=180  # a slow CPU spends most of it importing torch
  TRAIN_ARGS=(--smoke)
else
  TEST_TIMEOUT=${SUITE_TEST_TIMEOUT_S:-200}
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
# SUITE_WHEELS names another folder of them (CI: the cached download of benchmarks/suite_wheels.txt).
WHEEL_DIR=${SUITE_WHEELS:-.whl}
if compgen -G "$WHEEL_DIR/*.whl" >/dev/null; then
  mapfile -t WHEELS < <("$PY" - "$WHEEL_DIR"/*.whl <<'PYEOF'
import importlib.metadata as md
import os
import re
import sys


def key(version):
    return tuple(int(x) for x in re.findall(r"\d+", version)[:4])


for path in sys.argv[1:]:
    name, version = os.path.basename(path).split("-")[:2]
    try:
        installed = md.version(name)
    except md.PackageNotFoundError:
        installed = None
    print(path if installed is None or key(installed) < key(version) else f"kept {name} {installed}")
PYEOF
  )
  INSTALL=() KEPT=()
  for line in "${WHEELS[@]}"; do
    if [[ "$line" == "kept "* ]]; then KEPT+=("${line#kept }"); else INSTALL+=("$line"); fi
  done
  KEPT_NOTE=""
  [ "${#KEPT[@]}" -gt 0 ] && KEPT_NOTE="; kept this machine's $(IFS=,; echo "${KEPT[*]}")"
  if [ "${#INSTALL[@]}" -gt 0 ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${INSTALL[@]}"
    record "install $WHEEL_DIR -> $SITE: exit $? (${INSTALL[*]##*/})$KEPT_NOTE"
  else
    record "install $WHEEL_DIR: nothing to install$KEPT_NOTE"
  fi
else
  record "install: no $WHEEL_DIR/*.whl here; using what is importable (without liger-kernel its rows are skipped, without pydantic the BNF rows fail)"
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
# One pytest per file, so a file cut short by the time limit leaves the other's full report.
: >"$OUT/gpu_tests.log"
TESTS_RC=0
TESTS_END=$((SECONDS + TEST_TIMEOUT))
for test_file in tests/test_gpu_kernels.py tests/test_triton_kernel.py; do
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
BENCH_LIMIT=$((BUDGET - SECONDS - RESERVE - FROZEN_RESERVE - TRAIN_RESERVE))
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
FROZEN_LIMIT=$((BUDGET - SECONDS - RESERVE - TRAIN_RESERVE))
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
TRAIN_LIMIT=$((BUDGET - SECONDS - TRAIN_TABLE_RESERVE))
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

record "total: ${SECONDS}s"
[ "$TESTS_RC" = 0 ] && [ "$BENCH_RC" = 0 ] && [ "$TRAIN_RC" = 0 ]
