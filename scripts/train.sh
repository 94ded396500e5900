#!/usr/bin/env bash
# Launch training under torchrun: scripts/train.sh RECIPE [section.key=value ...]
#   NPROC        processes per node (default: the number of GPUs, else 1)
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT   for several nodes (defaults: one node)
# Installs the package first when it cannot be imported.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"

if ! "$PYTHON" -c "import wlbtrain.cli" 2>/dev/null; then
  "$root/scripts/install.sh"
fi

if [ -z "${NPROC:-}" ]; then
  NPROC=$("$PYTHON" -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi
# Bad input ends here with one line and exit status 2, before any process starts.
WORLD_SIZE=$((NPROC * ${NNODES:-1})) "$PYTHON" -m wlbtrain.cli train --check "$@" >/dev/null

exec "$PYTHON" -m torch.distributed.run \
  --nproc-per-node="$NPROC" --nnodes="${NNODES:-1}" --node-rank="${NODE_RANK:-0}" \
  --master-addr="${MASTER_ADDR:-127.0.0.1}" --master-port="${MASTER_PORT:-29500}" \
  -m wlbtrain.cli train "$@"
