#!/usr/bin/env bash
# The wheels the GPU suite carries (benchmarks/suite_wheels.txt), for CI's run of the suite on the device
# environment (scripts/test.sh): fetched once into a folder outside the clone, then installed exactly as
# benchmarks/gpu_suite.sh installs its .whl/ on a GPU machine.
#
#   bash scripts/suite_wheels.sh          fetch (or reuse) the wheels; print the folder that holds them
#   bash scripts/suite_wheels.sh SITE     the same, then install them into SITE (a new folder) and check what
#                                         SITE beside the working tree makes importable (below)
#
# The folder is keyed on the list and on the download command, and reused only once a download finished
# (.complete) and it still holds exactly one wheel of each listed NAME==VERSION and nothing else, so a cached
# folder never stands in for a missing wheel. The download command is the one gpu_suite.sh's header gives
# (pip download --no-deps --only-binary=:all:, CPython 3.12, manylinux x86_64, -r the list); the install
# command is its install step's (pip install --no-index --no-deps --no-compile --no-cache-dir --upgrade
# --target). Run with the device environment's python3 first on PATH (scripts/bootstrap.sh, BNF_ENV=device).
#
# The check, with PYTHONPATH=SITE:<working tree> as on a GPU machine: axolotl, trl and datasets are not
# importable; pydantic only from SITE (a carried wheel), if at all; axolotl_bnf_plugin from the working tree.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
list="$root/benchmarks/suite_wheels.txt"
py="${PYTHON:-python3}"
download=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
          --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)

key="$( { cat "$list"; echo "${download[*]}"; } | sha256sum | cut -c1-16)"
wheels="${BNF_VENV_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/axolotl-bnf-plugin}/suite-wheels-$key"

holds_the_list() {  # exit status 0 when $1 holds one wheel of each listed NAME==VERSION and no other file
  "$py" -I - "$list" "$1" <<'EOF'
import re, sys
from pathlib import Path

def canon(name):
    return re.sub(r"[-_.]+", "-", name).lower()

listed = {}
for line in open(sys.argv[1], encoding="utf-8"):
    line = line.split("#")[0].strip()
    if line:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)==([^\s;]+)", line)
        if not m:
            sys.exit(f"[suite_wheels] {sys.argv[1]}: not NAME==VERSION: {line!r}")
        listed[canon(m.group(1))] = m.group(2)
found = {}
for path in sorted(Path(sys.argv[2]).iterdir()):
    if path.name.startswith("."):
        continue
    parts = path.name.split("-")
    if not path.name.endswith(".whl") or len(parts) < 5:
        sys.exit(f"[suite_wheels] {path}: not a wheel")
    name, version = canon(parts[0]), parts[1]
    if listed.get(name) != version or name in found:
        sys.exit(f"[suite_wheels] {path.name}: not in {sys.argv[1]}, or a second wheel of {name}")
    found[name] = version
missing = sorted(f"{name}=={version}" for name, version in listed.items() if name not in found)
if missing:
    sys.exit(f"[suite_wheels] {sys.argv[2]} lacks {', '.join(missing)}")
EOF
}

if [ -f "$wheels/.complete" ] && ! holds_the_list "$wheels"; then
  echo "[suite_wheels] fetching them again" >&2
  rm -f "$wheels/.complete"
fi
if [ ! -f "$wheels/.complete" ]; then
  rm -rf "$wheels"
  mkdir -p "$wheels"
  echo "[suite_wheels] fetching the wheels of benchmarks/suite_wheels.txt into $wheels" >&2
  "$py" -m pip download -q --progress-bar off "${download[@]}" -d "$wheels" -r "$list" \
    2> >(grep -v "is ignored: it is neither" >&2)
  holds_the_list "$wheels"
  touch "$wheels/.complete"
fi

if [ $# -eq 0 ]; then
  echo "$wheels"
  exit 0
fi
site="$1"
if [ -e "$site" ] && [ -n "$(ls -A "$site")" ]; then
  echo "[suite_wheels] $site is not empty" >&2
  exit 1
fi
"$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$wheels"/*.whl \
  2> >(grep -v "is ignored: it is neither" >&2)
PYTHONPATH="$site:$root" "$py" -P - "$site" "$root" <<'EOF'
import importlib.util, os, sys

site, root = (os.path.realpath(p) for p in sys.argv[1:3])

def where(module):
    spec = importlib.util.find_spec(module)
    return None if spec is None else os.path.realpath(spec.origin or next(iter(spec.submodule_search_locations)))

bad = [f"{m} importable from {where(m)}" for m in ("axolotl", "trl", "datasets") if where(m)]
pydantic = where("pydantic")
if pydantic and not pydantic.startswith(site + os.sep):
    bad.append(f"pydantic importable from {pydantic}, not from the suite's wheels")
plugin = where("axolotl_bnf_plugin")
if not plugin or not plugin.startswith(os.path.join(root, "axolotl_bnf_plugin")):
    bad.append(f"axolotl_bnf_plugin from {plugin}, not from the working tree {root}")
if bad:
    sys.exit("[suite_wheels] not the GPU machines' stack: " + "; ".join(bad))
print(f"[suite_wheels] {site}: {', '.join(sorted(n for n in os.listdir(site) if n.endswith('.dist-info')))}; "
      f"pydantic {'from the wheels' if pydantic else 'absent'}; the project from {root}", file=sys.stderr)
EOF
