#!/usr/bin/env bash
# Train a config's units as a SLURM job array: each array task is one shard of the units, itself
# a torchrun over the node's GPUs; all shards share one run directory on a shared filesystem
# (each unit is claimed with a lock file, so no unit trains twice and a dead job's units are
# taken over). When the array is done, one plain run folds, exports, benches and reports.
#
#   sbatch --array=0-3 examples/slurm_array.sh examples/domainnet_resnet50.yaml /shared/runs/domainnet
#   # then, once every array task has finished:
#   taskfold run examples/domainnet_resnet50.yaml --out /shared/runs/domainnet
#
#SBATCH --job-name=taskfold
#SBATCH --nodes=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
set -euo pipefail
CONFIG=${1:?config}
OUT=${2:?run directory on a shared filesystem}
SHARDS=${SLURM_ARRAY_TASK_COUNT:-1}
SHARD=${SLURM_ARRAY_TASK_ID:-0}
GPUS=${SLURM_GPUS_ON_NODE:-1}
cd "$(dirname "$0")/.."
exec .venv/bin/torchrun --standalone --nproc_per_node "$GPUS" -m pipeline run "$CONFIG" --out "$OUT" \
  --shard "$SHARD/$SHARDS" --no-progress
