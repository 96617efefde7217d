"""`upscale`: super-resolve one image of any common kind, optionally tiled and self-ensembled.

    import ignn_triton
    sr = ignn_triton.upscale(array)                                 # built-in x4 weights
    sr = ignn_triton.upscale(array, weights="IGNN_x4.pth")          # numpy in, numpy out
    sr = ignn_triton.upscale(pil_image, weights=model, tile=256)     # PIL in, PIL out

`Upscaler` holds a loaded model, its device and precision for many images (the CLI uses it).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .checkpoint import load_model
from .images import array_to_tensor
from .imresize import imresize

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _resolve_device(device) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA device is available")
    return device


def _model_scale(model: torch.nn.Module) -> int:
    scale = getattr(model, "scale", None)
    if scale is None:  # torch.compile wrapper
        scale = getattr(getattr(model, "_orig_mod", None), "scale", None)
    if not isinstance(scale, int):
        raise ValueError(f"{type(model).__name__} has no integer `scale` attribute; pass an "
                         "IGNN or EDSR model or a checkpoint path")
    return scale


def _ensemble_variants():
    """(forward, inverse) pairs of the 8 flips/transposes of the dihedral group."""
    for transpose in (False, True):
        for dims in ((), (-1,), (-2,), (-2, -1)):
            def fwd(x, dims=dims, transpose=transpose):
                x = x.flip(dims) if dims else x
                return x.transpose(-2, -1) if transpose else x

            def inv(y, dims=dims, transpose=transpose):
                y = y.transpose(-2, -1) if transpose else y
                return y.flip(dims) if dims else y
            yield fwd, inv


def _tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    if tile >= length:
        return [0]
    starts = list(range(0, length - tile, tile - overlap))
    return starts + [length - tile]


def _ramp(length: int, before: int, after: int) -> torch.Tensor:
    """1-D blending weight: a linear ramp over `before` samples at the start and `after`
    at the end (never reaching 0), 1 elsewhere."""
    w = torch.ones(length)
    i = torch.arange(length, dtype=torch.float32)
    if before > 0:
        w = torch.minimum(w, (i + 0.5) / before)
    if after > 0:
        w = torch.minimum(w, (length - i - 0.5) / after)
    return w


class Upscaler:
    """A model ready to super-resolve: weights loaded, device and precision chosen.

    weights: a checkpoint path (released IGNN .pth, our .safetensors, EDSR) or an
    nn.Module with a `scale` attribute (moved to the device), or "builtin": the x4 weights
    shipped in the package (a small IGNN trained on CPU; see data/MODEL_CARD.md).
    precision: "auto" (bf16 on CUDA, fp32 on CPU), "fp32", "bf16" or "fp16" (CUDA only);
    reduced precisions run under torch.autocast.
    """

    def __init__(self, weights="builtin", device="auto", precision="auto", compile=False):
        self.device = _resolve_device(device)
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be auto, {', '.join(PRECISIONS)}; got {precision!r}")
        if precision == "fp16" and self.device.type == "cpu":
            raise ValueError("precision fp16 is not supported on the CPU; use fp32 or bf16 "
                             "(or a CUDA device)")
        self.precision, self.dtype = precision, PRECISIONS[precision]
        if isinstance(weights, torch.nn.Module):
            model, self.origin = weights, type(weights).__name__
        elif isinstance(weights, (str, Path)):
            model, self.origin = load_model(weights), str(weights)
        else:
            raise ValueError(f"weights must be a checkpoint path or an nn.Module; got "
                             f"{type(weights).__name__}")
        self.scale = _model_scale(model)
        self.model = model.to(self.device)
        if compile:
            self.model = torch.compile(self.model)

    # --- tensor level -------------------------------------------------------------------

    def _forward(self, x: torch.Tensor, self_ensemble: bool) -> torch.Tensor:
        """(1, 3, h, w) on the device -> (1, 3, S h, S w) float32."""
        amp = self.dtype != torch.float32
        with torch.inference_mode(), torch.autocast(self.device.type, self.dtype, enabled=amp):
            if not self_ensemble:
                return self.model(x).float()
            total = None
            for fwd, inv in _ensemble_variants():
                y = inv(self.model(fwd(x).contiguous()).float())
                total = y if total is None else total + y
            return total / 8

    def _tiled(self, x: torch.Tensor, tile: int, overlap: int, self_ensemble: bool,
               progress: bool) -> torch.Tensor:
        from tqdm import tqdm

        S = self.scale
        _, _, H, W = x.shape
        rows, cols = _tile_starts(H, tile, overlap), _tile_starts(W, tile, overlap)
        out = torch.zeros(1, 3, S * H, S * W)
        weight = torch.zeros(1, 1, S * H, S * W)
        bar = tqdm(total=len(rows) * len(cols), desc="tiles", unit="tile", leave=False,
                   disable=not progress or len(rows) * len(cols) == 1)
        try:
            for top in rows:
                for left in cols:
                    h, w = min(tile, H - top), min(tile, W - left)
                    y = self._forward(x[..., top: top + h, left: left + w], self_ensemble).cpu()
                    wy = _ramp(S * h, S * overlap if top > 0 else 0,
                               S * overlap if top + h < H else 0)
                    wx = _ramp(S * w, S * overlap if left > 0 else 0,
                               S * overlap if left + w < W else 0)
                    wt = (wy[:, None] * wx[None, :])[None, None]
                    out[..., S * top: S * (top + h), S * left: S * (left + w)] += y * wt
                    weight[..., S * top: S * (top + h), S * left: S * (left + w)] += wt
                    bar.update()
        finally:
            bar.close()
        return out / weight

    def upscale_tensor(self, x: torch.Tensor, tile: int | None = None, tile_overlap: int = 32,
                       self_ensemble: bool = False, progress: bool = False) -> torch.Tensor:
        """(1, 3, H, W) float in [0, 1] -> (1, 3, S H, S W) float32 on the CPU, clamped.
        On CUDA out-of-memory, retries with half the tile size (printing one warning line)."""
        if tile is not None and (tile < 1 or tile <= tile_overlap):
            raise ValueError(f"tile ({tile}) must be larger than tile_overlap ({tile_overlap})")
        if tile_overlap < 0:
            raise ValueError(f"tile_overlap must be >= 0; got {tile_overlap}")
        x = x.to(self.device, torch.float32)
        H, W = x.shape[-2:]
        overlap = tile_overlap
        while True:
            try:
                if tile is None or tile >= max(H, W):
                    return self._forward(x, self_ensemble).cpu().clamp(0, 1)
                return self._tiled(x, tile, overlap, self_ensemble, progress).clamp(0, 1)
            except torch.cuda.OutOfMemoryError:
                current = tile if tile is not None else max(H, W)
                if current <= 1:
                    raise
                tile = (current + 1) // 2
                if overlap >= tile:
                    overlap = tile // 4
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                print(f"ignn-triton: warning: out of memory with tile {current}; retrying with "
                      f"tile {tile} (overlap {overlap})", file=sys.stderr)

    # --- any image kind -----------------------------------------------------------------

    def __call__(self, image, scale: int | None = None, tile: int | None = None,
                 tile_overlap: int = 32, self_ensemble: bool = False, progress: bool = False):
        if scale is not None and scale != self.scale:
            raise ValueError(f"scale x{scale} requested but the model ({self.origin}) is "
                             f"x{self.scale}")
        run = dict(tile=tile, tile_overlap=tile_overlap, self_ensemble=self_ensemble,
                   progress=progress)
        if isinstance(image, torch.Tensor):
            return self._tensor(image, run)
        if isinstance(image, Image.Image):
            return self._pil(image, run)
        if isinstance(image, np.ndarray):
            return self._array(image, run)
        raise ValueError(f"image must be a numpy array, a PIL image or a tensor; got "
                         f"{type(image).__name__}")

    def _tensor(self, image: torch.Tensor, run: dict) -> torch.Tensor:
        if image.dim() not in (3, 4) or image.shape[-3] != 3 or (
                image.dim() == 4 and image.shape[0] != 1) or not image.is_floating_point():
            raise ValueError(f"tensor images must be (3, H, W) or (1, 3, H, W) float RGB in "
                             f"[0, 1]; got {tuple(image.shape)} {image.dtype}")
        if image.shape[-1] < 1 or image.shape[-2] < 1:
            raise ValueError(f"image must be at least 1x1; got {tuple(image.shape)}")
        y = self.upscale_tensor(image.reshape(1, 3, *image.shape[-2:]), **run)
        return y.reshape(*image.shape[:-2], *y.shape[-2:]).to(image.device, image.dtype)

    def _array(self, array: np.ndarray, run: dict) -> np.ndarray:
        if array.dtype not in (np.uint8, np.uint16):
            raise ValueError(f"numpy images must be uint8 or uint16; got {array.dtype}")
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
            raise ValueError(f"numpy images must be (H, W), (H, W, 3) or (H, W, 4); got "
                             f"{array.shape}")
        if array.shape[0] < 1 or array.shape[1] < 1:
            raise ValueError(f"image must be at least 1x1; got {array.shape[0]}x{array.shape[1]}")
        x = array_to_tensor(array)  # (1, C, H, W)
        channels = x.shape[1]
        rgb = x.expand(-1, 3, -1, -1) if channels == 1 else x[:, :3]
        y = self.upscale_tensor(rgb.contiguous(), **run)
        if channels == 1:
            y = y.mean(1, keepdim=True)
        elif channels == 4:
            alpha = imresize(x[:, 3:], self.scale).clamp(0, 1)
            y = torch.cat([y, alpha], 1)
        peak = 65535.0 if array.dtype == np.uint16 else 255.0
        out = (y[0] * peak).round().permute(1, 2, 0).numpy().astype(array.dtype)
        return out[..., 0] if array.ndim == 2 else out

    def _pil(self, image: Image.Image, run: dict) -> Image.Image:
        from .images import _from_pil

        array = _from_pil(image)
        return Image.fromarray(self._array(array, run))


def upscale(image, scale: int | None = None, weights="builtin", device="auto",
            precision="auto", tile: int | None = None, tile_overlap: int = 32,
            self_ensemble: bool = False, compile: bool = False, progress: bool = False):
    """Super-resolve one image by the model's scale; returns the same kind as given.

    image: numpy (H, W), (H, W, 3) or (H, W, 4) uint8/uint16, a PIL image, or a tensor
    (3, H, W) / (1, 3, H, W) float RGB in [0, 1]. Grayscale runs through the model as RGB
    and comes back as the channel mean; RGBA's alpha is upscaled with bicubic `imresize`.
    weights: checkpoint path or nn.Module (see `Upscaler`). scale: if given, must equal the
    model's. tile / tile_overlap: process overlapping LR tiles of that size, blended with
    linear ramps over the overlap (no seams); CUDA out-of-memory halves the tile and
    retries. self_ensemble: average the 8 flip/transpose variants.
    """
    upscaler = Upscaler(weights, device=device, precision=precision, compile=compile)
    return upscaler(image, scale=scale, tile=tile, tile_overlap=tile_overlap,
                    self_ensemble=self_ensemble, progress=progress)
