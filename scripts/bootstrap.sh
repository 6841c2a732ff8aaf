#!/usr/bin/env bash
# Creates (or reuses) one of the project's virtual environments. $BNF_ENV says which:
#
#   axolotl (the default): the project installed with Axolotl, for the test suite and the demo. Which Python:
#     $BNF_PYTHON (default python3.11; a name such as python3.12 that is not on PATH is also looked for among
#     pyenv's installed versions). What gets installed is fixed by the pin set of that Python's minor
#     version, scripts/pins/py<major>.<minor>.txt (every package of the environment at an exact version, used
#     as pip constraints): Python 3.11 builds torch 2.13.0 (CPU) + Axolotl 0.19.0, Python 3.12 builds torch
#     2.13.0 + Axolotl 0.21.0. setup.py itself only states ranges, so that installing the plugin into
#     someone's own environment never replaces their torch or Axolotl.
#   device: the stock stack of the GPU machines benchmarks/gpu_suite.sh runs on, rebuilt for the CPU:
#     exactly the packages of scripts/pins/device.txt (Python 3.12, torch 2.11.0, Triton 3.6.0, transformers
#     5.17.0, NumPy 2.5.2, pytest 9, ...; no Axolotl, TRL, datasets or pydantic). The project is NOT
#     installed: a GPU machine imports it from the working tree through PYTHONPATH, beside the wheels the
#     suite carries (scripts/suite_wheels.sh), and scripts/test.sh runs the device tests the same way.
#
# An environment lives outside the clone, keyed on everything that decides what gets installed (this
# script, the pin set, the Python build, and for the axolotl environments setup.py), so a change to any of
# them builds a fresh one, and an environment is only reused once its build finished (.complete) and still
# holds its pinned versions: of torch, Axolotl and the libraries the plugin imports; in the device
# environment of every package of its pin set, with none of Axolotl, TRL, datasets, pydantic or the project
# installed. The project is reinstalled from the current checkout on every call of an axolotl environment,
# so a cached environment never stands in for that step.
#
# Usage: source scripts/bootstrap.sh   (exports BNF_VENV and BNF_PYTHON_VERSION and puts the environment
#        first on PATH; fails loudly)
#        BNF_PYTHON=python3.12 source scripts/bootstrap.sh   (the Axolotl 0.21 environment)
#        BNF_ENV=device source scripts/bootstrap.sh          (the GPU machines' stack, without the project)

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
  # Exit status 0 when the environment holds the pinned versions of what the plugin runs on ($2 = axolotl),
  # or of every package of the pin set and nothing of what a GPU machine lacks ($2 = device). Isolated (-I):
  # neither PYTHONPATH nor the current folder (a checkout, with its egg-info) counts.
  "$BNF_VENV/bin/python" -I - "$1" "$2" <<'EOF'
import importlib.util, re, sys
from importlib.metadata import PackageNotFoundError, distributions, version
pins, env = sys.argv[1], sys.argv[2]
canon = lambda name: re.sub(r"[-_.]+", "-", name).lower()
watched = {"torch", "axolotl", "transformers", "trl", "peft", "datasets", "accelerate", "deepspeed", "pytest"}
pinned, bad = set(), []
for line in open(pins, encoding="utf-8"):
    m = re.match(r"^([A-Za-z0-9_.-]+)==([^\s;#]+)", line.strip())
    if m:
        pinned.add(canon(m.group(1)))
    if not m or (env != "device" and canon(m.group(1)) not in watched):
        continue
    name, want = m.groups()
    try:
        have = version(name)
    except PackageNotFoundError:
        have = "missing"
    if have.split("+")[0] != want.split("+")[0]:  # 2.13.0+cpu is the pinned 2.13.0
        bad.append(f"{name} {have} (pinned {want})")
if env == "device":  # nothing beyond the pin set; pydantic (if at all) only from the suite's wheels
    bad += [f"{d.metadata['Name']} {d.version} (not in the pin set)" for d in distributions()
            if canon(d.metadata["Name"]) not in pinned]
    for module in ("axolotl", "trl", "datasets", "pydantic", "axolotl_bnf_plugin"):
        if importlib.util.find_spec(module) is not None:
            bad.append(f"{module} importable (must be absent)")
