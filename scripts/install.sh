#!/usr/bin/env bash
# Install wlbtrain (editable) with its dependencies: scripts/install.sh [extra], e.g. `test`.
# torch is installed first, on its own, when missing: a CPU machine gets TORCH_SPEC (default
# torch==2.13.0) so that pip never pulls a multi-GB CUDA build onto a machine without a GPU
# (set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu where the plain index only has CUDA builds).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
extra="${1:-}"

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  index=()
  if [ -n "${TORCH_INDEX_URL:-}" ]; then index=(--index-url "$TORCH_INDEX_URL"); fi
  "$PYTHON" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}" "${index[@]}"
fi
target="$root"
if [ -n "$extra" ]; then target="$root[$extra]"; fi
"$PYTHON" -m pip install -q -e "$target"
