#!/usr/bin/env bash
# Reproduces the built-in x2 weights ignn_triton/data/ignn_x2_c64b16.safetensors (see
# ignn_triton/data/MODEL_CARD.md) on the CPU: 2000 steps from stage 1 of the x4 recipe
# (every layer of the x4 model that fits a x2 one, see ignn_triton.transfer.ignn_across_scales),
# then evaluates on the held-out images. Restartable: call it again after an interruption.
#   bash recipes/builtin_x2.sh [RUN_DIR]      (needs `pip install -e ".[test]"` for skimage)
set -euo pipefail
RUN=${1:-runs/builtin_x2}
X4=${X4_RUN:-runs/builtin_x4}  # the x4 recipe's run folder; its stage 1 is run if missing
. "$(dirname "$0")/common.sh"
stage "$X4/run" 3500 --scale 4 --crop 96 --lr 3e-4 --warmup 200
OMP_NUM_THREADS=1 stage "$RUN/run" 2000 --scale 2 --crop 64 --lr 2e-4 --warmup 100 \
    --init "$X4/run/model.safetensors"
evaluate 2 "$RUN/run/model.safetensors"
