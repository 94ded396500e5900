#!/usr/bin/env bash
# Install the test dependencies and run the CPU test suite: scripts/test.sh [pytest args]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
if ! "$root/scripts/install.sh" test; then
  # An offline machine (a GPU node without an index) cannot build the editable install; when
  # everything the suite needs is already there, run it from the source tree instead.
  "$PYTHON" -c "import torch, numpy, safetensors, yaml, pytest" || exit 1
  echo "scripts/test.sh: install failed; running from the source tree with the installed packages" >&2
  export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
fi
cd "$root"
exec "$PYTHON" -m pytest -q "$@"
