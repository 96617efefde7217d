"""The trainer's data: random (LR, HR) crops of folders of HR images, and the sampler that
gives every step its sample numbers.

LR crops are made on the fly with MATLAB bicubic (`imresize`) and quantised to 8 bits, or
read from a paired LR folder. Every sample is a pure function of (seed, sample number), so
a run resumed from a checkpoint, run with any number of data workers, or split over DDP
ranks sees exactly the same batches.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .images import IMAGE_EXTENSIONS, array_to_tensor, image_size, quantise, read_array
from .imresize import imresize


def image_files(folder: Path) -> list[Path]:
    """Image files under folder (recursively), sorted; ValueError if there are none."""
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such data folder")
    files = sorted(p for p in folder.rglob("*")
                   if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"{folder}: holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def _rgb(array: np.ndarray) -> torch.Tensor:
    """(H, W[, C]) uint8/uint16 -> (3, H, W) float32 RGB in [0, 1]: gray promoted, alpha dropped."""
    t = array_to_tensor(array)[0]
    return t.expand(3, -1, -1) if t.shape[0] == 1 else t[:3]


class PatchDataset(Dataset):
    """Random (LR, HR) training crops; sample n is a pure function of (seed, n).

    folders: HR image folders. lr_folders: optional paired LR folders, matched by stem
    (`0001.png` <- `0001.png` or `0001x4.png`, the DIV2K layout). The image of a sample is
    drawn with probability proportional to its number of crop positions. Augmentations:
    horizontal/vertical flip, transpose, and (rgb_permute) a random channel order.
    When the decoded images (as stored: 8 or 16 bit) take at most about cache_bytes, they
    are decoded once and kept in memory (shared by the data workers); otherwise every
    sample decodes its image. Samples are cropped before conversion to float.
    """

    def __init__(self, folders, scale: int, crop: int, seed: int = 0, lr_folders=None,
                 rgb_permute: bool = False, cache_bytes: int = 2 << 30):
        if crop % scale:
            raise ValueError(f"--crop {crop} must be a multiple of the scale {scale}")
        self.scale, self.crop, self.seed, self.rgb_permute = scale, crop, seed, rgb_permute
        self.files = [f for folder in folders for f in image_files(Path(folder))]
        problems, sizes = [], []
        for f in self.files:
            try:
                h, w = image_size(f)
            except ValueError as e:
                problems.append(str(e))
                continue
            sizes.append((h, w))
            if h < crop or w < crop:
                problems.append(f"{f}: {w}x{h} is smaller than the {crop}x{crop} crop "
                                f"(lower --crop or remove the image)")
        self.lr_files = None
        if lr_folders:
            by_stem = {p.stem: p for folder in lr_folders for p in image_files(Path(folder))}
            self.lr_files = []
            for f, (h, w) in zip(self.files, sizes):
                lr = by_stem.get(f.stem) or by_stem.get(f"{f.stem}x{scale}")
                if lr is None:
                    problems.append(f"{f}: no LR image named {f.stem} or {f.stem}x{scale} in "
                                    f"{', '.join(map(str, lr_folders))}")
                    continue
                self.lr_files.append(lr)
                lh, lw = image_size(lr)
                if (lh, lw) != (h // scale, w // scale):
                    problems.append(f"{lr}: LR is {lw}x{lh}, expected {w // scale}x{h // scale} "
                                    f"for {f.name} at x{scale}")
        if problems:
            raise ValueError(f"{len(problems)} problem(s) with the training data:\n  "
                             + "\n  ".join(problems[:20]) + ("\n  ..." if len(problems) > 20 else ""))
        self.sizes = sizes
        positions = np.array([(h - crop + 1) * (w - crop + 1) for h, w in sizes], np.float64)
        self.weights = positions / positions.sum()
        self.cache = None
        if sum(h * w * 3 for h, w in sizes) * (1.25 if lr_folders else 1) <= cache_bytes:
            self.cache = [self._decode(i) for i in range(len(self.files))]

    def _decode(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        hr = read_array(self.files[i])
        lr = read_array(self.lr_files[i]) if self.lr_files else None
        return hr, lr

    def __len__(self) -> int:
        return 2 ** 62  # samples are drawn by number: any n is valid

    def __getitem__(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, n])
        i = int(rng.choice(len(self.files), p=self.weights))
        hr_img, lr_img = self.cache[i] if self.cache is not None else self._decode(i)
        S, c = self.scale, self.crop
        (h, w), lc = self.sizes[i], c // S
        if lr_img is not None:  # crop on the LR grid so the pair stays aligned
            y, x = int(rng.integers(h // S - lc + 1)), int(rng.integers(w // S - lc + 1))
            hr = _rgb(hr_img[S * y: S * y + c, S * x: S * x + c])
            lr = _rgb(lr_img[y: y + lc, x: x + lc])
        else:
            y, x = int(rng.integers(h - c + 1)), int(rng.integers(w - c + 1))
            hr, lr = _rgb(hr_img[y: y + c, x: x + c]), None
        hflip, vflip, transpose = (rng.random(3) < 0.5).tolist()
        order = rng.permutation(3).tolist() if self.rgb_permute else [0, 1, 2]

        def augment(t):
            t = t[order]
            t = t.flip(2) if hflip else t
            t = t.flip(1) if vflip else t
            return (t.transpose(1, 2) if transpose else t).contiguous()

        hr = augment(hr)
        lr = augment(lr) if lr is not None else quantise(imresize(hr, 1 / S))
        return lr, hr


class StepSampler(Sampler):
    """Sample numbers for steps [start, steps) of this rank: global step t, batch B, world
    size R: rank r takes t*B + r*B/R ... t*B + (r+1)*B/R - 1."""

    def __init__(self, start: int, steps: int, batch: int, rank: int = 0, world: int = 1):
        self.start, self.steps, self.batch = start, steps, batch
        self.local = batch // world
        self.offset = rank * self.local

    def __iter__(self):
        for t in range(self.start, self.steps):
            base = t * self.batch + self.offset
            yield from range(base, base + self.local)

    def __len__(self) -> int:
        return (self.steps - self.start) * self.local
