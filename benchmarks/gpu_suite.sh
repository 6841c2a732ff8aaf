#!/usr/bin/env bash
# One run on a CUDA machine: the bf16 correctness tests of the fused log-prob kernels, then the kernel
# benchmark table (and the roofline comparison, when benchmarks/roofline.py is there).
#
#     OUT=/some/empty/dir bash benchmarks/gpu_suite.sh                    # from the repository root
#     OUT=/tmp/gpu_suite_out GPU_SUITE_SMOKE=1 bash benchmarks/gpu_suite.sh   # the same steps, tiny shapes, CPU too
#
# Needs only what a stock CUDA image has: python3, torch, triton, pytest, pyyaml, numpy, pydantic (which
# transformers brings; no network, no axolotl: the repository is imported from the working tree through
# PYTHONPATH, not installed). The Liger-Kernel comparison comes from a wheel in .whl/ (pure Python,
# `py3-none-any`; its only requirements are torch and triton), installed with --no-deps into $SUITE_SITE (default /tmp/site). Without .whl/ the `liger flce` rows
# are reported as skipped. .whl/ is made, on any machine with network access, by:
#
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#         -d .whl liger-kernel
#
# Files written to $OUT (9):
#   env.txt             GPU (nvidia-smi), python / torch / triton / liger-kernel versions
#   gpu_tests.log       pytest tests/test_gpu_kernels.py tests/test_triton_kernel.py
#   kernel_bench.jsonl  one JSON object per (shape, method), appended as each is measured
#   kernel_bench.log    the benchmark's output (progress, table, tracebacks of failed rows)
#   kernel_bench_frozen.jsonl / .log   the same for a frozen weight (LoRA: d hidden only), one shape
#   roofline.md         benchmarks/roofline.py --measured kernel_bench.jsonl (when that script exists)
#   kernel_table.md     the README-ready markdown tables of every row measured (trainable, then frozen weight)
#   summary.txt         each step's exit status and time
#
# Time: everything is kept within SUITE_BUDGET_S seconds (default 470): the tests get at most
# SUITE_TEST_TIMEOUT_S (default 200), the benchmark what is left less a reserve for the last two steps; a
# benchmark stopped by its time limit keeps the rows it finished. Every step runs whatever the previous
# ones gave; the exit status is 0 only when the tests and the benchmark all passed.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
: "${OUT:?set OUT to the folder the results go to}"
mkdir -p "$OUT" || exit 2

PY=${PYTHON:-python3}
SMOKE=${GPU_SUITE_SMOKE:-0}
BUDGET=${SUITE_BUDGET_S:-470}
SITE=${SUITE_SITE:-/tmp/site}
RESERVE=60  # seconds kept for the roofline and the table after the benchmark
FROZEN_RESERVE=50  # seconds kept for the frozen-weight rows after the main table
SECONDS=0

say() { echo "[gpu_suite ${SECONDS}s] $*"; }
record() { echo "$*" >>"$OUT/summary.txt"; say "$*"; }
: >"$OUT/summary.txt"

if [ "$SMOKE" = 1 ]; then
  TEST_TIMEOUT=${SUITE_TEST_TIMEOUT_S:-900}
  SHAPES=(96x16x211 128x32x1000)
  FROZEN_SHAPES=(128x32x1000)
  ITERS=1
  BUDGET=${SUITE_BUDGET_S:-1800}
  ROOF_LIMIT=180  # a slow CPU spends most of it importing torch
else
  TEST_TIMEOUT=${SUITE_TEST_TIMEOUT_S:-200}
  SHAPES=()
  for v in 128256 151936; do for n in 4096 16384 32768; do SHAPES+=("${n}x4096x${v}"); done; done
  FROZEN_SHAPES=(16384x4096x128256)
  ITERS=5
  ROOF_LIMIT=30
fi
record "mode: $([ "$SMOKE" = 1 ] && echo smoke || echo gpu); budget ${BUDGET}s; shapes ${SHAPES[*]}; iters $ITERS"

# 1. Liger-Kernel from the carried wheel; the repository from the working tree.
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
  record "install .whl -> $SITE: exit $?"
else
  record "install: no .whl/*.whl here (liger flce rows will be skipped)"
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"

# 2. What this machine is.
say "environment"
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
for dist in ("torch", "triton", "liger-kernel", "transformers", "numpy", "pytest", "pydantic"):
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
PYEOF
} 2>&1 | tee "$OUT/env.txt"
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
BENCH_LIMIT=$((BUDGET - SECONDS - RESERVE - FROZEN_RESERVE))
if [ "$SMOKE" != 1 ] && [ "$CUDA_OK" != 1 ]; then
  BENCH_RC=3
  record "benchmark: not run (no CUDA device visible to torch)"
