#!/usr/bin/env bash
# Set up (or reuse) the test environments and run the CPU test suite on each: what CI runs (.ci/run).
#
#   bash scripts/test.sh                          all three environments, each with its CI share (below)
#   BNF_TEST_PYTHONS=3.12 bash scripts/test.sh    one environment (3.11, 3.12 or device, or a list:
#                                                 "3.11 3.12 device", the default)
#   BNF_TEST_SHARE=all bash scripts/test.sh       every test on each Axolotl environment (over an hour each)
#   bash scripts/test.sh -k packing               extra arguments go to pytest, on each environment
#
# Environments (scripts/bootstrap.sh, pin sets in scripts/pins/):
#   3.11:   Python 3.11, torch 2.13.0 (CPU build, from disk), Axolotl 0.19.0, the project installed
#   3.12:   Python 3.12, torch 2.13.0 (PyPI's CUDA build, run on the CPU), Axolotl 0.21.0, project installed
#   device: the GPU machines' stock stack (Python 3.12, torch 2.11.0, Triton 3.6.0, transformers 5.17.0,
#           NumPy 2.5.2, pytest 9; no Axolotl, TRL, datasets or pydantic), run on the CPU. As on a GPU
#           machine, the project is not installed: the wheels the GPU suite carries (benchmarks/suite_wheels.txt
#           and, for its `axolotl train` step, benchmarks/axolotl_wheels.txt and axolotl_wheels_built.txt) are
#           fetched and built once into a cache outside the clone by scripts/suite_wheels.sh; those of
#           suite_wheels.txt are installed into a new folder with the suite's own install command, and
#           PYTHONPATH is that folder and the working tree. It runs only the tests listed in
#           tests/device_tests.txt, among them benchmarks/gpu_suite.sh end to end in its smoke mode
#           (SUITE_WHEELS: the cache; the suite installs every carried wheel itself, the Axolotl ones into a
#           folder of their own, and runs `axolotl train` for both methods), so that the script a GPU machine
#           runs finds nothing missing there.
#
# CI share. Every test runs on both Axolotl environments except those listed in tests/ci_subset.txt, which
# run on the one environment named there, and those listed in tests/device_tests.txt, which run on the device
# environment only. ci_subset.txt names the heaviest end-to-end tests whose subject does not depend on the
# Axolotl release (merge-lora, resume, FSDP and ZeRO-3 equivalence, torch.compile, precision, the kernels'
# exhaustive schedule and memory checks, ...), split so that both environments take about the same time.
# Each Axolotl environment therefore still runs: every plugin hook (test_config, test_axolotl_versions,
# test_step_features), data loading for every adapter and Axolotl type (test_adapters, test_bad_data,
# test_data_path, ...), `axolotl preprocess` and `axolotl train` end to end for both methods, full and LoRA
# (test_train_e2e: test_train_raises_chosen_over_rejected, test_preprocess_then_train_*), and multi-process
# training on the CPU under torchrun (test_distributed). Between them the three environments run every test.
# With BNF_TEST_SHARE=all the Axolotl environments also run the device tests.
#
# Tests run two at a time (pytest-xdist, `-n 2`, tests grouped by module) on the Axolotl environments, and
# one at a time on the device environment; torchrun gets a free port of its own (PET_STANDALONE) so that two
# launches never contend for the default one.
set -euo pipefail
cd "$(dirname "$0")/.."

pythons="${BNF_TEST_PYTHONS:-3.11 3.12 device}"
share="${BNF_TEST_SHARE:-ci}"
case "$share" in ci|all) ;; *) echo "BNF_TEST_SHARE must be ci or all, not '$share'" >&2; exit 2 ;; esac

# tests/device_tests.txt: "<pytest node id, or a file>  # comment"; each entry must still name a test.
device_tests=()
while read -r test _; do
  case "$test" in ''|'#'*) continue ;; esac
  file="${test%%::*}"
  name="${test#"$file"}"; name="${name#::}"; name="${name%%[*}"
  if [ ! -f "$file" ] || { [ -n "$name" ] && ! grep -q "^def $name(" "$file"; }; then
    echo "tests/device_tests.txt: '$test' names no test" >&2
    exit 2
  fi
  device_tests+=("$test")
done < tests/device_tests.txt

status=0
for version in $pythons; do
  started=$SECONDS
  if [ "$version" = device ]; then
    echo "=== device environment: ${device_tests[*]} ===" >&2
    # A subshell: its own bootstrap (PATH, BNF_VENV) and PYTHONPATH.
    if ! (
      export BNF_ENV=device
      unset BNF_PYTHON PYTHONPATH
      source scripts/bootstrap.sh
      site="$(mktemp -d "${TMPDIR:-/tmp}/bnf-suite-site.XXXXXX")"
      trap 'rm -rf "$site"' EXIT
      bash scripts/suite_wheels.sh "$site/site"
      # The other device tests import the suite's wheels from here (no Axolotl); the suite installs every
      # carried wheel itself from the cache, the Axolotl ones for its `axolotl train` step only.
      export PYTHONPATH="$site/site:$PWD" SUITE_WHEELS="$(bash scripts/suite_wheels.sh)"
      rc=0
      python -m pytest "${device_tests[@]}" -q -p no:cacheprovider --timeout=1800 "$@" || rc=$?
      [ "$rc" = 5 ] && { echo "(no device test selected)" >&2; rc=0; }
      exit "$rc"
    ); then
      status=1
    fi
    echo "=== device environment: $((SECONDS - started)) s ===" >&2
    continue
  fi
  deselect=()
  if [ "$share" = ci ]; then
    while read -r where test _; do  # "<3.11 | 3.12 | full> <node id>  # comment"
      case "$where" in ''|'#'*) continue ;; esac
      [ "$where" = "$version" ] || deselect+=("--deselect=$test")
    done < tests/ci_subset.txt
    for test in "${device_tests[@]}"; do deselect+=("--deselect=$test"); done
  fi
  echo "=== Python $version: $([ "$share" = ci ] && echo "CI share (${#deselect[@]} entries of tests/ci_subset.txt and tests/device_tests.txt run on another environment)" || echo "every test") ===" >&2
  # A subshell per environment: each sources its own bootstrap (PATH, BNF_VENV).
  if ! (
    export BNF_PYTHON="python$version"
    unset BNF_ENV
    source scripts/bootstrap.sh
    export PET_STANDALONE=1
    exec python -m pytest tests -q -p no:cacheprovider --timeout=900 -n 2 --dist loadfile "${deselect[@]}" "$@"
  ); then
    status=1
  fi
  echo "=== Python $version: $((SECONDS - started)) s ===" >&2
done
exit $status
