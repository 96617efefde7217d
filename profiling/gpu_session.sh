#!/usr/bin/env bash
# The GPU checks of this project, in steps that each fit one 10-minute call on a lent machine
# (torch and triton preinstalled, no package index), results under $OUT (default
# profiling/results/gpu-session):
#   profiling/gpu_session.sh STEP [STEP ...]
#   tests        the CUDA tests, the kernels' tests on real kernels, then the rest of the suite
#   bench-ga     bench.py: the GA block (ours, reference, torch.compile(reference))
#   bench-knn    bench.py: patch_knn and edge_features
#   bench-model  bench.py: IGNN vs EDSR inference, and a training step
#   trace        trace.py: time per stage, forward and backward, LR 128 and 256, bf16
#   memory       memory.py's predicted GA peaks, beside bench-ga's measured ones
# Wheels the machine lacks (nvtx) travel in .whl/ (the device tool's `carry`). Each step
# leaves at most 4 files in $OUT (a call returns 8): run tests and one bench per call.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
for s in "$@"; do
    case $s in
        tests | bench-ga | bench-knn | bench-model | trace | memory) ;;
        *) echo "unknown step '$s' (tests bench-ga bench-knn bench-model trace memory)"; exit 2 ;;
    esac
done
[ $# -gt 0 ] || { echo "usage: $0 STEP [STEP ...]"; exit 2; }
out=${OUT:-profiling/results/gpu-session}
mkdir -p "$out"

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
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    | tee "$out/versions.txt"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv >>"$out/versions.txt" || true

status=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $out/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc"
    [ "$rc" = 0 ] || status=1
}

for s in "$@"; do
    case $s in
        tests)
            step tests-cuda 300 python3 -m pytest -q -x tests/test_cuda.py \
                tests/test_kernel_patch_knn.py tests/test_kernel_aggregate.py tests/test_ops.py
            step tests-rest 280 python3 -m pytest -q --ignore=tests/test_cuda.py --ignore=tests/test_kernel_patch_knn.py \
                --ignore=tests/test_kernel_aggregate.py --ignore=tests/test_ops.py ;;
        bench-ga) step bench-ga 560 python3 profiling/bench.py --only ga --out "$out" ;;
        bench-knn) step bench-knn 300 python3 profiling/bench.py --only matching --out "$out" ;;
        bench-model) step bench-model 560 python3 profiling/bench.py --only model train --out "$out" ;;
        trace)
            for size in 128 256; do  # the Chrome traces stay on the machine (8 files come back)
                step "trace-$size" 200 python3 profiling/trace.py --size "$size" \
                    --precision bf16 --steps 3 --out "/tmp/trace-$size"
                cp "/tmp/trace-$size/trace.md" "$out/trace-$size.md" || status=1
            done ;;
        memory) step memory 120 python3 profiling/memory.py --json "$out/memory.json" ;;
    esac
done
exit $status
