#!/usr/bin/env bash
# Sets up .venv (once) and runs the test suite. Extra arguments go to pytest, e.g. `bash run_tests.sh -m slow`.
set -euo pipefail
cd "$(dirname "$0")"
DPUNET_EXTRAS="[test]" . scripts/setup_venv.sh
python -m pytest "$@"
