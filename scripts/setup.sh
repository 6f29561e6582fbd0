#!/usr/bin/env bash
# One-time (and idempotent) set-up: the Debian Fashion-MNIST package, a venv in .venv with
# pinned torch/torchvision and taskfold installed editable with its test extra.
# A second call only checks and returns; it reinstalls when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

FMNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ ! -f "$FMNIST" ]; then
  echo "setup: installing Debian package dataset-fashion-mnist"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi

STAMP=.venv/.taskfold-installed
WANT=$(sha256sum pyproject.toml | cut -c1-16)
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]; then
  echo "setup: installing taskfold and its pinned dependencies into .venv (first time: a few minutes)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[test]'
  echo "$WANT" > "$STAMP"
fi
echo "setup: ready (.venv/bin/taskfold)"
