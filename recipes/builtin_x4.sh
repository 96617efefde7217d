#!/usr/bin/env bash
# Reproduces the built-in x4 weights ignn_triton/data/ignn_x4_c64b16.safetensors (see
# ignn_triton/data/MODEL_CARD.md) on the CPU, in two stages:
#   1. 3500 steps from random initialisation (the first built-in x4 weights, 2026-11-24);
#   2. 3500 more steps from stage 1's weights (--init: a new optimiser and cosine cycle).
# then evaluates on the held-out images. Restartable: call it again after an interruption.
#   bash recipes/builtin_x4.sh [RUN_DIR]      (needs `pip install -e ".[test]"` for skimage)
set -euo pipefail
RUN=${1:-runs/builtin_x4}
. "$(dirname "$0")/common.sh"
stage "$RUN/run" 3500 --scale 4 --crop 96 --lr 3e-4 --warmup 200
OMP_NUM_THREADS=1 stage "$RUN/stage2" 3500 --scale 4 --crop 96 --lr 2e-4 --warmup 100 \
    --init "$RUN/run/model.safetensors"
evaluate 4 "$RUN/stage2/model.safetensors"
