"""Reading and writing images as (1, 3, H, W) float tensors in [0, 1], and PSNR on Y."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def read_image(path) -> torch.Tensor:
    """An image file as (1, 3, H, W) float32 RGB in [0, 1] (grayscale is promoted)."""
    try:
        with Image.open(path) as img:
            img.load()
            array = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read image ({e})") from e
    return torch.from_numpy(array).permute(2, 0, 1)[None].contiguous()


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) in [0, 1] -> (H, W, 3) uint8, rounded."""
    return (x[0].detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()


def write_image(x: torch.Tensor, path) -> None:
    """Write (1, 3, H, W) in [0, 1] as 8-bit RGB, atomically (temporary file, then rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        Image.fromarray(to_uint8(x)).save(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def psnr_y(a: torch.Tensor, b: torch.Tensor, border: int) -> float:
    """PSNR (dB) on the BT.601 Y channel of 8-bit-quantised RGB images, `border` pixels
    cropped on each side: the standard SR convention (spec section 9)."""
    def luma(x):
        rgb = torch.from_numpy(to_uint8(x)).double() / 255.0
        y = 16.0 + rgb @ torch.tensor([65.481, 128.553, 24.966], dtype=torch.float64)
        return y[border: y.shape[0] - border, border: y.shape[1] - border]

    mse = (luma(a) - luma(b)).square().mean().item()
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)
