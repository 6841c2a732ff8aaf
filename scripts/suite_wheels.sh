#!/usr/bin/env bash
# The wheels the GPU suite carries (benchmarks/suite_wheels.txt; for its `axolotl train` step also
# benchmarks/axolotl_wheels.txt and benchmarks/axolotl_wheels_built.txt), for CI's run of the suite on the device
# environment (scripts/test.sh): fetched and built once into a folder outside the clone, which the suite then
# installs from exactly as benchmarks/gpu_suite.sh installs its .whl/ on a GPU machine (SUITE_WHEELS).
#
#   bash scripts/suite_wheels.sh          fetch (or reuse) the wheels; print the folder that holds them
#   bash scripts/suite_wheels.sh SITE     the same, then install the wheels of benchmarks/suite_wheels.txt (those
#                                         every step of the suite uses) into SITE (a new folder) and check what
#                                         SITE beside the working tree makes importable (below)
#
# The folder is keyed on the three lists and on the download and build commands, and reused only once a fetch
# finished (.complete) and it still holds exactly one wheel of each listed NAME==VERSION and nothing else, so a
# cached folder never stands in for a missing wheel. The commands are the two of gpu_suite.sh's header: pip
# download --no-deps --only-binary=:all: (CPython 3.12, manylinux x86_64) -r benchmarks/suite_wheels.txt -r
# benchmarks/axolotl_wheels.txt, and pip wheel --no-deps -r benchmarks/axolotl_wheels_built.txt (the two
# packages PyPI publishes as source only, pure Python); the install command is its install step's (pip install
# --no-index --no-deps --no-compile --no-cache-dir --upgrade --target). Run with the device environment's
# python3 first on PATH (scripts/bootstrap.sh, BNF_ENV=device).
#
# The check, with PYTHONPATH=SITE:<working tree> as for every step of the suite but `axolotl train`: axolotl,
# trl and datasets are not importable; pydantic only from SITE (a carried wheel), if at all; axolotl_bnf_plugin
# from the working tree.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
suite_list="$root/benchmarks/suite_wheels.txt"
lists=("$suite_list" "$root/benchmarks/axolotl_wheels.txt")  # downloaded as published wheels
built="$root/benchmarks/axolotl_wheels_built.txt"             # built from their source distributions
py="${PYTHON:-python3}"
download=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
          --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
build=(--no-deps)

key="$( { cat "${lists[@]}" "$built"; echo "${download[*]}"; echo "${build[*]}"; } | sha256sum | cut -c1-16)"
wheels="${BNF_VENV_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/axolotl-bnf-plugin}/suite-wheels-$key"

wheels_of() {  # wheels_of check|select FOLDER LIST...
  # check: exit status 0 when FOLDER holds one wheel of each NAME==VERSION of the LISTs and no other file;
  # select: print the paths of FOLDER's wheels that the LISTs name.
  "$py" -I - "$@" <<'EOF'
import re, sys
from pathlib import Path

def canon(name):
    return re.sub(r"[-_.]+", "-", name).lower()

mode, folder, lists = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
listed = {}
for path in lists:
    for line in open(path, encoding="utf-8"):
        line = line.split("#")[0].strip()
        if line:
            m = re.fullmatch(r"([A-Za-z0-9_.-]+)==([^\s;]+)", line)
            if not m:
                sys.exit(f"[suite_wheels] {path}: not NAME==VERSION: {line!r}")
            listed[canon(m.group(1))] = m.group(2)
found = {}
for path in sorted(folder.iterdir()):
    if path.name.startswith("."):
        continue
    parts = path.name.split("-")
    if not path.name.endswith(".whl") or len(parts) < 5:
        sys.exit(f"[suite_wheels] {path}: not a wheel")
    name, version = canon(parts[0]), parts[1]
    if mode == "select":
        if listed.get(name) == version:
            print(path)
        continue
    if listed.get(name) != version or name in found:
        sys.exit(f"[suite_wheels] {path.name}: not in {', '.join(lists)}, or a second wheel of {name}")
    found[name] = version
missing = sorted(f"{name}=={version}" for name, version in listed.items() if name not in found)
if mode == "check" and missing:
    sys.exit(f"[suite_wheels] {folder} lacks {', '.join(missing)}")
EOF
}

if [ -f "$wheels/.complete" ] && ! wheels_of check "$wheels" "${lists[@]}" "$built"; then
  echo "[suite_wheels] fetching them again" >&2
  rm -f "$wheels/.complete"
fi
if [ ! -f "$wheels/.complete" ]; then
  rm -rf "$wheels"
  mkdir -p "$wheels"
  echo "[suite_wheels] fetching the wheels of ${lists[*]#"$root/"} and building those of ${built#"$root/"}" \
    "into $wheels" >&2
  requirements=()
  for list in "${lists[@]}"; do requirements+=(-r "$list"); done
  "$py" -m pip download -q --progress-bar off "${download[@]}" -d "$wheels" "${requirements[@]}" \
    2> >(grep -v "is ignored: it is neither" >&2)
  "$py" -m pip wheel -q --progress-bar off "${build[@]}" -w "$wheels" -r "$built" \
    2> >(grep -v "is ignored: it is neither" >&2)
  wheels_of check "$wheels" "${lists[@]}" "$built"
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
mapfile -t site_wheels < <(wheels_of select "$wheels" "$suite_list")
"$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
  "${site_wheels[@]}" \
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
