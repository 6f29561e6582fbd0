#!/usr/bin/env bash
# One-time (and idempotent) set-up: the Debian Fashion-MNIST package, a venv in .venv with
# pinned torch/torchvision and taskfold installed editable.
# A second call only checks and returns; it reinstalls when pyproject.toml, the runtime or the
# extras asked for changed.
#
#   bash scripts/setup.sh          the runtime already installed; onnxruntime (extra `cpu`) in a new venv
#   bash scripts/setup.sh --test   also the test extra (pytest; HF PEFT, which tests/test_lora.py
#                                  checks the LoRA method against); kept by later calls
#   bash scripts/setup.sh --gpu    onnxruntime-gpu (extra `gpu`: CUDA and TensorRT execution
#                                  providers; runs on the CPU too)
#   bash scripts/setup.sh --cpu    back to onnxruntime
set -euo pipefail
cd "$(dirname "$0")/.."

RUNTIME=""
TEST=""
for arg in "$@"; do
  case "$arg" in
    --gpu) RUNTIME=gpu ;;
    --cpu) RUNTIME=cpu ;;
    --test) TEST=test ;;
    *) echo "setup: unknown option $arg (use --cpu, --gpu or --test)" >&2; exit 2 ;;
  esac
done

FMNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ ! -f "$FMNIST" ]; then
  echo "setup: installing Debian package dataset-fashion-mnist"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

# A first install puts torch's pinned build (with its CUDA libraries) and the rest into .venv:
# about 6.2 GB. Say so up front rather than let pip stop half-way on "No space left on device".
# No stamp means no install finished yet (a failed one writes none), so no torch import is needed.
STAMP=.venv/.taskfold-installed
NEED_MB=${TASKFOLD_SETUP_NEED_MB:-6500}
if [ ! -f "$STAMP" ]; then
  FREE_MB=$(df -Pm . | awk 'NR == 2 {print $4}')
  if [ -n "$FREE_MB" ] && [ "$FREE_MB" -lt "$NEED_MB" ]; then
    echo "setup: $(pwd) has $FREE_MB MB free on its disk; installing torch and the pinned" \
         "dependencies into .venv needs about $NEED_MB MB. Free some space and run this again." >&2
    exit 1
  fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi

HAVE=$(cat "$STAMP" 2>/dev/null || true)
read -r _ HAVE_RUNTIME HAVE_TEST <<< "$HAVE" || true
case "$HAVE_RUNTIME" in cpu|gpu) INSTALLED=$HAVE_RUNTIME ;; *) INSTALLED="" ;; esac
RUNTIME=${RUNTIME:-${INSTALLED:-cpu}}
[ "$HAVE_TEST" = test ] && TEST=test   # the test extra, once installed, stays
WANT="$(sha256sum pyproject.toml | cut -c1-16) $RUNTIME${TEST:+ test}"
if [ "$HAVE" != "$WANT" ]; then
  echo "setup: installing taskfold ($RUNTIME runtime) and its pinned dependencies into .venv (first time: a few minutes)"
  .venv/bin/python -m pip install -q --upgrade pip
  if [ "$INSTALLED" != "$RUNTIME" ]; then
    # the two wheels write the same files: remove whichever is there before installing the other
    .venv/bin/python -m pip uninstall -q -y onnxruntime onnxruntime-gpu 2>/dev/null || true
  fi
  .venv/bin/python -m pip install -q -e ".[$RUNTIME${TEST:+,test}]"
  echo "$WANT" > "$STAMP"
fi
echo "setup: ready (.venv/bin/taskfold, $RUNTIME runtime${TEST:+, test extra})"
