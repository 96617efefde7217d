"""IGNN (EDSR + one graph aggregation block) and the EDSR baseline (spec section 7)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake

from .imresize import imresize
from .modules import (EDSR_RGB_MEAN, ConvChain, GraphAggregation, MeanShift, ResBlock,
                      VGGEmbedding, conv, conv_block)
from .profiling import name_stages

SCALES = (2, 3, 4)
_HR_BAND_BYTES = 128 << 20  # the largest map of one band of the inference HR stage
# Upper bounds on the model's size: 4x the paper's width (256) and 8x its depth (32), so a
# config from an untrusted file cannot ask for terabytes or for a billion modules.
MAX_FEATS = 1024
MAX_RESBLOCKS = 256
MAX_K = 64
MAX_PATCH = 15
MAX_WINDOW = 1024
# IGNN's stages for the profiling ranges (ignn_triton.profiling): {module: range name}. The
# glue between them (the mean shifts, the skip + x0) runs outside any range.
STAGES = {"vggnet": "ignn/embed", "head": "ignn/head", "body1": "ignn/body1",
          "fuse_b": "ignn/fuse", "body2": "ignn/body2", "upsample": "ignn/upsample",
          "fuse_up": "ignn/upsample", "tail": "ignn/tail"}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def config_problems(arch: str, config: dict) -> list[str]:
    """Everything wrong with a constructor config of IGNN or EDSR (unknown or missing keys,
    wrong types, values outside the model's limits); [] when it is valid. Checked before
    anything is allocated."""
    bounds = {"n_feats": (1, MAX_FEATS), "n_resblocks": (1, MAX_RESBLOCKS)}
    if arch == "IGNN":
        bounds.update(k=(1, MAX_K), patch_size=(1, MAX_PATCH), stride=(1, MAX_PATCH),
                      window=(1, MAX_WINDOW))
    known = {"scale", "res_scale", *bounds}
    problems = [f"unknown config key {key!r}" for key in sorted(set(config) - known)]
    problems += [f"config lacks {key!r}" for key in sorted(known - set(config))]
    if "scale" in config and (not _is_int(config["scale"]) or config["scale"] not in SCALES):
        problems.append(f"scale must be one of {SCALES}; got {config['scale']!r}")
    for key, (lo, hi) in bounds.items():
        if key in config and not (_is_int(config[key]) and lo <= config[key] <= hi):
            problems.append(f"{key} must be an integer in [{lo}, {hi}]; got {config[key]!r}")
    res_scale = config.get("res_scale", 1.0)
    if (not isinstance(res_scale, (int, float)) or isinstance(res_scale, bool)
            or not math.isfinite(res_scale) or not 0 < res_scale <= 10):
        problems.append(f"res_scale must be a number in (0, 10]; got {res_scale!r}")
    if problems or arch != "IGNN":
        return problems
    if config["n_resblocks"] % 2:
        problems.append(f"n_resblocks must be even (two halves around the graph "
                        f"aggregation); got {config['n_resblocks']}")
    if config["stride"] > config["patch_size"]:
        problems.append(f"stride must be <= patch_size (patches must cover the image); got "
                        f"stride {config['stride']}, patch_size {config['patch_size']}")
    if config["window"] ** 2 < config["k"]:
        problems.append(f"a {config['window']}x{config['window']} window holds fewer than "
                        f"k = {config['k']} candidates")
    return problems


def _check_config(arch: str, config: dict) -> None:
    problems = config_problems(arch, config)
    if problems:
        raise ValueError(f"invalid {arch} config: " + "; ".join(problems))


def graph_scale(scale: int) -> int:
    """The internal GA scale s: 2 for x4, else the model scale (spec notation)."""
    return 2 if scale == 4 else scale


def check_image(x: torch.Tensor, name: str = "x") -> None:
    """Raise a ValueError unless x is a (B, 3, H, W) float tensor in [0, 1]."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be (B, 3, H, W) float RGB in [0, 1]; got {got}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be (B, 3, H, W) float RGB in [0, 1]; got dtype {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name} must be (B, 3, H, W) with B, H, W >= 1; got {tuple(x.shape)}")
    if not torch.compiler.is_compiling() and not is_fake(x):  # values: not under tracing
        lo, hi = torch.aminmax(x.detach())
        if not (torch.isfinite(lo) and torch.isfinite(hi)):
            raise ValueError(f"{name} holds NaN or inf values")
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(f"{name} must be RGB in [0, 1]; got values in "
                             f"[{lo.item():.4g}, {hi.item():.4g}] (divide 8-bit images by 255)")


