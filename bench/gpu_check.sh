#!/usr/bin/env bash
# The GPU check of the paper configurations (bench/gpu_check.py; BENCHMARKS.md, "GPU check")
# on a bare GPU machine: a fresh copy of this repository and a Python with torch + CUDA, the
# project not installed. Run from anywhere:
#
#   bash bench/gpu_check.sh [gpu_check.py options]     # e.g. --configs amos --steps 5
#
# segment-anything is the one project dependency a plain torch image lacks; where it does not
# import, its wheel is installed from .whl/ (ignored by git; fetch it on a machine with PyPI:
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl segment-anything==1.0)
# into a temporary folder. The table goes to stdout and the log, the figures to
# gpu_check.json, both in $OUT when that is set (the device tool's output folder), else in
# the repository root. PYTHON picks the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
if ! "$py" -c "import segment_anything" 2>/dev/null; then
    shopt -s nullglob
    wheels=(.whl/segment_anything-*.whl)
    if [ ${#wheels[@]} -eq 0 ]; then
        echo "gpu_check.sh: segment_anything does not import and .whl/ holds no segment_anything wheel;" \
             "run: $py -m pip download --no-deps --only-binary=:all: -d .whl segment-anything==1.0" >&2
        exit 2
    fi
    site=$(mktemp -d /tmp/gpu_check_site.XXXXXX)
    trap 'rm -rf "$site"' EXIT
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "${wheels[0]}"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
out=${OUT:-.}
export PYTHONUNBUFFERED=1
"$py" bench/gpu_check.py --out "$out/gpu_check.json" "$@" 2>&1 | tee "$out/gpu_check.log"
exit "${PIPESTATUS[0]}"
