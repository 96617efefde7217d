"""AdaPN patch statistics: per (b, c, patch) mean and sqrt(unbiased var + EPS) over the p x p patches (stride t) of zero-padded F, and their backward (a gather, deterministic).
Forward: reads ~(p/t)^2 |F| through L1/L2 (|F| from DRAM), writes 8*B*C*G bytes; ~4*B*C*G*p^2 FLOPs. Backward: reads |F| + 16*B*C*G bytes, writes 4|F|/elem bytes; ~8*B*C*H*W*ceil(p/t)^2 FLOPs.
Must match reference.graph.query_stats (p=3, t=2, query padding) and reference.graph.key_stats (p=3s, t=2s, s x son padding) (spec sections 2 and 6).

Design
------
* One kernel serves both patch grids: patch, stride, padding and grid size are arguments
  (patch and stride constexpr), EPS (geometry.EPS = 1e-5) a constexpr. `query_grid_args` /
  `key_grid_args` give them: GraphGeometry.query_grid / key_grid.
* Grids (tiles, C, B): the tile count, the only large one, on axis 0 (CUDA caps axes 1 and 2
  at 65535; a 4100 x 4100 map has 65664 backward tiles of 256 pixels).
* Forward: one program = BLOCK_G patches of one (b, c) plane. The whole patch is loaded as
  a (BLOCK_G, PP) register tile (PP = next_pow2(p*p); out-of-map taps are the zero padding,
  taps >= p*p are masked out), so the variance is an exact two-pass in fp32 with a single
  load: mean = sum/n, var = sum((x - mean)^2)/(n - 1). No E[x^2] - E[x]^2 cancellation
  (tests measure it against float64 on data with a large offset). F is read in place (NCHW).
* Backward: d mean / d x = 1/n, d std / d x = (x - mean) / ((n - 1) std). Each pixel gathers
  over the at most ceil(p/t)^2 patches covering it: no atomics, bit-deterministic. The
  gradient is fp32 (B, C, H, W); `out=` adds it into an fp32 accumulator in place so the
  caller can chain the query-stats, key-stats and aggregation gradients before one cast.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..geometry import EPS, PatchGrid, graph_geometry
from .aot import launch_spec
from .utils import (SUPPORTED, TL_TYPES, check_int32, check_tensor, grid, launch,
                    on_tensor_device, record_launches)

__all__ = ["StatsConfig", "patch_stats", "patch_stats_backward", "query_grid_args",
           "key_grid_args", "default_stats_config", "DEFAULT_CONFIGS", "aot_specs"]


# --------------------------------------------------------------------------- configs

@dataclass(frozen=True)
class StatsConfig:
    """block_g: patches per forward program; block_p: pixels per backward program. Powers
    of two. No field defaults: the defaults are default_stats_config(patch)'s (change one
    field with dataclasses.replace)."""

    block_g: int
    block_p: int
    num_warps: int


def default_stats_config(patch: int) -> StatsConfig:
    """~2048 taps (block_g x next_pow2(patch^2)) per forward program, 256 pixels per backward
    program."""
    pp = triton.next_power_of_2(patch * patch)
    return StatsConfig(block_g=max(8, 2048 // pp), block_p=256, num_warps=4)


def query_grid_args(height: int, width: int, patch: int = 3, stride: int = 2) -> PatchGrid:
    """(patch, stride, pad_top, pad_left, grid_h, grid_w) of the query grid of an LR map."""
    return graph_geometry(height, width, 1, patch, stride).query_grid


def key_grid_args(height: int, width: int, scale: int, patch: int = 3,
                  stride: int = 2) -> PatchGrid:
    """(patch*s, stride*s, s*son pad_top, s*son pad_left, n1, n2): the key blocks of F."""
    return graph_geometry(height, width, scale, patch, stride).key_grid


# --------------------------------------------------------------------------- kernels

@triton.jit
def _patch_stats_kernel(x_ptr, mean_ptr, std_ptr, H, W, pad_top, pad_left, gh, gw,
                        PATCH: tl.constexpr, STRIDE: tl.constexpr, PP: tl.constexpr,
                        BLOCK_G: tl.constexpr, EPS: tl.constexpr):
    """mean/std (B*C, gh*gw) fp32 of the PATCH x PATCH patches (stride STRIDE) of the
    zero-padded planes x (B*C, H, W), std = sqrt(unbiased var + EPS). Program (tile, c, b)
    = BLOCK_G patches of plane b * C + c (C = the grid's axis 1)."""
    bc = tl.program_id(2).to(tl.int64) * tl.num_programs(1) + tl.program_id(1)
    G = gh * gw
    g = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    g_ok = g < G
    gc = tl.where(g_ok, g, 0)
    i = gc // gw
    j = gc - i * gw
    q = tl.arange(0, PP)
    q_ok = q < PATCH * PATCH
    u = q // PATCH
    v = q - u * PATCH
    row = i[:, None] * STRIDE + u[None, :] - pad_top
    col = j[:, None] * STRIDE + v[None, :] - pad_left
    ok = (g_ok[:, None] & q_ok[None, :] & (row >= 0) & (row < H) & (col >= 0) & (col < W))
    x = tl.load(x_ptr + bc * H * W + row * W + col, mask=ok, other=0.0)
    x = x.to(tl.float32)
    NP: tl.constexpr = PATCH * PATCH
    mean = tl.sum(x, 1) / NP
    d = tl.where(q_ok[None, :], x - mean[:, None], 0.0)
    var = tl.sum(d * d, 1) / (NP - 1)
    std = tl.sqrt_rn(var + EPS)
    out = bc * G + g
    tl.store(mean_ptr + out, mean, mask=g_ok)
    tl.store(std_ptr + out, std, mask=g_ok)


@triton.jit
def _patch_stats_bwd_kernel(x_ptr, mean_ptr, std_ptr, gm_ptr, gs_ptr, out_ptr,
                            H, W, pad_top, pad_left, gh, gw,
                            PATCH: tl.constexpr, STRIDE: tl.constexpr, NSLOT: tl.constexpr,
                            BLOCK_P: tl.constexpr, ACCUMULATE: tl.constexpr):
    """out[bc, y, x] (+)= sum over the patches g covering (y, x) of
    gm[g] / n + gs[g] * (x - mean[g]) / ((n - 1) std[g]), n = PATCH^2, fp32. Program
    (tile, c, b) = BLOCK_P pixels of plane bc = b * C + c (C = the grid's axis 1)."""
    bc = tl.program_id(2).to(tl.int64) * tl.num_programs(1) + tl.program_id(1)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < H * W
    pc = tl.where(p_ok, p, 0)
    yp = pc // W + pad_top  # >= 0: padded coordinates
    xp = pc % W + pad_left
    plane = bc * H * W
    xv = tl.load(x_ptr + plane + pc, mask=p_ok, other=0.0).to(tl.float32)
    G = gh * gw
    stats = bc * G
    NP: tl.constexpr = PATCH * PATCH
    acc = tl.zeros((BLOCK_P,), tl.float32)
    for di in tl.static_range(NSLOT):
        i = yp // STRIDE - di
        i_ok = (i >= 0) & (i < gh) & (yp - i * STRIDE < PATCH)
        for dj in tl.static_range(NSLOT):
            j = xp // STRIDE - dj
            ok = p_ok & i_ok & (j >= 0) & (j < gw) & (xp - j * STRIDE < PATCH)
            g = tl.where(ok, i * gw + j, 0)
            mean = tl.load(mean_ptr + stats + g, mask=ok, other=0.0)
            std = tl.load(std_ptr + stats + g, mask=ok, other=1.0)
            gm = tl.load(gm_ptr + stats + g, mask=ok, other=0.0)
            gs = tl.load(gs_ptr + stats + g, mask=ok, other=0.0)
            contrib = gm / NP + gs * (xv - mean) / ((NP - 1) * std)
            acc += tl.where(ok, contrib, 0.0)
    if ACCUMULATE:
        acc += tl.load(out_ptr + plane + pc, mask=p_ok, other=0.0)
    tl.store(out_ptr + plane + pc, acc, mask=p_ok)


# --------------------------------------------------------------------------- launchers

def _check_grid(kernel: str, H: int, W: int, g: PatchGrid) -> None:
    """Also the sizes the kernels support: any B and C (plane offsets are int64), planes
    and patch grids of fewer than 2^31 pixels and patches (int32 within a plane)."""
    assert g.patch >= 2 and g.stride >= 1, g
    assert 0 <= g.pad_top and 0 <= g.pad_left, g
    assert g.grid_h >= 1 and g.grid_w >= 1, g
    check_int32(kernel, "pixels per plane H * W", H * W)
    check_int32(kernel, "patches per plane", g.grid_h * g.grid_w)


@on_tensor_device
def patch_stats(feat: torch.Tensor, patch: int, stride: int, pad_top: int, pad_left: int,
                grid_h: int, grid_w: int, *, config: StatsConfig | None = None):
    """mean, std: fp32 (B, C, grid_h * grid_w). Patch g = (i, j) covers rows
    [stride*i - pad_top, stride*i - pad_top + patch) of feat (zeros outside the map), cols
    likewise; std = sqrt(unbiased var + EPS). feat: contiguous (B, C, H, W) fp32/fp16/bf16.
    query grid: patch_stats(feat, *query_grid_args(H, W)); key blocks:
    patch_stats(feat, *key_grid_args(H, W, s))."""
    check_tensor("feat", feat, ("B", "C", "H", "W"))
    B, C, H, W = feat.shape
    g = PatchGrid(patch, stride, pad_top, pad_left, grid_h, grid_w)
    _check_grid("patch_stats", H, W, g)
    G = grid_h * grid_w
    mean = torch.empty(B, C, G, device=feat.device, dtype=torch.float32)
    std = torch.empty_like(mean)
    if mean.numel() == 0:
        return mean, std
    cfg = config or default_stats_config(patch)
    launch(_patch_stats_kernel, grid("patch_stats", triton.cdiv(G, cfg.block_g), C, B),
           feat, mean, std, H, W, pad_top, pad_left, grid_h, grid_w, PATCH=patch,
           STRIDE=stride, PP=triton.next_power_of_2(patch * patch), BLOCK_G=cfg.block_g,
           EPS=EPS, num_warps=cfg.num_warps)
    return mean, std


@on_tensor_device
def patch_stats_backward(feat: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                         grad_mean: torch.Tensor | None, grad_std: torch.Tensor | None,
                         patch: int, stride: int, pad_top: int, pad_left: int, grid_h: int,
                         grid_w: int, *, out: torch.Tensor | None = None,
                         config: StatsConfig | None = None) -> torch.Tensor:
    """grad_feat, fp32 (B, C, H, W), of patch_stats given grad_mean / grad_std (B, C, G)
    (None = zeros). With `out` (fp32, contiguous, feat's shape) the gradient is added into
    it in place and `out` is returned. Deterministic (a gather, no atomics)."""
    check_tensor("feat", feat, ("B", "C", "H", "W"))
    B, C, H, W = feat.shape
    g = PatchGrid(patch, stride, pad_top, pad_left, grid_h, grid_w)
    _check_grid("patch_stats_backward", H, W, g)
    shape = (B, C, grid_h * grid_w)
    zeros = None
    if grad_mean is None or grad_std is None:
        zeros = torch.zeros(shape, device=feat.device, dtype=torch.float32)
    mean, std = mean.float().contiguous(), std.float().contiguous()
    gm = zeros if grad_mean is None else grad_mean.float().contiguous()
    gs = zeros if grad_std is None else grad_std.float().contiguous()
    for name, t in (("mean", mean), ("std", std), ("grad_mean", gm), ("grad_std", gs)):
        check_tensor(name, t, shape, (torch.float32,))
    if out is None:
        res = torch.empty(B, C, H, W, device=feat.device, dtype=torch.float32)
    else:
        check_tensor("out", out, feat.shape, (torch.float32,))
        res = out
    if res.numel() == 0:
        return res
    cfg = config or default_stats_config(patch)
    launch(_patch_stats_bwd_kernel,
           grid("patch_stats_backward", triton.cdiv(H * W, cfg.block_p), C, B),
           feat, mean, std, gm, gs, res, H, W, pad_top, pad_left, grid_h, grid_w, PATCH=patch,
           STRIDE=stride, NSLOT=g.slots, BLOCK_P=cfg.block_p, ACCUMULATE=out is not None,
           num_warps=cfg.num_warps)
    return res


# --------------------------------------------------------------------------- AOT specs

# Default configs of the model's patch grids, every input dtype: the query patches (p, t)
# and the key blocks (p s, t s) of s = 2 and 3, each with its grid on a typical map (LR
# 192 x 192, divisible by s = 2 and 3), where aot_specs records the launches.
DEFAULT_CONFIGS = [
    {"dtype": dt, "patch": g.patch, "stride": g.stride, "grid": g,
     "config": default_stats_config(g.patch)}
    for dt in SUPPORTED
    for g in (query_grid_args(192, 192), key_grid_args(192, 192, 2), key_grid_args(192, 192, 3))
]


def aot_specs(configs=None):
    """(name, kernel, signature, constexprs, options) of both kernels as the launchers run
    them with each default config (its grid on an LR 192 x 192 map, C = 1), recorded on meta
    tensors; consumed by kernels.aot.compile_specs and tests/test_aot.py."""
    specs = []
    for c in configs or DEFAULT_CONFIGS:
        ty, p = TL_TYPES[c["dtype"]], c["patch"]
        feat = torch.empty(1, 1, 192, 192, dtype=c["dtype"], device="meta")
        with record_launches() as launches:
            mean, std = patch_stats(feat, *c["grid"], config=c["config"])
            patch_stats_backward(feat, mean, std, None, None, *c["grid"], config=c["config"],
                                 out=torch.empty(feat.shape, device="meta"))
        specs += [launch_spec(f"patch_stats_p{p}[{ty}]", launches, _patch_stats_kernel),
                  launch_spec(f"patch_stats_bwd_p{p}[{ty}]", launches, _patch_stats_bwd_kernel)]
    return specs