def _reflect_pad(x: torch.Tensor, bottom: int, right: int) -> torch.Tensor:
    """Reflect-pad at the bottom/right by any amount (repeated reflections; replicate for
    a single row or column, which has nothing to reflect)."""
    while bottom > 0 or right > 0:
        h, w = x.shape[-2:]
        db = min(bottom, h - 1) if h > 1 else 0
        dr = min(right, w - 1) if w > 1 else 0
        if db == 0 and dr == 0:
            return F.pad(x, (0, right, 0, bottom), mode="replicate")
        x = F.pad(x, (0, dr, 0, db), mode="reflect")
        bottom, right = bottom - db, right - dr
    return x


class IGNN(nn.Module):
    """Cross-scale internal graph neural network for image super-resolution.

    forward(x, x_son=None): x (B, 3, H, W) RGB in [0, 1], any H, W >= 1 -> (B, 3, S*H, S*W).
    x_son, the LR image downscaled by s (S = 4 -> s = 2, else s = S), defaults to
    `imresize(x, 1/s)` clamped to [0, 1]. Inputs whose size the graph aggregation cannot
    take (H, W not divisible by s, or LR/s smaller than a patch) are reflect-padded at the
    bottom/right and the output is cropped back.
    """

    def __init__(self, scale: int = 4, n_feats: int = 256, n_resblocks: int = 32,
                 res_scale: float = 0.1, k: int = 5, patch_size: int = 3, stride: int = 2,
                 window: int = 30):
        super().__init__()
        self.config = dict(scale=scale, n_feats=n_feats, n_resblocks=n_resblocks,
                           res_scale=res_scale, k=k, patch_size=patch_size, stride=stride,
                           window=window)
        _check_config("IGNN", self.config)
        self.scale = scale
        self.graph_scale = s = graph_scale(scale)
        self.patch_size = patch_size
        half = n_resblocks // 2
        C = n_feats
        self.sub_mean = MeanShift(255.0, EDSR_RGB_MEAN, sign=-1)  # works on 255 * x
        self.add_mean = MeanShift(255.0, EDSR_RGB_MEAN, sign=1)
        self.vggnet = VGGEmbedding()
        self.head = conv_block(3, C, 3)
        self.body1 = nn.Sequential(*[ResBlock(C, 3, res_scale) for _ in range(half)])
        self.gcn = GraphAggregation(C, s, k, patch_size, stride, window)
        self.fuse_b = ConvChain(conv_block(2 * C, C, 3, relu=True), conv_block(C, C, 3))
        self.body2 = nn.Sequential(*[ResBlock(C, 3, res_scale) for _ in range(half)],
                                   conv_block(C, C, 3))
        self.upsample = nn.Sequential(conv(C, C * s * s, 3), nn.PixelShuffle(s))
        self.fuse_up = ConvChain(conv_block(2 * C, C, 3, relu=True),
                                 conv_block(C, C, 3, relu=True))
        if scale == 4:
            self.tail = nn.Sequential(nn.Sequential(conv(C, 4 * C, 3), nn.PixelShuffle(2)),
                                      conv_block(C, 3, 3))
        else:  # the released code wraps even this single conv: keys `tail.0.0.*`
            self.tail = nn.Sequential(conv_block(C, 3, 3))
        self._register_load_state_dict_pre_hook(drop_embedcnn_alias)
        name_stages(self, STAGES)

    def valid_size(self, h: int, w: int) -> tuple[int, int]:
        """The smallest (H', W') >= (h, w) the graph aggregation accepts: divisible by s,
        with a son grid of at least ceil(sqrt(k)) patches a side, so every query has k
        candidates."""
        s = self.graph_scale
        side = math.isqrt(self.gcn.k - 1) + 1  # ceil(sqrt(k))
        least = s * (self.patch_size + self.gcn.stride * (side - 1))
        return max(-(-h // s) * s, least), max(-(-w // s) * s, least)

    def forward(self, x: torch.Tensor, x_son: torch.Tensor | None = None) -> torch.Tensor:
        check_image(x)
        H, W = x.shape[-2:]
        x, x_son = self._graph_inputs(x, x_son)
        ye, xe = self.vggnet(x), self.vggnet(x_son)  # (B, 64, H, W), (B, 64, H/s, W/s)
        x0 = self.head(self.sub_mean(255.0 * x))
        del x, x_son
        x1 = self.body1(x0)
        x1_lr, x1_hr = self.gcn(x1, ye, xe)  # (B, C, H, W), (B, C, sH, sW)
        del ye, xe
        x1 = self.fuse_b(x1, x1_lr)
        del x1_lr
        x2 = self.body2(x1) + x0
        del x0, x1
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            y = self._hr_stage(x2, x1_hr)
        else:
            y = self._hr_stage_banded(x2, x1_hr)
        return y[..., : self.scale * H, : self.scale * W]

    def _graph_inputs(self, x: torch.Tensor, x_son: torch.Tensor | None):
        """x reflect-padded to valid_size, and its son x_son (B, 3, H/s, W/s): checked when
        given, else imresize(x, 1/s) clamped to [0, 1]."""
        s = self.graph_scale
        B, _, H, W = x.shape
        Hp, Wp = self.valid_size(H, W)
        if x_son is None:
            x = _reflect_pad(x, Hp - H, Wp - W)
            return x, imresize(x, size=(Hp // s, Wp // s)).clamp(0, 1)
        check_image(x_son, "x_son")
        if (Hp, Wp) != (H, W):
            raise ValueError(f"x_son can only be given with an input of a valid size; "
                             f"x {tuple(x.shape)} would need padding to {(Hp, Wp)}")
        if tuple(x_son.shape) != (B, 3, H // s, W // s):
            raise ValueError(f"x_son must be (B, 3, H/s, W/s) = {(B, 3, H // s, W // s)} "
                             f"for s = {s}; got {tuple(x_son.shape)}")
        return x, x_son

    def _hr_stage(self, x2: torch.Tensor, x1_hr: torch.Tensor) -> torch.Tensor:
        """upsample, fuse_up, tail: x2 (B, C, H, W), x1_hr (B, C, sH, sW) -> (B, 3, SH, SW)."""
        u = self.fuse_up(self.upsample(x2), x1_hr)
        return self.add_mean(self.tail(u)) / 255.0

    def hr_halo(self) -> int:
        """LR rows of x2 beyond a band that the HR stage's rows in the band depend on: 1 for
        the upsampler's 3x3 conv, then 3x3 convs at scale s (fuse_up: 2; a x4 tail: 1) and
        at scale S (a x4 tail: 1), each a row at its own scale."""
        s, S = self.graph_scale, self.scale
        return 1 + math.ceil(2 / s + (1 / s + 1 / S if S == 4 else 1 / s))

    def _band_rows(self, batch: int, width: int, element_size: int) -> int:
        """LR rows per band of the inference HR stage: its largest map, (B, 4C, s rows, sW)
        per LR row, stays under _HR_BAND_BYTES; at least 16 rows (the halo's cost)."""
        s, C = self.graph_scale, self.config["n_feats"]
        return max(16, _HR_BAND_BYTES // (batch * 4 * C * s * s * width * element_size))

    def progress_steps(self, height: int, width: int, element_size: int = 4) -> dict[str, int]:
        """How many times each top-level stage module runs in one inference forward of a
        (1, 3, height, width) image: {module name: calls}, for progress bars."""
        Hp, Wp = self.valid_size(height, width)
        bands = -(-Hp // self._band_rows(1, Wp, element_size))
        return {"vggnet": 2, "head": 1, "body1": 1, "gcn": 1, "fuse_b": 1, "body2": 1,
                "tail": bands}

    def _hr_stage_banded(self, x2: torch.Tensor, x1_hr: torch.Tensor) -> torch.Tensor:
        """_hr_stage in bands of LR rows, each computed with hr_halo() rows of context on
        either side (or the map's own zero padding at its edges) and cropped: the same
        values as the whole map (bit-identical on the CPU: every output row sees the same
        inputs through the same convolutions), in a band's memory instead of the
        (B, 4C, sH, sW) and (B, C, SH, SW) maps of the whole image. Inference only."""
        B, C, H, W = x2.shape
        s, S, halo = self.graph_scale, self.scale, self.hr_halo()
        rows = self._band_rows(B, W, x2.element_size())
        if rows >= H:
            return self._hr_stage(x2, x1_hr)
        y = None
        for r0 in range(0, H, rows):
            r1 = min(H, r0 + rows)
            a0, a1 = max(0, r0 - halo), min(H, r1 + halo)
            band = self._hr_stage(x2[:, :, a0:a1], x1_hr[:, :, s * a0: s * a1])
            if y is None:  # (B, 3, SH, SW) in the band's dtype
                y = band.new_empty(B, 3, S * H, S * W)
            y[:, :, S * r0: S * r1] = band[:, :, S * (r0 - a0): S * (r1 - a0)]
        return y


def drop_embedcnn_alias(state_dict, prefix, *args):
    """Released checkpoints repeat the VGG weights as `graph.embedcnn.*`: keep one copy."""
    alias = prefix + "graph.embedcnn."
    for key in [key for key in state_dict if key.startswith(alias)]:
        own = prefix + "vggnet." + key[len(alias):]
        value = state_dict.pop(key)
        state_dict.setdefault(own, value)


class EDSR(nn.Module):
    """EDSR with the official EDSR-PyTorch key names (`sub_mean`, `head`, `body`, `tail`,
    `add_mean`): x (B, 3, H, W) RGB in [0, 1] -> (B, 3, S*H, S*W)."""

    def __init__(self, scale: int = 4, n_feats: int = 256, n_resblocks: int = 32,
                 res_scale: float = 0.1):
        super().__init__()
        self.config = dict(scale=scale, n_feats=n_feats, n_resblocks=n_resblocks,
                           res_scale=res_scale)
        _check_config("EDSR", self.config)
        self.scale = scale
        C = n_feats
        self.sub_mean = MeanShift(255.0, EDSR_RGB_MEAN, sign=-1)  # works on 255 * x
        self.add_mean = MeanShift(255.0, EDSR_RGB_MEAN, sign=1)
        self.head = nn.Sequential(conv(3, C, 3))
        self.body = nn.Sequential(*[ResBlock(C, 3, res_scale) for _ in range(n_resblocks)],
                                  conv(C, C, 3))
        if scale == 3:
            upsampler = [conv(C, 9 * C, 3), nn.PixelShuffle(3)]
        else:
            upsampler = [layer for _ in range(scale // 2)
                         for layer in (conv(C, 4 * C, 3), nn.PixelShuffle(2))]
        self.tail = nn.Sequential(nn.Sequential(*upsampler), conv(C, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image(x)
        x = self.head(self.sub_mean(255.0 * x))
        return self.add_mean(self.tail(self.body(x) + x)) / 255.0
