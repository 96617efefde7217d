"""MATLAB-compatible bicubic `imresize` for batched torch images.

Reproduces MATLAB's `imresize(img, scale, 'bicubic')` (and `imresize(img, [h w], 'bicubic')`):
Keys cubic kernel with a = -0.5, antialiasing (kernel stretched by 1 / scale) when
downscaling, symmetric edge mirroring, weights normalised to sum 1. Each dimension is
resized separately by a dense (out, in) weight matrix, in MATLAB's dimension order.
"""
from __future__ import annotations

import math

import torch

_KERNEL_WIDTH = 4.0  # support of the cubic kernel: |x| < 2


def _cubic(x: torch.Tensor) -> torch.Tensor:
    """Keys cubic convolution kernel with a = -0.5."""
    ax = x.abs()
    ax2 = ax * ax
    ax3 = ax2 * ax
    near = (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1)
    far = (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1) & (ax <= 2))
    return near + far


def _output_length(length: int, scale: float) -> int:
    """ceil(length * scale), forgiving float error such as 9 * (1/3) = 2.9999..."""
    exact = length * scale
    nearest = round(exact)
    if abs(exact - nearest) <= 1e-9 * max(1.0, exact):
        return max(1, nearest)
    return max(1, math.ceil(exact))


def _weight_matrix(in_len: int, out_len: int, scale: float) -> torch.Tensor:
    """MATLAB's `contributions` as a dense (out_len, in_len) float64 matrix on the CPU."""
    stretch = min(scale, 1.0)  # downscaling antialiases: h(x) = scale * f(scale * x)
    kernel_width = _KERNEL_WIDTH / stretch
    taps = math.ceil(kernel_width) + 2

    i = torch.arange(1, out_len + 1, dtype=torch.float64)  # (out,) 1-based output index
    u = i / scale + 0.5 * (1 - 1 / scale)  # (out,) position in 1-based input coordinates
    left = torch.floor(u - kernel_width / 2)  # (out,)
    j = left[:, None] + torch.arange(taps, dtype=torch.float64)  # (out, taps) 1-based inputs
    weights = stretch * _cubic(stretch * (u[:, None] - j))  # (out, taps)
    weights = weights / weights.sum(dim=1, keepdim=True)

    # Symmetric mirroring: aux = [1..in, in..1], index j -> aux[(j - 1) mod 2 in] (0-based here).
    k = torch.remainder(j.long() - 1, 2 * in_len)  # (out, taps)
    source = torch.where(k < in_len, k, 2 * in_len - 1 - k)  # (out, taps) 0-based input index

    matrix = torch.zeros(out_len, in_len, dtype=torch.float64)  # (out, in)
    return matrix.scatter_add_(1, source, weights)


def _check_args(
    x: torch.Tensor, scale: float | None, size: tuple[int, int] | None
) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"imresize: x must be a float tensor (B, C, H, W); got {got}")
    if x.dim() not in (2, 3, 4):
        raise ValueError(
            f"imresize: x must have shape (B, C, H, W), (C, H, W) or (H, W); got {tuple(x.shape)}"
        )
    if x.numel() == 0:
        raise ValueError(f"imresize: x must have no empty dimension; got shape {tuple(x.shape)}")
    if (scale is None) == (size is None):
        raise ValueError("imresize: give exactly one of scale and size")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise ValueError(f"imresize: scale must be a positive number; got {scale!r}")
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"imresize: scale must be a positive finite number; got {scale!r}")
    else:
        valid = (
            isinstance(size, (tuple, list))
            and len(size) == 2
            and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in size)
        )
        if not valid:
            raise ValueError(f"imresize: size must be two positive ints (H, W); got {size!r}")


def imresize(
    x: torch.Tensor, scale: float | None = None, size: tuple[int, int] | None = None
) -> torch.Tensor:
    """Bicubic resize of x (B, C, H, W), (C, H, W) or (H, W) by `scale` or to `size` = (H', W').

    Matches MATLAB's `imresize(x, scale, 'bicubic')` / `imresize(x, [H' W'], 'bicubic')`,
    antialiasing included. Computes in float32 (float64 for float64 input) and returns the
    input dtype; the result is neither rounded nor clamped.
    """
    _check_args(x, scale, size)
    in_h, in_w = x.shape[-2:]
    if scale is not None:
        out_h, out_w = _output_length(in_h, scale), _output_length(in_w, scale)
        scale_h = scale_w = float(scale)
    else:
        out_h, out_w = size
        scale_h, scale_w = out_h / in_h, out_w / in_w

    compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(compute_dtype)  # (..., H, W)

    def resize_rows(t: torch.Tensor) -> torch.Tensor:
        w_h = _weight_matrix(in_h, out_h, scale_h).to(t.device, compute_dtype)  # (H', H)
        return torch.matmul(w_h, t)  # (..., H', cols)

    def resize_cols(t: torch.Tensor) -> torch.Tensor:
        w_w = _weight_matrix(in_w, out_w, scale_w).to(t.device, compute_dtype)  # (W', W)
        return torch.matmul(t, w_w.T)  # (..., rows, W')

    # MATLAB resizes the dimension with the smaller scale first, rows on a tie.
    if scale_w < scale_h:
        y = resize_rows(resize_cols(y))
    else:
        y = resize_cols(resize_rows(y))
    return y.to(x.dtype)