elif [ "$BENCH_LIMIT" -lt 30 ]; then
  BENCH_RC=3
  record "benchmark: not run (only ${BENCH_LIMIT}s of the budget left)"
else
  say "benchmark (time limit ${BENCH_LIMIT}s)"
  timeout -k 15 "$BENCH_LIMIT" "$PY" benchmarks/kernel_bench.py --shapes "${SHAPES[@]}" --iters "$ITERS" --warmup 1 \
    --jsonl "$OUT/kernel_bench.jsonl" 2>&1 | tee "$OUT/kernel_bench.log"
  BENCH_RC=${PIPESTATUS[0]}
  ROWS=$(grep -c . "$OUT/kernel_bench.jsonl" 2>/dev/null) || ROWS=${ROWS:-0}
  record "benchmark: exit $BENCH_RC$([ "$BENCH_RC" = 124 ] && echo ' (time limit)'); $ROWS rows in kernel_bench.jsonl"
fi

# 4b. A frozen weight (LoRA): our op builds d hidden in the forward; against naive and Liger, one shape.
FROZEN_LIMIT=$((BUDGET - SECONDS - RESERVE))
if [ "$BENCH_RC" = 3 ]; then
  record "frozen-weight benchmark: not run (see above)"
elif [ "$FROZEN_LIMIT" -lt 20 ]; then
  record "frozen-weight benchmark: not run (only ${FROZEN_LIMIT}s of the budget left)"
else
  say "frozen-weight benchmark (time limit ${FROZEN_LIMIT}s)"
  timeout -k 10 "$FROZEN_LIMIT" "$PY" benchmarks/kernel_bench.py --frozen-weight --shapes "${FROZEN_SHAPES[@]}" \
    --iters "$ITERS" --warmup 1 --methods "two-pass op (ours)" "bnf single pass (ours)" naive "liger flce" \
    --jsonl "$OUT/kernel_bench_frozen.jsonl" 2>&1 | tee "$OUT/kernel_bench_frozen.log"
  rc=${PIPESTATUS[0]}
  FROZEN_ROWS=$(grep -c . "$OUT/kernel_bench_frozen.jsonl" 2>/dev/null) || FROZEN_ROWS=${FROZEN_ROWS:-0}
  record "frozen-weight benchmark: exit $rc$([ "$rc" = 124 ] && echo ' (time limit)'); $FROZEN_ROWS rows"
fi

# 5. The roofline model beside the measured times (someone else's script: optional, failures tolerated).
if [ -f benchmarks/roofline.py ] && [ -s "$OUT/kernel_bench.jsonl" ]; then
  say "roofline"
  ROOF_ARGS=(--gpu H200 --measured "$OUT/kernel_bench.jsonl")
  ROOF_HELP=$(timeout "$ROOF_LIMIT" "$PY" benchmarks/roofline.py --help 2>/dev/null)
  if grep -q -- "--liger-accum" <<<"$ROOF_HELP"; then ROOF_ARGS+=(--liger-accum fp32); fi  # as kernel_bench calls Liger
  if [ "$SMOKE" = 1 ] && grep -q -- "--shapes" <<<"$ROOF_HELP"; then ROOF_ARGS+=(--shapes "${SHAPES[@]}"); fi
  timeout -k 5 "$ROOF_LIMIT" "$PY" benchmarks/roofline.py "${ROOF_ARGS[@]}" 2>&1 | tee "$OUT/roofline.md"
  record "roofline: exit ${PIPESTATUS[0]} (${ROOF_ARGS[*]})"
else
  record "roofline: skipped ($([ -f benchmarks/roofline.py ] && echo 'no measured rows' || echo 'benchmarks/roofline.py absent'))"
fi

# 6. The README-ready table, from the rows that were measured.
if [ -s "$OUT/kernel_bench.jsonl" ]; then
  "$PY" benchmarks/kernel_bench.py --table-from "$OUT/kernel_bench.jsonl" >"$OUT/kernel_table.md"
  record "table: exit $? -> kernel_table.md"
  if [ -s "$OUT/kernel_bench_frozen.jsonl" ]; then
    echo >>"$OUT/kernel_table.md"
    "$PY" benchmarks/kernel_bench.py --table-from "$OUT/kernel_bench_frozen.jsonl" >>"$OUT/kernel_table.md"
  fi
  cat "$OUT/kernel_table.md"
else
  echo "No benchmark rows were measured (see kernel_bench.log)." >"$OUT/kernel_table.md"
  record "table: no rows"
fi

record "total: ${SECONDS}s"
[ "$TESTS_RC" = 0 ] && [ "$BENCH_RC" = 0 ]
