#!/usr/bin/env bash
# Reproduces the built-in weights ignn_triton/data/ignn_x4_c64b16.safetensors (see
# ignn_triton/data/MODEL_CARD.md): exports scikit-image's bundled photographs (training
# set, and two held-out images), trains a small IGNN x4 on the CPU, evaluates it on the
# held-out images. Restartable: a second call resumes from RUN/run/last.pt.
#   bash recipes/builtin_x4.sh [RUN_DIR]      (needs `pip install -e ".[test]"` for skimage)
set -euo pipefail
RUN=${1:-runs/builtin_x4}
mkdir -p "$RUN"
python - "$RUN" <<'PY'
import os, shutil, sys
import skimage
src = os.path.join(os.path.dirname(skimage.__file__), "data")
train = ["chelsea.png", "rocket.jpg", "hubble_deep_field.jpg", "ihc.png", "retina.jpg",
         "motorcycle_left.png", "camera.png", "brick.png", "grass.png", "gravel.png",
         "coins.png", "moon.png", "page.png", "text.png", "cell.png"]
heldout = ["astronaut.png", "coffee.png"]  # the demo image is a crop of astronaut
for folder, names in (("train", train), ("heldout", heldout)):
    os.makedirs(os.path.join(sys.argv[1], folder), exist_ok=True)
    for name in names:
        shutil.copyfile(os.path.join(src, name), os.path.join(sys.argv[1], folder, name))
print(f"scikit-image {skimage.__version__}: {len(train)} training, {len(heldout)} held-out images")
PY
python -m ignn_triton.train --data "$RUN/train" --val "$RUN/heldout" \
    --scale 4 --n-feats 64 --n-resblocks 16 --res-scale 1 \
    --crop 96 --batch 8 --steps 3500 --lr 3e-4 --schedule cosine --warmup 200 \
    --amp bf16 --workers 1 --ckpt-every 250 --val-every 500 --seed 0 \
    --out "$RUN/run" --resume auto
ignn-triton eval --hr "$RUN/heldout" --scale 4 --weights "$RUN/run/model.safetensors" \
    --out "$RUN/heldout.csv"
