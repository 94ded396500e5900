#!/usr/bin/env bash
# Launch training under torchrun: scripts/train.sh RECIPE [section.key=value ...]
#   NPROC         processes per node (default: the number of GPUs, else 1)
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT   for several nodes (defaults: one node)
#   MAX_RESTARTS  times torchrun restarts the workers after one of them fails (default 0); each
#                 restart resumes from the latest checkpoint (checkpoint.resume: auto), so keep
#                 checkpoint.every small enough that the retrained steps are cheap
#   RDZV_ID       job id of the multi-node rendezvous (default: wlbtrain)
# Rendezvous: one node without restarts uses torchrun's static rendezvous at
# MASTER_ADDR:MASTER_PORT. With NNODES > 1 or MAX_RESTARTS > 0 the nodes meet through the c10d
# rendezvous at MASTER_ADDR:MASTER_PORT (MASTER_ADDR: the host that serves it, usually node 0;
# every node runs this script): a worker failing on any node restarts the workers of every node,
# which static rendezvous cannot. c10d numbers the nodes itself, so NODE_RANK is only a hint
# there. out_dir must be a filesystem every node shares.
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
NNODES="${NNODES:-1}"
# Bad input ends here with one line and exit status 2, before any process starts.
WORLD_SIZE=$((NPROC * NNODES)) "$PYTHON" -m wlbtrain.cli train --check "$@" >/dev/null

MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
if [ "$NNODES" -gt 1 ] || [ "${MAX_RESTARTS:-0}" -gt 0 ]; then
  # torchrun's workers otherwise share the agent's store across restarts, where the failed
  # round's keys (peer addresses) are still found: the restarted process group can time out
  # connecting to a dead worker. Unshared, each round's rank 0 serves a fresh store.
  export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
  rendezvous=(--rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT"
              --rdzv-id="${RDZV_ID:-wlbtrain}" --node-rank="${NODE_RANK:-0}")
else
  rendezvous=(--node-rank="${NODE_RANK:-0}" --master-addr="$MASTER_ADDR"
              --master-port="$MASTER_PORT")
fi

exec "$PYTHON" -m torch.distributed.run \
  --nproc-per-node="$NPROC" --nnodes="$NNODES" --max-restarts="${MAX_RESTARTS:-0}" \
  "${rendezvous[@]}" \
  -m wlbtrain.cli train "$@"
