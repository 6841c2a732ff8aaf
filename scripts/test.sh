#!/usr/bin/env bash
# Set up (or reuse) the environment and run the whole CPU test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bootstrap.sh
exec python -m pytest tests -q -p no:cacheprovider --timeout=900 "$@"
