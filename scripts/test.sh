#!/usr/bin/env bash
# Install the test dependencies and run the CPU test suite: scripts/test.sh [pytest args]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
"$root/scripts/install.sh" test
cd "$root"
exec "$PYTHON" -m pytest -q "$@"
