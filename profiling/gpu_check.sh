#!/usr/bin/env bash
# The GPU check on a lent machine (torch and triton preinstalled, no package index): makes
# the checkout importable, then runs profiling/gpu_check.py, which says what it checks and
# what it writes:
#   profiling/gpu_check.sh [--out DIR] [--steps STEP ...] [--budget SECONDS] [--dry-run]
# Wheels the machine lacks (nvtx) travel in .whl/ (the device tool's `carry`).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if ! python3 -c "import ignn_triton.kernels, ignn_triton.reference" 2>/dev/null; then
    # kernels/ and reference/ become ignn_triton.* through pyproject's package-dir, which
    # a plain PYTHONPATH does not apply: link them in, on the lent machine's copy only
    command -v nvidia-smi >/dev/null || { echo "install the package first (README)"; exit 2; }
    ln -sfn "$PWD/kernels" ignn_triton/kernels
    ln -sfn "$PWD/reference" ignn_triton/reference
fi
exec python3 profiling/gpu_check.py "$@"
