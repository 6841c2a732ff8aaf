#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment and installs this checkout into it.
#
# The environment lives outside the clone, keyed on everything that decides what gets installed
# (setup.py, this script, the Python version), so a change to any requirement builds a fresh one, and
# an environment is only reused once its build finished (.complete). The project itself is reinstalled
# from the current checkout on every call, so a cached environment never stands in for that step.
#
# Usage: source scripts/bootstrap.sh   (exports BNF_VENV and puts it first on PATH; fails loudly)

_bnf_pip() {
  # Quiet, and without the notices pip prints for every configured-but-absent local index.
  "$BNF_VENV/bin/python" -m pip "$@" -q --progress-bar off 2> >(grep -v "is ignored: it is neither" >&2)
}

_bnf_bootstrap() {
  local root python key
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)" || return 1
  python="${BNF_PYTHON:-python3.11}"
  command -v "$python" >/dev/null || python=python3
  key="$( { cat "$root/setup.py" "$root/scripts/bootstrap.sh"; "$python" -VV; } | sha256sum | cut -c1-16)" || return 1
  BNF_VENV="${BNF_VENV_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/axolotl-bnf-plugin}/venv-$key"
  if [ ! -f "$BNF_VENV/.complete" ]; then
    echo "[bootstrap] building environment $BNF_VENV (first run: a few minutes)" >&2
    rm -rf "$BNF_VENV"
    "$python" -m venv "$BNF_VENV" || return 1
    _bnf_pip install --upgrade pip setuptools wheel || return 1
    # torch first: the CPU build of the pinned release; a bare `torch` would pull a multi-GB CUDA build.
    _bnf_pip install "torch==2.13.0" || return 1
    _bnf_pip install -e "$root[test]" || return 1
    touch "$BNF_VENV/.complete"
  fi
  _bnf_pip install --no-deps --no-build-isolation -e "$root" || return 1
  export BNF_VENV
  export PATH="$BNF_VENV/bin:$PATH"
  # Axolotl hangs at exit uploading telemetry when there is no network; nothing here needs a hub.
  export AXOLOTL_DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
}

_bnf_bootstrap || { echo "[bootstrap] environment set-up failed (see above)" >&2; return 1 2>/dev/null || exit 1; }
