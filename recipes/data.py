"""Export scikit-image's bundled photographs for the built-in weights' recipes: 15 training
images and two held-out ones (astronaut, of which the demo image is a crop, and coffee).
    python recipes/data.py RUN_DIR     (needs `pip install -e ".[test]"` for skimage)
"""
import os
import shutil
import sys

import skimage

TRAIN = ["chelsea.png", "rocket.jpg", "hubble_deep_field.jpg", "ihc.png", "retina.jpg",
         "motorcycle_left.png", "camera.png", "brick.png", "grass.png", "gravel.png",
         "coins.png", "moon.png", "page.png", "text.png", "cell.png"]
HELDOUT = ["astronaut.png", "coffee.png"]

src = os.path.join(os.path.dirname(skimage.__file__), "data")
for folder, names in (("train", TRAIN), ("heldout", HELDOUT)):
    os.makedirs(os.path.join(sys.argv[1], folder), exist_ok=True)
    for name in names:
        shutil.copyfile(os.path.join(src, name), os.path.join(sys.argv[1], folder, name))
print(f"scikit-image {skimage.__version__}: {len(TRAIN)} training, {len(HELDOUT)} held-out images")
