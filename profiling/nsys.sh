#!/usr/bin/env bash
# nsys timelines of IGNN x4 with NVTX stage ranges: inference and a mixed-precision training
# step, each captured around its timed steps only, then the NVTX summary of each.
#   profiling/nsys.sh [LR_SIZE=128] [PRECISION=bf16]      needs nsys on PATH and a CUDA GPU
# Reports land in profiling/results/nsys/ignn-{inference,train}.nsys-rep (open in Nsight
# Systems); stage names are listed in ignn_triton/profiling.py.
set -euo pipefail
cd "$(dirname "$0")/.."
size=${1:-128}
precision=${2:-bf16}
out=profiling/results/nsys
mkdir -p "$out"
for workload in inference train; do
    nsys profile --trace=cuda,nvtx --capture-range=cudaProfilerApi --capture-range-end=stop \
        --force-overwrite=true -o "$out/ignn-$workload" \
        python profiling/trace.py --nsys --workload "$workload" --size "$size" \
        --precision "$precision"
    nsys stats --report nvtx_sum --format table "$out/ignn-$workload.nsys-rep"
done
