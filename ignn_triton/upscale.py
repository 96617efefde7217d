"""`upscale`: super-resolve one image of any common kind, optionally tiled and self-ensembled.

    import ignn_triton
    sr = ignn_triton.upscale(array)                                 # built-in x4 weights
    sr = ignn_triton.upscale(array, weights="IGNN_x4.pth")          # numpy in, numpy out
    sr = ignn_triton.upscale(pil_image, weights=model, tile=256)     # PIL in, PIL out

`Upscaler` holds a loaded model, its device and precision for many images (the CLI uses it).
"""
from __future__ import annotations

import contextlib
import os
import resource
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .checkpoint import BUILTIN_DEFAULT_SCALE, load_model
from .images import array_to_tensor
from .imresize import imresize
from .memory import estimate_memory
from .model import EDSR, IGNN

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The tile sizes `tile="auto"` chooses from, largest first; the smallest is the last resort.
TILE_SIZES = (1024, 896, 768, 640, 512, 448, 384, 320, 256, 192, 128, 96, 64)
# Default memory budget: this fraction of the memory available when the run starts
# (MemAvailable of /proc/meminfo on the CPU, free memory of the device on CUDA).
MEMORY_FRACTION = {"cpu": 0.7, "cuda": 0.85}
ESTIMATED = (IGNN, EDSR)  # the models whose memory `estimate_memory` predicts


class MemoryBudgetError(ValueError):
    """An image that cannot be upscaled within the memory budget, even in the smallest tiles."""


@dataclass(frozen=True)
class TilePlan:
    """How one image is processed: tile None (the whole image at once) or a tile size, the
    predicted peak bytes (`Upscaler.memory_needed`) and the budget it was chosen for."""
    tile: int | None
    peak: int
    budget: int

    def describe(self) -> str:
        how = "untiled" if self.tile is None else f"tile {self.tile}"
        if not self.peak:
            return f"{how} (no memory estimate for this model)"
        return f"{how} (predicted peak {_gib(self.peak)} of a {_gib(self.budget)} budget)"


def _gib(n: int) -> str:
    return f"{n / 2 ** 30:.1f} GiB"


