#!/usr/bin/env bash
# Sets up .venv (once) and runs the test suite. Extra arguments go to pytest, e.g. `bash run_tests.sh -m slow`.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first and pinned: here it is the local CPU wheel; on a CUDA machine the registry's CUDA build.
# An already installed torch (e.g. the user's own CUDA build) is kept.
python -c "import torch" 2>/dev/null || pip install -q "torch==2.13.0"
pip install -q -e ".[test]"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
python -m pytest "$@"
