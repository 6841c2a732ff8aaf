#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment and installs this checkout into it.
#
# The environment lives outside the clone, keyed on everything that decides what gets installed
# (setup.py, this script, the Python version), so a change to any requirement builds a fresh one.
# The project itself is (re)installed from the current checkout on every call, so a cached
# environment never stands in for this checkout's own install step.
#
# Usage: source scripts/bootstrap.sh   (exports BNF_VENV and puts it first on PATH)
_bnf_saved_opts="$(set +o)"
set -euo pipefail
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_python="${BNF_PYTHON:-python3.11}"
command -v "$_python" >/dev/null || _python=python3
_key="$( { cat "$_root/setup.py" "$_root/scripts/bootstrap.sh"; "$_python" -VV; } | sha256sum | cut -c1-16)"
BNF_VENV="${BNF_VENV_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/axolotl-bnf-plugin}/venv-$_key"

_pip() {
  # Quiet, and without the notices pip prints for every configured-but-absent local index.
  "$BNF_VENV/bin/python" -m pip -q --progress-bar off "$@" 2> >(grep -v "is ignored: it is neither" >&2)
}

if [ ! -f "$BNF_VENV/.complete" ]; then
  echo "[bootstrap] building environment $BNF_VENV (first run: a few minutes)" >&2
  rm -rf "$BNF_VENV"
  "$_python" -m venv "$BNF_VENV"
  _pip install --upgrade pip setuptools wheel
  # torch first: the CPU build of the pinned release; a bare `torch` would pull a multi-GB CUDA build.
  _pip install "torch==2.13.0"
  _pip install -e "$_root[test]"
  touch "$BNF_VENV/.complete"
fi
_pip install --no-deps --no-build-isolation -e "$_root"
export BNF_VENV
export PATH="$BNF_VENV/bin:$PATH"
# Axolotl hangs at exit uploading telemetry when there is no network; nothing here needs a hub.
export AXOLOTL_DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
eval "$_bnf_saved_opts"