def available_memory(device: torch.device) -> int:
    """Bytes that can be allocated now: free device memory on CUDA, MemAvailable on Linux
    (else the free physical pages)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def peak_memory(device: torch.device) -> int:
    """The peak bytes of this process so far: allocated on CUDA (since the last reset),
    resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


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
    nn.Module with a `scale` attribute (moved to the device), or "builtin": the weights
    shipped in the package for `scale` (2, 3 or 4, default 4; small IGNNs trained on the
    CPU, see data/MODEL_CARD.md). scale: with other weights, checked against the model's.
    precision: "auto" (bf16 on CUDA, fp32 on CPU), "fp32", "bf16" or "fp16" (CUDA only);
    reduced precisions run under torch.autocast.
    """

    def __init__(self, weights="builtin", device="auto", precision="auto", compile=False,
                 scale: int | None = None):
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
        elif isinstance(weights, str) and weights == "builtin":
            scale = BUILTIN_DEFAULT_SCALE if scale is None else scale
            model, self.origin = load_model(weights, scale=scale), f"builtin x{scale}"
        elif isinstance(weights, (str, Path)):
            model, self.origin = load_model(weights), str(weights)
        else:
            raise ValueError(f"weights must be a checkpoint path or an nn.Module; got "
                             f"{type(weights).__name__}")
        self.scale = _model_scale(model)
        if scale is not None and scale != self.scale:
            raise ValueError(f"scale x{scale} requested but the model ({self.origin}) is "
                             f"x{self.scale}")
        self.model = model.to(self.device)
        self._module = self.model  # the nn.Module itself, for estimates and progress hooks
        if compile:
            self.model = torch.compile(self.model)
        self._estimates: dict[tuple[int, int], int] = {}
        self.last_plan: TilePlan | None = None

    # --- memory -------------------------------------------------------------------------

    def memory_needed(self, height: int, width: int, tile: int | None = None,
                      self_ensemble: bool = False) -> int:
        """Predicted peak bytes, on the model's device, of upscaling an LR image of that
        size: the model's forward on the whole image or on one tile (`estimate_memory`);
        on the CPU also the images outside the model (on CUDA they are in host memory): the
        float32 output and its copies on the way to 8/16 bits (3x), and with tiles the
        blending weights; with self-ensembling, the running sum of a tile's outputs."""
        S = self.scale
        th, tw = (height, width) if tile is None else (min(tile, height), min(tile, width))
        if (th, tw) not in self._estimates:
            self._estimates[th, tw] = estimate_memory(self._module, th, tw, self.dtype,
                                                      self.device)
        need = self._estimates[th, tw]
        if self_ensemble:
            need += 2 * 3 * S * S * th * tw * 4
        if self.device.type == "cpu":
            out = 3 * S * S * height * width * 4
            need += 3 * out + 3 * height * width * 4
            if (th, tw) != (height, width):
                need += out // 3
        return need

    def plan(self, height: int, width: int, tile="auto", tile_overlap: int = 32,
             max_memory: int | None = None, self_ensemble: bool = False) -> TilePlan:
        """The tile size for an LR image of that size. tile: "auto" (the whole image if its
        predicted peak fits the budget, else the largest of TILE_SIZES that fits), 0 or None
        (never tile), or a size. max_memory: the budget in bytes (default: MEMORY_FRACTION
        of the memory available now). MemoryBudgetError if "auto" finds nothing that fits."""
        budget = max_memory or int(MEMORY_FRACTION[self.device.type]
                                   * available_memory(self.device))
        if not isinstance(self._module, ESTIMATED):  # a model estimate_memory does not know
            return TilePlan(None if tile in ("auto", 0, None) else tile, 0, budget)
        if tile in (0, None) or (tile != "auto" and tile >= max(height, width)):
            return TilePlan(None, self.memory_needed(height, width, None, self_ensemble), budget)
        if tile != "auto":
            return TilePlan(tile, self.memory_needed(height, width, tile, self_ensemble), budget)
        whole = self.memory_needed(height, width, None, self_ensemble)
        if whole <= budget:
            return TilePlan(None, whole, budget)
        sizes = [t for t in TILE_SIZES if tile_overlap < t < max(height, width)]
        lo, hi, best = 0, len(sizes) - 1, None  # sizes descend; the need with them
        while lo <= hi:
            mid = (lo + hi) // 2
            need = self.memory_needed(height, width, sizes[mid], self_ensemble)
            if need <= budget:
                best, hi = TilePlan(sizes[mid], need, budget), mid - 1
            else:
                lo = mid + 1
        if best is None:
            smallest = sizes[-1] if sizes else None
            need = self.memory_needed(height, width, smallest, self_ensemble)
            raise MemoryBudgetError(
                f"a {width}x{height} image needs about {_gib(need)} even in "
                f"{smallest or 'whole'}-pixel tiles, more than the {_gib(budget)} budget; "
                f"raise --max-memory, free memory, or use a smaller image")
        return best

    @contextlib.contextmanager
    def _stage_progress(self, x: torch.Tensor, enabled: bool):
        """A progress bar over the model's stages for an untiled image: forward hooks on
        its top-level modules (those of `progress_steps`, when the model has it)."""
        steps = getattr(self._module, "progress_steps", None)
        if not enabled or steps is None:
            yield
            return
        from tqdm import tqdm

        counts = steps(*x.shape[-2:], self.dtype.itemsize)
        bar = tqdm(total=sum(counts.values()), desc="stages", unit="stage", leave=False)

        def advance(*args) -> None:  # a forward hook's non-None result replaces the output
            bar.update()

        hooks = [getattr(self._module, name).register_forward_hook(advance) for name in counts]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()
            bar.close()

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
                    out[..., S * top: S * (top + h), S * left: S * (left + w)].add_(y * wt)
                    weight[..., S * top: S * (top + h), S * left: S * (left + w)].add_(wt)
                    bar.update()
        finally:
            bar.close()
        return out / weight

    def upscale_tensor(self, x: torch.Tensor, tile="auto", tile_overlap: int = 32,
                       self_ensemble: bool = False, progress: bool = False,
                       max_memory: int | None = None) -> torch.Tensor:
        """(1, 3, H, W) float in [0, 1] -> (1, 3, S H, S W) float32 on the CPU, clamped.
        tile: "auto", 0 / None (never tile) or a size (see `plan`; the plan used is kept in
        `last_plan`). On CUDA out-of-memory, retries with half the tile size (printing one
        warning line)."""
        check_tile(tile, tile_overlap)
        H, W = x.shape[-2:]
        plan = self.plan(H, W, tile, tile_overlap, max_memory, self_ensemble)
        self.last_plan, tile = plan, plan.tile
        x = x.to(self.device, torch.float32)
        overlap = tile_overlap
        while True:
            try:
                if tile is None or tile >= max(H, W):
                    with self._stage_progress(x, progress and not self_ensemble):
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
                self.last_plan = TilePlan(tile, self.last_plan.peak, self.last_plan.budget)

    # --- any image kind -----------------------------------------------------------------

    def __call__(self, image, scale: int | None = None, tile="auto", tile_overlap: int = 32,
                 self_ensemble: bool = False, progress: bool = False,
                 max_memory: int | None = None):
        if scale is not None and scale != self.scale:
            raise ValueError(f"scale x{scale} requested but the model ({self.origin}) is "
                             f"x{self.scale}")
        run = dict(tile=tile, tile_overlap=tile_overlap, self_ensemble=self_ensemble,
                   progress=progress, max_memory=max_memory)
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


