#!/usr/bin/env bash
# One-GPU throughput before/after: eager vs compiled, input pipeline off vs on, the gpu1 recipe and
# the 550M-class recipe at 16K and 64K context. One markdown row per run in OUT/rows.md.
#   scripts/bench_single_gpu.sh [OUT] [which ...]    which: gpu1 550m-16k 550m-64k (default: all)
set -uo pipefail
out="${1:-runs/bench_single_gpu}"; shift || true
which="${*:-gpu1 550m-16k 550m-64k}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
run() {  # name, recipe and overrides
  local name="$1"; shift
  echo "== $name: $*"
  timeout "${RUN_TIMEOUT:-200}" python scripts/bench_train.py "$@" --warmup "${WARMUP:-5}" \
      --json "$out/$name.json" --out-dir "runs/bench-$name" > "$out/$name.log" 2>&1
  local rc=$?
  grep "^| recipes" "$out/$name.log" | tee -a "$out/rows.md"
  [ $rc -eq 0 ] || { echo "$name failed (exit $rc)"; tail -5 "$out/$name.log"; }
}
eager="train.compile=false data.prefetch=false"
for w in $which; do
  case "$w" in
    gpu1)
      run gpu1-eager recipes/gpu1.yaml train.steps=20 $eager
      run gpu1-compiled recipes/gpu1.yaml train.steps=20 ;;
    550m-16k)
      run 550m-16k-eager recipes/gpu1_550m.yaml train.steps=15 $eager
      run 550m-16k-compiled recipes/gpu1_550m.yaml train.steps=15 ;;
    550m-64k)
      run 550m-64k-compiled recipes/gpu1_550m.yaml data.context=65536 train.micro_batches=1 \
          train.steps=15
      run 550m-64k-compiled-ac recipes/gpu1_550m.yaml data.context=65536 train.micro_batches=1 \
          train.steps=15 train.activation_checkpointing=full ;;
  esac
done
