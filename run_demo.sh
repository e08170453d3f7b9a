#!/usr/bin/env bash
# Sets up .venv (once) and runs the whole pipeline on a synthetic 3D task: plan, preprocess, train with
# epsilon 8 and non-privately, predict, evaluate. Extra arguments go to dpunet_demo (e.g. --hippocampus).
set -euo pipefail
cd "$(dirname "$0")"
. scripts/setup_venv.sh
dpunet_demo "$@"