def check_tile(tile, tile_overlap: int) -> None:
    """ValueError unless tile is "auto", 0, None or a size larger than tile_overlap >= 0."""
    if not isinstance(tile_overlap, int) or tile_overlap < 0:
        raise ValueError(f"tile_overlap must be an integer >= 0; got {tile_overlap!r}")
    if tile in ("auto", 0, None):
        return
    if not isinstance(tile, int) or isinstance(tile, bool) or tile <= tile_overlap:
        raise ValueError(f"tile must be 'auto', 0 (never tile) or a size larger than "
                         f"tile_overlap ({tile_overlap}); got {tile!r}")


def upscale(image, scale: int | None = None, weights="builtin", device="auto",
            precision="auto", tile="auto", tile_overlap: int = 32,
            self_ensemble: bool = False, compile: bool = False, progress: bool = False,
            max_memory: int | None = None):
    """Super-resolve one image by the model's scale; returns the same kind as given.

    image: numpy (H, W), (H, W, 3) or (H, W, 4) uint8/uint16, a PIL image, or a tensor
    (3, H, W) / (1, 3, H, W) float RGB in [0, 1]. Grayscale runs through the model as RGB
    and comes back as the channel mean; RGBA's alpha is upscaled with bicubic `imresize`.
    weights: "builtin" (default), a checkpoint path or an nn.Module (see `Upscaler`).
    scale: picks the built-in weights (default 4); with other weights, must equal the
    model's. tile: "auto" (default: the whole image when its predicted peak memory fits
    max_memory bytes, by default 70% of the available RAM or 85% of the free GPU memory,
    else the largest tile that fits; MemoryBudgetError when none does), 0 or None (never
    tile) or a tile size. Tiles overlap by tile_overlap LR pixels, blended with linear
    ramps (no seams); CUDA out-of-memory halves the tile and retries. self_ensemble:
    average the 8 flip/transpose variants.
    """
    upscaler = Upscaler(weights, device=device, precision=precision, compile=compile,
                        scale=scale)
    return upscaler(image, scale=scale, tile=tile, tile_overlap=tile_overlap,
                    self_ensemble=self_ensemble, progress=progress, max_memory=max_memory)
