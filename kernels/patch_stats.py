"""AdaPN patch statistics: per (b, c, patch) mean and sqrt(unbiased var + 1e-5) over the p x p patches (stride t) of zero-padded F, and their backward (a gather, deterministic).
Forward: reads ~(p/t)^2 |F| through L1/L2 (|F| from DRAM), writes 8*B*C*G bytes; ~4*B*C*G*p^2 FLOPs. Backward: reads |F| + 16*B*C*G bytes, writes 4|F|/elem bytes; ~8*B*C*H*W*ceil(p/t)^2 FLOPs.
Must match reference.graph.query_stats (p=3, t=2, query padding) and reference.graph.key_stats (p=3s, t=2s, s x son padding) (spec sections 2 and 6).

Design
------
* One kernel serves both patch grids: patch, stride, padding and grid size are arguments
  (patch and stride constexpr). `query_grid_args` / `key_grid_args` give them from
  ignn_triton.geometry.graph_geometry.
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

from ..geometry import graph_geometry
from .utils import SUPPORTED, TL_TYPES, check_int32, grid, on_tensor_device

__all__ = ["StatsConfig", "patch_stats", "patch_stats_backward", "query_grid_args",
           "key_grid_args", "default_stats_config", "DEFAULT_CONFIGS", "aot_specs"]

EPS = 1e-5  # added to the unbiased variance (spec section 6)


# --------------------------------------------------------------------------- configs

@dataclass(frozen=True)
class StatsConfig:
    """block_g: patches per forward program (None: ~2048 // PP taps per program);
    block_p: pixels per backward program. Powers of two."""

    block_g: int | None = None
    block_p: int = 256
    num_warps: int = 4


def default_stats_config(patch: int) -> StatsConfig:
    pp = triton.next_power_of_2(patch * patch)
    return StatsConfig(block_g=max(8, 2048 // pp), block_p=256, num_warps=4)


def query_grid_args(height: int, width: int, patch: int = 3, stride: int = 2) -> tuple:
    """(patch, stride, pad_top, pad_left, grid_h, grid_w) of the query grid of an LR map."""
    geo = graph_geometry(height, width, 1, patch, stride)
    return (patch, stride, geo.query_h.pad_before, geo.query_w.pad_before, geo.m1, geo.m2)


def key_grid_args(height: int, width: int, scale: int, patch: int = 3, stride: int = 2) -> tuple:
    """(patch*s, stride*s, s*son pad_top, s*son pad_left, n1, n2): the key blocks of F."""
    geo = graph_geometry(height, width, scale, patch, stride)
    return (geo.hr_patch, geo.hr_stride, scale * geo.son_h.pad_before,
            scale * geo.son_w.pad_before, geo.n1, geo.n2)


# --------------------------------------------------------------------------- kernels

@triton.jit
def _patch_stats_kernel(x_ptr, mean_ptr, std_ptr, H, W, pad_top, pad_left, gh, gw,
                        PATCH: tl.constexpr, STRIDE: tl.constexpr, PP: tl.constexpr,
                        BLOCK_G: tl.constexpr):
    """mean/std (B*C, gh*gw) fp32 of the PATCH x PATCH patches (stride STRIDE) of the
    zero-padded planes x (B*C, H, W). Program (tile, c, b) = BLOCK_G patches of plane
    b * C + c (C = the grid's axis 1)."""
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
    std = tl.sqrt_rn(var + 1e-5)
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

def _check_feat(feat: torch.Tensor) -> None:
    assert feat.dim() == 4, f"feat must be (B, C, H, W); got {tuple(feat.shape)}"
    assert feat.dtype in SUPPORTED, f"feat: fp32, fp16 or bf16 only; got {feat.dtype}"
    assert feat.is_contiguous(), "feat must be contiguous (NCHW)"


def _check_grid(kernel, H, W, patch, stride, pad_top, pad_left, grid_h, grid_w) -> None:
    """Also the sizes the kernels support: any B and C (plane offsets are int64), planes
    and patch grids of fewer than 2^31 pixels and patches (int32 within a plane)."""
    assert patch >= 2 and stride >= 1, (patch, stride)
    assert 0 <= pad_top and 0 <= pad_left, (pad_top, pad_left)
    assert grid_h >= 1 and grid_w >= 1, (grid_h, grid_w)
    check_int32(kernel, "pixels per plane H * W", H * W)
    check_int32(kernel, "patches per plane", grid_h * grid_w)


@on_tensor_device
def patch_stats(feat: torch.Tensor, patch: int, stride: int, pad_top: int, pad_left: int,
                grid_h: int, grid_w: int, *, config: StatsConfig | None = None):
    """mean, std: fp32 (B, C, grid_h * grid_w). Patch g = (i, j) covers rows
    [stride*i - pad_top, stride*i - pad_top + patch) of feat (zeros outside the map), cols
    likewise; std = sqrt(unbiased var + 1e-5). feat: contiguous (B, C, H, W) fp32/fp16/bf16.
    query grid: patch_stats(feat, *query_grid_args(H, W)); key blocks:
    patch_stats(feat, *key_grid_args(H, W, s))."""
    _check_feat(feat)
    B, C, H, W = feat.shape
    _check_grid("patch_stats", H, W, patch, stride, pad_top, pad_left, grid_h, grid_w)
    G = grid_h * grid_w
    mean = torch.empty(B, C, G, device=feat.device, dtype=torch.float32)
    std = torch.empty_like(mean)
    if mean.numel() == 0:
        return mean, std
    cfg = config or default_stats_config(patch)
    block_g = cfg.block_g or default_stats_config(patch).block_g
    _patch_stats_kernel[grid("patch_stats", triton.cdiv(G, block_g), C, B)](
        feat, mean, std, H, W, pad_top, pad_left, grid_h, grid_w,
        PATCH=patch, STRIDE=stride, PP=triton.next_power_of_2(patch * patch), BLOCK_G=block_g,
        num_warps=cfg.num_warps)
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
    _check_feat(feat)
    B, C, H, W = feat.shape
    _check_grid("patch_stats_backward", H, W, patch, stride, pad_top, pad_left, grid_h, grid_w)
    G = grid_h * grid_w
    shape = (B, C, G)
    for name, t in (("mean", mean), ("std", std)):
        assert tuple(t.shape) == shape, f"{name} must be {shape}; got {tuple(t.shape)}"
    zeros = None
    if grad_mean is None or grad_std is None:
        zeros = torch.zeros(shape, device=feat.device, dtype=torch.float32)
    mean, std = mean.float().contiguous(), std.float().contiguous()
    gm = zeros if grad_mean is None else grad_mean.float().contiguous()
    gs = zeros if grad_std is None else grad_std.float().contiguous()
    assert tuple(gm.shape) == shape and tuple(gs.shape) == shape, "grad_mean/std must be (B, C, G)"
    if out is None:
        res = torch.empty(B, C, H, W, device=feat.device, dtype=torch.float32)
    else:
        assert out.dtype == torch.float32 and out.is_contiguous() and out.shape == feat.shape
        res = out
    if res.numel() == 0:
        return res
    cfg = config or default_stats_config(patch)
    _patch_stats_bwd_kernel[grid("patch_stats_backward", triton.cdiv(H * W, cfg.block_p), C, B)](
        feat, mean, std, gm, gs, res, H, W, pad_top, pad_left, grid_h, grid_w, PATCH=patch,
        STRIDE=stride, NSLOT=triton.cdiv(patch, stride), BLOCK_P=cfg.block_p,
        ACCUMULATE=out is not None, num_warps=cfg.num_warps)
    return res


# --------------------------------------------------------------------------- AOT specs

# Default configs for the model's geometries: query patches (3, 2) and key blocks (3s, 2s)
# for s = 2 and 3, every input dtype.
DEFAULT_CONFIGS = [
    {"dtype": dt, "patch": p, "stride": t, "config": default_stats_config(p)}
    for dt in SUPPORTED for (p, t) in ((3, 2), (6, 4), (9, 6))
]


def aot_specs(configs=None):
    """(name, kernel, signature, constexprs, options) of every kernel the launchers run with
    the default configs; consumed by kernels.aot.compile_specs and tests/test_aot.py."""
    specs = []
    for c in configs or DEFAULT_CONFIGS:
        ty, p, t, cfg = TL_TYPES[c["dtype"]], c["patch"], c["stride"], c["config"]
        ints = ("H", "W", "pad_top", "pad_left", "gh", "gw")
        # the JIT's view at a typical shape: an LR 192 x 192 map (divisible by s = 2 and 3)
        pads_and_sizes = (query_grid_args(192, 192) if p == 3 else
                          key_grid_args(192, 192, p // 3))[2:]
        opts = {"num_warps": cfg.num_warps,
                "jit_ints": dict(zip(ints, (192, 192, *pads_and_sizes)))}
        sig = {"x_ptr": f"*{ty}", "mean_ptr": "*fp32", "std_ptr": "*fp32"}
        sig.update({n: "i32" for n in ints})
        const = {"PATCH": p, "STRIDE": t, "PP": triton.next_power_of_2(p * p),
                 "BLOCK_G": cfg.block_g}
        sig.update({n: "constexpr" for n in const})
        specs.append((f"patch_stats_p{p}[{ty}]", _patch_stats_kernel, sig, const, opts))
        sig = {"x_ptr": f"*{ty}", "mean_ptr": "*fp32", "std_ptr": "*fp32", "gm_ptr": "*fp32",
               "gs_ptr": "*fp32", "out_ptr": "*fp32"}
        sig.update({n: "i32" for n in ints})
        const = {"PATCH": p, "STRIDE": t, "NSLOT": triton.cdiv(p, t), "BLOCK_P": cfg.block_p,
                 "ACCUMULATE": True}
        sig.update({n: "constexpr" for n in const})
        specs.append((f"patch_stats_bwd_p{p}[{ty}]", _patch_stats_bwd_kernel, sig, const,
                      opts))
    return specs
