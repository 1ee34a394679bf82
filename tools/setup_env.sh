#!/usr/bin/env bash
# Create (or check) the project's environment in .venv/: torch 2.13 CPU, mmcv 2.1.0 with compiled ops, mmengine
# 0.10.7, mmdet 3.3.0, and this package in editable mode. Idempotent: a second run returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
key=$(cat tools/setup_env.sh requirements/*.txt setup.cfg pyproject.toml | sha1sum | cut -c1-16)
stamp=".venv/.cbn-env-$key"
if [ -f "$stamp" ]; then
  exit 0
fi
say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }
if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
pip=(.venv/bin/python -m pip install --disable-pip-version-check -q)
say "installing build tools and torch==2.13.0 (CPU build)"
"${pip[@]}" --upgrade pip 'setuptools>=77,<81' wheel ninja
"${pip[@]}" torch==2.13.0
if ! .venv/bin/python -c "import mmcv, mmcv.ops; assert mmcv.__version__ == '2.1.0'" >/dev/null 2>&1; then
  say "installing mmcv==2.1.0 with its compiled ops (RoIAlign, nms). Built from source the first time on a"
  say "machine: about 17 minutes on 2 cores. pip caches the wheel, so later installs take seconds."
  start=$(date +%s)
  ( while sleep 60; do say "  ... still building mmcv ($(( ($(date +%s) - start) / 60 )) min)"; done ) &
  ticker=$!
  trap 'kill $ticker 2>/dev/null || true' EXIT
  MMCV_WITH_OPS=1 MAX_JOBS=$(nproc) "${pip[@]}" --no-build-isolation mmcv==2.1.0
  kill $ticker 2>/dev/null || true
  say "mmcv ready after $(( $(date +%s) - start )) s"
fi
say "installing mmengine, mmdet, pycocotools and test tools"
"${pip[@]}" -r requirements/runtime.txt -r requirements/tests.txt
"${pip[@]}" --no-build-isolation --no-deps -e .
.venv/bin/python -c "import cbn_mmdet" >/dev/null
rm -f .venv/.cbn-env-*
touch "$stamp"
say "environment ready in .venv/"
