#!/usr/bin/env bash
# `make compat`: the layer, engine and checkpoint tests (tests/models tests/ops tests/engine tests/utils) on the lowest
# and the newest torch that cbn_mmdet/utils/stack.py accepts, each in a venv of its own in work_dirs/compat/<torch>/.
#
#   bash tools/compat_check.sh [VERSION ...]    VERSION: a torch release, `lowest` or `newest`
#
# `lowest` is SUPPORTED's lower bound; `newest` is the newest torch on the index below SUPPORTED's upper bound. The
# default, `lowest 2.4.1 newest`, adds the oldest torch with a weights_only allow-list (add_safe_globals), where the
# checkpoint loader's allow-list runs without the defaults torch 2.5 added (cbn_mmdet/utils/checkpoint.py). Each
# venv gets that torch from the index (on Linux x86_64 a CUDA build with its nvidia packages: several GB),
# numpy<2 for torch < 2.3 (built against numpy 1.x), setuptools>=77,<81, pure-Python mmcv 2.1.0, mmengine 0.10.7 and
# mmdet 3.3.0, all three with --no-deps, the pure-Python packages they need, and pytest; `pip check` must pass.
# mmcv is built from its sdist with MMCV_WITH_OPS=0, which compiles nothing and names the distribution mmcv-lite
# (so pip cannot install it as `mmcv==2.1.0`: the sdist is downloaded first), without pip's cache, which may hold an
# mmcv 2.1.0 wheel built with ops for another torch. cbn_mmdet itself comes from this checkout through PYTHONPATH.
# A second run reuses the venv, unless install() below has changed, and only runs the tests.
#
# pip runs with PIP_CONSTRAINT set to an empty file: a constraint file in pip's configuration (this machine caps torch
# at 2.14.1 in /etc/xdg/pip) would otherwise refuse the torch asked for. The rest of pip's configuration applies.
#
# A test that fails only for want of mmcv's compiled ops ("No module named 'mmcv._ext'") or of a feature the lowest
# torch lacks is reported as skipped, with the reason (tools/compat_pytest_plugin.py lists the signatures). Results:
# work_dirs/compat/<torch>/result.md (one Markdown row per torch, as in docs/compat.md), .../<torch>/pytest.log and
# work_dirs/compat/install-<torch>.log. Exit status 1 if any test failed.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
OUT=work_dirs/compat
say() { printf '\033[1m[compat]\033[0m %s\n' "$*"; }

# torch's (lowest supported, first unsupported) from SUPPORTED, read without importing cbn_mmdet
read -r LOW HIGH < <("$PYTHON" - <<'EOF'
import ast
tree = ast.parse(open('cbn_mmdet/utils/stack.py').read())
node = next(n.value for n in tree.body if isinstance(n, ast.Assign) and getattr(n.targets[0], 'id', '') == 'SUPPORTED')
print(*ast.literal_eval(node)['torch'])
EOF
)
in_range() {  # 0 if torch $1 lies in [LOW, HIGH)
  "$PYTHON" -c "import sys; from packaging.version import Version as V
sys.exit(not V('$LOW') <= V(V('$1').base_version) < V('$HIGH'))"
}
older_than() {  # 0 if torch $1 is older than $2
  "$PYTHON" -c "import sys; from packaging.version import Version as V; sys.exit(not V('$1') < V('$2'))"
}
export PIP_CONSTRAINT=$ROOT/$OUT/no-constraints.txt PIP_DISABLE_PIP_VERSION_CHECK=1
newest() {  # the newest torch release on the index in [LOW, HIGH), without downloading it
  local report
  report=$(mktemp)
  mkdir -p "$OUT" && : > "$OUT/no-constraints.txt"
  "$PYTHON" -m pip install -q --dry-run --no-deps --ignore-installed --report "$report" "torch>=$LOW,<$HIGH" \
    >/dev/null 2>&1 || { echo "tools/compat_check.sh: pip found no torch>=$LOW,<$HIGH on the index" >&2; exit 1; }
  "$PYTHON" -c "import json, sys; print(json.load(open(sys.argv[1]))['install'][0]['metadata']['version'])" "$report"
  rm -f "$report"
}

[ $# -gt 0 ] || set -- lowest 2.4.1 newest
versions=()
for v in "$@"; do
  case $v in
    lowest) v=$LOW ;;
    newest) v=$(newest) ;;
  esac
  if ! in_range "$v"; then
    echo "tools/compat_check.sh: torch $v is outside the range cbn_mmdet/utils/stack.py accepts" \
         "(torch>=$LOW,<$HIGH), so \`import cbn_mmdet\` would refuse it; widen SUPPORTED first" >&2
    exit 2
  fi
  versions+=("$v")
done
say "torch range torch>=$LOW,<$HIGH; checking ${versions[*]}"
mkdir -p "$OUT"
: > "$OUT/no-constraints.txt"