if bad:
    print("[bootstrap] environment differs from its pin set: " + ", ".join(bad), file=sys.stderr)
    sys.exit(1)
EOF
}

_bnf_bootstrap() {
  local root env python pyver pins key name started
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)" || return 1
  env="${BNF_ENV:-axolotl}"
  case "$env" in axolotl|device) ;; *) echo "[bootstrap] BNF_ENV must be axolotl or device, not '$env'" >&2; return 1 ;; esac
  if [ -n "${BNF_PYTHON:-}" ]; then
    python="$(_bnf_find_python "$BNF_PYTHON")" || return 1
  elif [ "$env" = device ]; then
    python="$(_bnf_find_python python3.12)" || return 1
  else
    python="$(_bnf_find_python python3.11 2>/dev/null || _bnf_find_python python3)" || return 1
  fi
  pyver="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" || return 1
  if [ "$env" = device ]; then
    pins="$root/scripts/pins/device.txt"
    if [ "$pyver" != 3.12 ]; then
      echo "[bootstrap] the device environment is Python 3.12, as on the GPU machines, not $pyver ($python)" >&2
      return 1
    fi
    key="$( { cat "$root/scripts/bootstrap.sh" "$pins"; "$python" -VV; } | sha256sum | cut -c1-16)" || return 1
    name="venv-device-py$pyver-$key"
  else
    pins="$root/scripts/pins/py$pyver.txt"
    if [ ! -f "$pins" ]; then
      echo "[bootstrap] Python $pyver ($python) has no pin set; supported: $(cd "$root/scripts/pins" && ls py*.txt | sed 's/^py//; s/\.txt$//' | tr '\n' ' ')" >&2
      return 1
    fi
    key="$( { cat "$root/setup.py" "$root/scripts/bootstrap.sh" "$pins"; "$python" -VV; } | sha256sum | cut -c1-16)" || return 1
    name="venv-py$pyver-$key"
  fi
  BNF_VENV="${BNF_VENV_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/axolotl-bnf-plugin}/$name"
  if [ -f "$BNF_VENV/.complete" ] && ! _bnf_check_pins "$pins" "$env"; then
    echo "[bootstrap] rebuilding it" >&2
    rm -f "$BNF_VENV/.complete"
  fi
  if [ ! -f "$BNF_VENV/.complete" ]; then
    echo "[bootstrap] building environment $BNF_VENV (Python $pyver, $env; first run: a few minutes)" >&2
    started=$SECONDS
    rm -rf "$BNF_VENV"
    "$python" -m venv "$BNF_VENV" || return 1
    _bnf_pip install -c "$pins" --upgrade pip setuptools wheel || return 1
    # torch first, at the pinned release: the CPU build on Python 3.11 (a file on this disk); a bare
    # `torch` requirement, or one resolved together with everything else, could pull another build.
    _bnf_pip install -c "$pins" torch || return 1
    if [ "$env" = device ]; then
      _bnf_pip install -r "$pins" || return 1  # every package at its pinned version, and nothing else
    else
      _bnf_pip install -c "$pins" -e "$root[test]" || return 1
    fi
    _bnf_check_pins "$pins" "$env" || return 1
    "$BNF_VENV/bin/python" -m pip check >&2 || return 1
    echo "[bootstrap] built in $((SECONDS - started)) s" >&2
    touch "$BNF_VENV/.complete"
  fi
  if [ "$env" = axolotl ]; then
    _bnf_pip install --no-deps --no-build-isolation -e "$root" || return 1
  fi
  "$BNF_VENV/bin/python" -I - "$BNF_VENV" "$env" <<'EOF' || return 1
import sys
from importlib.metadata import version
if sys.argv[2] == "device":
    names = ("torch", "triton", "transformers", "numpy", "accelerate", "peft", "pytest")
else:
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
