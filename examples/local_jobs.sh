#!/usr/bin/env bash
# Train a config's units with N jobs on this machine sharing one run directory (each claims the
# units it trains with a lock file), then fold, export, bench and report once.
#
#   bash examples/local_jobs.sh examples/quickstart.yaml 2 runs/quickstart
set -euo pipefail
CONFIG=${1:?config}
N=${2:-2}
OUT=${3:-runs/$(basename "$CONFIG" .yaml)}
cd "$(dirname "$0")/.."
for i in $(seq 0 $((N - 1))); do
  .venv/bin/taskfold run "$CONFIG" --out "$OUT" --stage train --no-progress > "$OUT.job$i.log" 2>&1 &
done
wait
.venv/bin/taskfold run "$CONFIG" --out "$OUT"