install() {  # install() TORCH VENV: the venv for one torch; its text is the key of the stamp that says it is done
  local v=$1 venv=$2 numpy=numpy
  local py=$venv/bin/python
  local pip=("$py" -m pip install -q)
  older_than "$v" 2.3 && numpy='numpy<2'
  rm -rf "$venv"
  "$PYTHON" -m venv "$venv" &&
    "${pip[@]}" --upgrade pip &&
    "${pip[@]}" "torch==$v" &&
    "${pip[@]}" "torch==$v" "$numpy" 'setuptools>=77,<81' \
      addict matplotlib opencv-python packaging Pillow pycocotools pytest pyyaml rich scipy shapely six \
      termcolor terminaltables tqdm yapf &&
    "$py" -m pip download -q --no-deps --no-build-isolation --no-binary mmcv --no-cache-dir -d "$venv/sdist" \
      mmcv==2.1.0 &&
    MMCV_WITH_OPS=0 "${pip[@]}" --no-build-isolation --no-deps --no-cache-dir "$venv/sdist/mmcv-2.1.0.tar.gz" &&
    "${pip[@]}" --no-deps mmengine==0.10.7 mmdet==3.3.0 &&
    "$py" -m pip check &&
    "$py" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('mmcv._ext') is not None and
              'mmcv has compiled ops: pip installed a wheel built with MMCV_WITH_OPS=1')"
}

key=$(declare -f install older_than | sha1sum | cut -c1-16)
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
[ -z "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] || commit="$commit (with uncommitted changes)"
status=0
for v in "${versions[@]}"; do
  venv=$OUT/$v
  py=$venv/bin/python
  if [ ! -f "$venv/.compat-$key" ]; then
    say "torch $v: creating $venv (log: $OUT/install-$v.log)"
    t0=$(date +%s)
    install "$v" "$venv" > "$OUT/install-$v.log" 2>&1 ||
      { say "torch $v: install failed, see $OUT/install-$v.log"; tail -5 "$OUT/install-$v.log"; exit 1; }
    echo $(( $(date +%s) - t0 )) > "$venv/.compat-$key"
  fi
  installed=$(cat "$venv/.compat-$key")  # seconds the install took, when it ran
  say "torch $v: running the tests (log: $venv/pytest.log)"
  start=$(date +%s)
  set +e
  PYTHONPATH=$ROOT "$py" -m pytest tests/models tests/ops tests/engine tests/utils -q -p no:cacheprovider \
    -p tools.compat_pytest_plugin --junitxml="$venv/junit.xml" > "$venv/pytest.log" 2>&1
  rc=$?
  set -e
  took=$(( $(date +%s) - start ))
  [ $rc -eq 0 ] || status=1
  "$py" - "$venv" "$rc" "$took" "$installed" "$commit" <<'EOF'
"""One Markdown row of results for docs/compat.md, and the skip reasons, from pytest's junit XML."""
import collections
import datetime
import platform
import re
import sys
import xml.etree.ElementTree as ET
from importlib import metadata, util

spec = util.spec_from_file_location('stack', 'cbn_mmdet/utils/stack.py')  # without importing (and checking) cbn_mmdet
stack = util.module_from_spec(spec)
spec.loader.exec_module(stack)

venv, rc, took, installed, commit = sys.argv[1:]
suite = ET.parse(f'{venv}/junit.xml').getroot()
suite = suite if suite.tag == 'testsuite' else suite.find('testsuite')
cases = suite.findall('testcase')
outcome = collections.Counter()
for case in cases:  # a module skipped at collection counts as one
    kinds = [child.tag for child in case if child.tag in ('failure', 'error', 'skipped')]
    outcome[kinds[0] if kinds else 'passed'] += 1
reasons = collections.defaultdict(lambda: [0, set()])  # from pytest's -ra summary: "SKIPPED [n] path:line: reason"
with open(f'{venv}/pytest.log') as f:
    for match in re.finditer(r'^SKIPPED \[(\d+)\] ([^:]+):\d+: (.*)$', f.read(), re.M):
        reasons[match[3]][0] += int(match[1])
        reasons[match[3]][1].add(match[2])
versions = dict(stack.installed_versions(), numpy=metadata.version('numpy'))
row = (f"| {versions['torch']} | {platform.python_version()} | {versions['numpy']} | {outcome['passed']} | "
       f"{outcome['failure'] + outcome['error']} | {outcome['skipped']} | {took} s | {installed} s | "
       f"{datetime.date.today()} | {commit} |")
with open(f'{venv}/result.md', 'w') as f:
    f.write(row + '\n')
print(f"torch {versions['torch']}, mmcv {versions['mmcv']}, mmengine {versions['mmengine']}, "
      f"mmdet {versions['mmdet']}: pytest exit {rc}, {len(cases)} tests")
print('| torch | Python | numpy | passed | failed | skipped | tests wall | install wall | date | commit |')
print(row)
for reason, (n, paths) in sorted(reasons.items(), key=lambda item: -item[1][0]):
    print(f"  skipped {n}: {reason} [{', '.join(sorted(paths))}]")
EOF
  if [ $rc -ne 0 ]; then
    say "torch $v: tests failed, see $venv/pytest.log"
    grep -E '^(FAILED|ERROR) ' "$venv/pytest.log" || true
  fi
done
exit $status
