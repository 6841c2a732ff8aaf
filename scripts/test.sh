#!/usr/bin/env bash
# Set up (or reuse) the test environments and run the CPU test suite on each: what CI runs (.ci/run).
#
#   bash scripts/test.sh                        both environments, each with its CI share (below)
#   BNF_TEST_PYTHONS=3.12 bash scripts/test.sh  one environment (3.11 or 3.12, or both: "3.11 3.12")
#   BNF_TEST_SHARE=all bash scripts/test.sh     every test on each environment (over an hour per environment)
#   bash scripts/test.sh -k packing             extra arguments go to pytest, on each environment
#
# Environments (scripts/bootstrap.sh, pin sets in scripts/pins/):
#   3.11: Python 3.11, torch 2.13.0 (CPU build, from disk), Axolotl 0.19.0
#   3.12: Python 3.12, torch 2.13.0 (PyPI's CUDA build, run on the CPU), Axolotl 0.21.0
#
# CI share. Every test runs on both environments except those listed in tests/ci_subset.txt, which run on
# the one environment named there: the heaviest end-to-end tests whose subject does not depend on the Axolotl
# release (merge-lora, resume, FSDP and ZeRO-3 equivalence, torch.compile, precision, the kernels'
# exhaustive schedule and memory checks, ...), split so that both environments take about the same time.
# Each environment therefore still runs: every plugin hook (test_config, test_axolotl_versions,
# test_step_features), data loading for every adapter and Axolotl type (test_adapters, test_bad_data,
# test_data_path, ...), `axolotl preprocess` and `axolotl train` end to end for both methods, full and LoRA
# (test_train_e2e: test_train_raises_chosen_over_rejected, test_preprocess_then_train_*), and multi-process
# training on the CPU under torchrun (test_distributed). Between them the two environments run every test.
#
# Tests run two at a time (pytest-xdist, `-n 2`, tests grouped by module); torchrun gets a free port of its
# own (PET_STANDALONE) so that two launches never contend for the default one.
set -euo pipefail
cd "$(dirname "$0")/.."

pythons="${BNF_TEST_PYTHONS:-3.11 3.12}"
share="${BNF_TEST_SHARE:-ci}"
case "$share" in ci|all) ;; *) echo "BNF_TEST_SHARE must be ci or all, not '$share'" >&2; exit 2 ;; esac

status=0
for version in $pythons; do
  deselect=()
  if [ "$share" = ci ]; then
    while read -r where test _; do  # "<3.11 | 3.12 | full> <node id>  # comment"
      case "$where" in ''|'#'*) continue ;; esac
      [ "$where" = "$version" ] || deselect+=("--deselect=$test")
    done < tests/ci_subset.txt
  fi
  echo "=== Python $version: $([ "$share" = ci ] && echo "CI share (${#deselect[@]} entries of tests/ci_subset.txt run on the other environment)" || echo "every test") ===" >&2
  started=$SECONDS
  # A subshell per environment: each sources its own bootstrap (PATH, BNF_VENV).
  if ! (
    export BNF_PYTHON="python$version"
    source scripts/bootstrap.sh
    export PET_STANDALONE=1
    exec python -m pytest tests -q -p no:cacheprovider --timeout=900 -n 2 --dist loadfile "${deselect[@]}" "$@"
  ); then
    status=1
  fi
  echo "=== Python $version: $((SECONDS - started)) s ===" >&2
done
exit $status
