#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment and installs this checkout into it.
#
# Which Python: $BNF_PYTHON (default python3.11; a name such as python3.12 that is not on PATH is also
# looked for among pyenv's installed versions). What gets installed is fixed by the pin set of that
# Python's minor version, scripts/pins/py<major>.<minor>.txt (every package of the environment at an exact
# version, used as pip constraints): Python 3.11 builds torch 2.13.0 (CPU) + Axolotl 0.19.0, Python 3.12
# builds torch 2.13.0 + Axolotl 0.21.0. setup.py itself only states ranges, so that installing the plugin
# into someone's own environment never replaces their torch or Axolotl.
#
# The environment lives outside the clone, keyed on everything that decides what gets installed
# (setup.py, this script, the pin set, the Python build), so a change to any of them builds a fresh one,
# and an environment is only reused once its build finished (.complete) and still holds the pinned
# versions of torch, Axolotl and the libraries the plugin imports. The project itself is reinstalled from
# the current checkout on every call, so a cached environment never stands in for that step.
#
# Usage: source scripts/bootstrap.sh   (exports BNF_VENV and BNF_PYTHON_VERSION and puts the environment
#        first on PATH; fails loudly)
#        BNF_PYTHON=python3.12 source scripts/bootstrap.sh   (the Axolotl 0.21 environment)

_bnf_pip() {
  # Quiet, and without the notices pip prints for every configured-but-absent local index.
  "$BNF_VENV/bin/python" -m pip "$@" -q --progress-bar off 2> >(grep -v "is ignored: it is neither" >&2)
}

_bnf_find_python() {
  # Prints a runnable interpreter for $1 (a command or path); pyenv's shim for a version that is
  # installed but not selected does not run, so fall back to the interpreter inside pyenv's tree.
  local want="$1" ver candidate
  if "$want" -c "" >/dev/null 2>&1; then command -v "$want"; return 0; fi
  ver="${want##*python}"
  if [ -n "$ver" ] && command -v pyenv >/dev/null 2>&1; then
    for candidate in "$(pyenv root)"/versions/"$ver".*/bin/python"$ver"; do
      if [ -x "$candidate" ] && "$candidate" -c "" >/dev/null 2>&1; then echo "$candidate"; return 0; fi
    done
  fi
  echo "[bootstrap] no runnable interpreter '$want' (set BNF_PYTHON to one)" >&2
  return 1
}

_bnf_check_pins() {
  # Exit status 0 when the environment holds the pinned versions of what the plugin runs on.
  "$BNF_VENV/bin/python" - "$1" <<'EOF'
import re, sys
from importlib.metadata import PackageNotFoundError, version
watched = {"torch", "axolotl", "transformers", "trl", "peft", "datasets", "accelerate", "deepspeed", "pytest"}
bad = []
for line in open(sys.argv[1], encoding="utf-8"):
    m = re.match(r"^([A-Za-z0-9_.-]+)==([^\s;#]+)", line.strip())
    if not m or m.group(1).lower().replace("_", "-") not in watched:
        continue
    name, want = m.groups()
    try:
        have = version(name)
    except PackageNotFoundError:
        have = "missing"
    if have.split("+")[0] != want.split("+")[0]:  # 2.13.0+cpu is the pinned 2.13.0
        bad.append(f"{name} {have} (pinned {want})")
if bad:
    print("[bootstrap] cached environment differs from its pin set: " + ", ".join(bad), file=sys.stderr)
    sys.exit(1)
EOF
}

_bnf_bootstrap() {
  local root python pyver pins key
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)" || return 1
  if [ -n "${BNF_PYTHON:-}" ]; then
    python="$(_bnf_find_python "$BNF_PYTHON")" || return 1
  else
    python="$(_bnf_find_python python3.11 2>/dev/null || _bnf_find_python python3)" || return 1
  fi
  pyver="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" || return 1
  pins="$root/scripts/pins/py$pyver.txt"
  if [ ! -f "$pins" ]; then
    echo "[bootstrap] Python $pyver ($python) has no pin set; supported: $(cd "$root/scripts/pins" && ls py*.txt | sed 's/^py//; s/\.txt$//' | tr '\n' ' ')" >&2
    return 1
  fi
  key="$( { cat "$root/setup.py" "$root/scripts/bootstrap.sh" "$pins"; "$python" -VV; } | sha256sum | cut -c1-16)" || return 1
  BNF_VENV="${BNF_VENV_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/axolotl-bnf-plugin}/venv-py$pyver-$key"
  if [ -f "$BNF_VENV/.complete" ] && ! _bnf_check_pins "$pins"; then
    echo "[bootstrap] rebuilding it" >&2
    rm -f "$BNF_VENV/.complete"
  fi
  if [ ! -f "$BNF_VENV/.complete" ]; then
    echo "[bootstrap] building environment $BNF_VENV (Python $pyver; first run: a few minutes)" >&2
    local started=$SECONDS
    rm -rf "$BNF_VENV"
    "$python" -m venv "$BNF_VENV" || return 1
    _bnf_pip install -c "$pins" --upgrade pip setuptools wheel || return 1
    # torch first, at the pinned release: the CPU build on Python 3.11 (a file on this disk); a bare
    # `torch` requirement, or one resolved together with everything else, could pull another build.
    _bnf_pip install -c "$pins" torch || return 1
    _bnf_pip install -c "$pins" -e "$root[test]" || return 1
    _bnf_check_pins "$pins" || return 1
    "$BNF_VENV/bin/python" -m pip check >&2 || return 1
    echo "[bootstrap] built in $((SECONDS - started)) s" >&2
    touch "$BNF_VENV/.complete"
  fi
  _bnf_pip install --no-deps --no-build-isolation -e "$root" || return 1
  "$BNF_VENV/bin/python" - "$BNF_VENV" <<'EOF' || return 1
import sys
from importlib.metadata import version
names = ("torch", "axolotl", "transformers", "trl", "peft", "datasets")
print("[bootstrap] " + sys.argv[1] + ": Python " + sys.version.split()[0] + ", "
      + ", ".join(name + " " + version(name) for name in names), file=sys.stderr)
EOF
  BNF_PYTHON_VERSION="$pyver"
  export BNF_VENV BNF_PYTHON_VERSION
  export PATH="$BNF_VENV/bin:$PATH"
  # Axolotl hangs at exit uploading telemetry when there is no network; nothing here needs a hub.
  export AXOLOTL_DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
}

_bnf_bootstrap || { echo "[bootstrap] environment set-up failed (see above)" >&2; return 1 2>/dev/null || exit 1; }
