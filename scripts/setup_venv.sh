# Sourced by run_tests.sh and run_demo.sh: creates .venv once and installs dpunet into it.
# torch first and pinned: on this kind of machine the local CPU wheel; on a CUDA machine the registry's CUDA
# build. An already installed torch (e.g. the user's own CUDA build) is kept.
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -c "import torch" 2>/dev/null || pip install -q "torch==2.13.0"
pip install -q -e ".${DPUNET_EXTRAS:-}"
# OpenMP threads busy-wait by default, which costs a lot on a shared 2-core machine
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
