# Sourced by the builtin_x*.sh recipes: the data export and the settings every stage shares.
# Each stage resumes from its own OUT/last.pt, and is skipped once it reached its last step,
# so a recipe can be called again after any interruption.
RECIPES=$(dirname "${BASH_SOURCE[0]}")
python "$RECIPES/data.py" "$RUN"
COMMON=(--data "$RUN/train" --val "$RUN/heldout" --n-feats 64 --n-resblocks 16 --res-scale 1
        --batch 8 --schedule cosine --amp bf16 --workers 1 --ckpt-every 250 --val-every 500
        --seed 0)

# stage OUT STEPS ARGS...: train into OUT for STEPS steps unless OUT/last.pt is already there
stage() {
    local out=$1 steps=$2
    shift 2
    local at
    at=$(python -c "import sys, torch; print(torch.load(sys.argv[1], weights_only=True)['step'])" \
         "$out/last.pt" 2>/dev/null || echo 0)
    if [ "$at" -lt "$steps" ]; then
        python -m ignn_triton.train "${COMMON[@]}" --steps "$steps" --out "$out" --resume auto "$@"
    fi
}

# evaluate SCALE WEIGHTS: PSNR/SSIM (Y) of bicubic and the model on the held-out images
evaluate() {
    ignn-triton eval --hr "$RUN/heldout" --scale "$1" --weights "$2" --out "$RUN/heldout.csv"
}
