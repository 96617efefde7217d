"""PSNR and SSIM on the BT.601 Y channel: the standard super-resolution convention.

Both images are quantised to 8 bits, converted to Y = 16 + 65.481 R + 128.553 G + 24.966 B
(RGB in [0, 1], so Y is in [16, 235]), `border` pixels are cropped on each side, and the
metric is computed in float64 with data range 255. SSIM uses an 11x11 Gaussian window
(sigma 1.5), K1 = 0.01, K2 = 0.03 and the population covariance, averaged over the
positions where the whole window fits (MATLAB's `ssim_index`, BasicSR, and scikit-image's
`structural_similarity(..., gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=255)`).

Accepted images: torch tensors (1, 3, H, W) or (3, H, W) float RGB in [0, 1], or numpy
arrays (H, W, 3) of uint8 (or float in [0, 1]).
"""
from __future__ import annotations

import math

import numpy as np
import torch

_Y_WEIGHTS = np.array([65.481, 128.553, 24.966], dtype=np.float64)


def _rgb_uint8(x) -> np.ndarray:
    """(H, W, 3) uint8 from any accepted image."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
        if t.dim() == 4 and t.shape[0] == 1:
            t = t[0]
        if t.dim() != 3 or t.shape[0] != 3 or not t.is_floating_point():
            raise ValueError(f"metrics: tensor images must be (1, 3, H, W) or (3, H, W) float "
                             f"RGB in [0, 1]; got {tuple(x.shape)} {x.dtype}")
        return (t.float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    a = np.asarray(x)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"metrics: array images must be (H, W, 3) RGB; got shape {a.shape}")
    if a.dtype == np.uint8:
        return a
    if np.issubdtype(a.dtype, np.floating):
        return np.round(np.clip(a, 0, 1) * 255).astype(np.uint8)
    raise ValueError(f"metrics: array images must be uint8 or float in [0, 1]; got {a.dtype}")


def luma(x, border: int = 0) -> np.ndarray:
    """BT.601 Y (float64, in [16, 235]) of the 8-bit-quantised image, border cropped."""
    rgb = _rgb_uint8(x).astype(np.float64) / 255.0
    y = 16.0 + rgb @ _Y_WEIGHTS
    if border < 0:
        raise ValueError(f"metrics: border must be >= 0; got {border}")
    return y[border: y.shape[0] - border, border: y.shape[1] - border]


def _pair(a, b, border: int) -> tuple[np.ndarray, np.ndarray]:
    ya, yb = luma(a, border), luma(b, border)
    if ya.shape != yb.shape:
        raise ValueError(f"metrics: images differ in size: {_rgb_uint8(a).shape[:2]} vs "
                         f"{_rgb_uint8(b).shape[:2]}")
    if ya.size == 0:
        raise ValueError(f"metrics: nothing left after cropping a border of {border}")
    return ya, yb


def psnr_y(a, b, border: int) -> float:
    """PSNR (dB) between two RGB images on the Y channel; inf when they are identical."""
    ya, yb = _pair(a, b, border)
    mse = float(np.mean(np.square(ya - yb)))
    return float("inf") if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    r = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(r ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def _filter_valid(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable 'valid' correlation of x (H, W) with the 1-D window g along both axes."""
    n = len(g)
    h, w = x.shape[0] - n + 1, x.shape[1] - n + 1
    rows = sum(g[i] * x[i: i + h, :] for i in range(n))
    return sum(g[j] * rows[:, j: j + w] for j in range(n))


def ssim_y(a, b, border: int) -> float:
    """Mean SSIM between two RGB images on the Y channel (see the module docstring)."""
    ya, yb = _pair(a, b, border)
    if min(ya.shape) < 11:
        raise ValueError(f"metrics: SSIM needs at least 11x11 pixels after cropping; got "
                         f"{ya.shape[0]}x{ya.shape[1]}")
    g = _gaussian_window()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_a, mu_b = _filter_valid(ya, g), _filter_valid(yb, g)
    var_a = _filter_valid(ya * ya, g) - mu_a ** 2
    var_b = _filter_valid(yb * yb, g) - mu_b ** 2
    cov = _filter_valid(ya * yb, g) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(ssim_map.mean())
