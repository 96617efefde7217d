"""Building blocks of IGNN and EDSR, named like the released code so checkpoints load as is."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch._subclasses.fake_tensor import is_fake

from . import ops
from .geometry import estimate_starts, even_step
from .profiling import stage

EDSR_RGB_MEAN = (0.4488, 0.4371, 0.4040)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def conv(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> nn.Conv2d:
    """The 'same'-padded convolution with bias used everywhere in EDSR and IGNN."""
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2)


def conv_block(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
               relu: bool = False) -> nn.Sequential:
    """conv [+ ReLU] wrapped in a Sequential: the released 'BasicBlock' (keys `<name>.0.*`)."""
    layers = [conv(in_channels, out_channels, kernel_size, stride)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


_CPU_CONV_BAND_ELEMENTS = 1 << 19  # output elements per band of a ConvChain layer on the CPU
_CPU_CONV_WHOLE_ELEMENTS = 1 << 20  # and up to which its output is made whole (cache-sized)


def _cpu_inference(x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling())


def _out_rows(conv: nn.Conv2d, rows: int) -> int:
    return (rows + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1


def _conv_bands(conv: nn.Conv2d, inputs: tuple[torch.Tensor, ...], relu: bool):
    """relu?(conv(cat(inputs, 1))) in bands of output rows: yields (r0, r1, rows r0 .. r1 - 1
    of the output), each computed from its own rows of the inputs (concatenated per band).
    oneDNN reorders a convolution's input and output to its blocked layout; a band's stay
    in cache where a whole map's do not. The bands at the map's top and bottom take the
    convolution's own zero padding (and drop the rows it makes beyond the band), the
    others none. An output of up to _CPU_CONV_WHOLE_ELEMENTS is one band: it fits in cache,
    and bands would cost a copy of each one's input and output. The values are the
    whole-map convolution's (bit for bit where oneDNN picks the same kernel for a band's
    shape as for the map's, as at the model's sizes)."""
    x = inputs[0]
    B, _, H, W = x.shape
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    Ho, Wo = _out_rows(conv, H), (W + 2 * pw - kw) // sw + 1
    rows = max(1, _CPU_CONV_BAND_ELEMENTS // (B * conv.out_channels * Wo))
    if rows >= Ho or B * conv.out_channels * Ho * Wo <= _CPU_CONV_WHOLE_ELEMENTS:
        y = conv(torch.cat(inputs, 1) if len(inputs) > 1 else x)
        yield 0, Ho, y.relu_() if relu else y
        return
    rows = even_step(Ho, rows)
    lead = -(-ph // sh)  # output rows of a bottom band above its first, to align its padding
    starts = range(0, Ho, rows)
    if is_fake(x):  # a memory estimate
        starts = estimate_starts(starts)
    for r0 in starts:
        r1 = min(Ho, r0 + rows)
        a0, a1 = sh * r0 - ph, sh * (r1 - 1) - ph + kh  # input rows [a0, a1), maybe outside
        if a0 < 0:  # output row j of the band is row j of the map
            a0, a1, first, pad = 0, min(H, a1), r0, ph
        elif a1 > H:  # row j is row r0 - lead + j
            a0, a1, first, pad = sh * (r0 - lead), H, lead, ph
        else:
            first, pad = 0, 0
        band = [t[:, :, a0:a1] for t in inputs]
        band = torch.cat(band, 1) if len(band) > 1 else band[0]
        y = F.conv2d(band, conv.weight, conv.bias, conv.stride, (pad, pw))
        y = y[:, :, first: first + r1 - r0]
        yield r0, r1, y.relu_() if relu else y


def _banded_conv(conv: nn.Conv2d, inputs: tuple[torch.Tensor, ...], relu: bool) -> torch.Tensor:
    """relu?(conv(cat(inputs, 1))) computed in bands (_conv_bands), into one output map."""
    rows, out = _out_rows(conv, inputs[0].shape[2]), None
    for r0, r1, y in _conv_bands(conv, inputs, relu):
        if r1 - r0 == rows:
            return y
        if out is None:
            out = y.new_empty(y.shape[0], y.shape[1], rows, y.shape[3])
        out[:, :, r0:r1] = y
    return out


class ConvChain(nn.Sequential):
    """Convolutions, each optionally followed by a ReLU (flat, or in conv_blocks), applied
    to the channel concatenation of the inputs: forward(*inputs) is the Sequential on
    cat(inputs, 1). In CPU inference each convolution runs in bands of rows (_conv_bands)
    and the concatenation is made a band at a time, never as a whole map."""

    def _conv_relus(self) -> list[tuple[nn.Conv2d, bool]]:
        layers = [m for m in self.modules() if isinstance(m, (nn.Conv2d, nn.ReLU))]
        return [(m, i + 1 < len(layers) and isinstance(layers[i + 1], nn.ReLU))
                for i, m in enumerate(layers) if isinstance(m, nn.Conv2d)]

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if not _cpu_inference(inputs[0]):
            return super().forward(torch.cat(inputs, 1) if len(inputs) > 1 else inputs[0])
        for conv, relu in self._conv_relus():
            inputs = (_banded_conv(conv, inputs, relu),)
        return inputs[0]

    def add_weighted(self, total: torch.Tensor | None, weight: torch.Tensor,
                     *inputs: torch.Tensor) -> torch.Tensor:
        """total + weight * self(*inputs) (weight * self(*inputs) if total is None), in CPU
        inference: the last convolution's bands are weighted and added into `total` as they
        come, so its output is never a whole map (the same ops, elementwise, as the
        expression)."""
        *layers, (conv, relu) = self._conv_relus()
        for layer, layer_relu in layers:
            inputs = (_banded_conv(layer, inputs, layer_relu),)
        fresh = total is None
        for r0, r1, y in _conv_bands(conv, inputs, relu):
            if total is None:
                total = y.new_empty(y.shape[0], y.shape[1],
                                    _out_rows(conv, inputs[0].shape[2]), y.shape[3])
            w, band = weight[:, :, r0:r1], total[:, :, r0:r1]
            if fresh:
                torch.mul(w, y, out=band)
            else:
                band += w * y
        return total


class MeanShift(nn.Conv2d):
    """A frozen 1x1 convolution: sign * rgb_range * mean is added, then divided by std, per
    channel (EDSR's MeanShift; weight diag(1/std), bias sign * rgb_range * mean / std)."""

    def __init__(self, rgb_range: float, mean, std=(1.0, 1.0, 1.0), sign: int = -1):
        super().__init__(3, 3, 1)
        std_t = torch.tensor(std)
        self.weight.data = torch.diag(1.0 / std_t).view(3, 3, 1, 1)
        self.bias.data = sign * rgb_range * torch.tensor(mean) / std_t
        self.requires_grad_(False)


class ResBlock(nn.Module):
    """conv, ReLU, conv, times res_scale, plus the input (keys `body.0`, `body.2`)."""

    def __init__(self, channels: int, kernel_size: int = 3, res_scale: float = 1.0):
        super().__init__()
        self.body = nn.Sequential(conv(channels, channels, kernel_size), nn.ReLU(inplace=True),
                                  conv(channels, channels, kernel_size))
        self.res_scale = res_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) * self.res_scale


class VGGEmbedding(nn.Module):
    """VGG19 relu1_2 on ImageNet-normalised RGB in [0, 1]: the frozen 64-channel embedding
    used for matching (spec section 1). Keys `sub_mean.*`, `model.{0,2}.*`."""

    def __init__(self):
        super().__init__()
        self.sub_mean = MeanShift(1.0, IMAGENET_MEAN, IMAGENET_STD)
        self.model = ConvChain(conv(3, 64, 3), nn.ReLU(inplace=True), conv(64, 64, 3),
                               nn.ReLU(inplace=True))
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.sub_mean(x))


_CPU_BAND_ELEMENTS = 1 << 19  # elements per band of a pointwise net on the CPU (2 MiB fp32)


def _band_rows(x: torch.Tensor) -> int:
    """Rows of x (B, C, H, W) per band of _banded."""
    return max(1, _CPU_BAND_ELEMENTS // max(1, x.shape[0] * x.shape[1] * x.shape[3]))


def _banded(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """net(x) for a net of 1x1 convolutions and pointwise ops (the ECN): on the CPU, in bands
    of rows, so that every intermediate stays in cache and its buffer is reused instead of a
    fresh map per op (measured: 64 channels at 1024 x 1024, 1.3 s -> 0.53 s, bit-identical).
    Whole on other devices and under torch.compile (which fuses the pointwise ops)."""
    rows = _band_rows(x)
    if x.device.type != "cpu" or torch.compiler.is_compiling() or rows >= x.shape[2]:
        return net(x)
    return torch.cat([net(x[:, :, r: r + rows]) for r in range(0, x.shape[2], rows)], 2)


def edge_conditioned_net(channels: int = 64) -> nn.Sequential:
    """ECN (spec section 5): conv1x1, ResBlock of 1x1 convs (x0.1), conv1x1 to one logit."""
    return nn.Sequential(conv_block(channels, channels, 1), ResBlock(channels, 1, 0.1),
                         conv_block(channels, 1, 1))


class GraphAggregation(nn.Module):
    """Cross-scale graph aggregation (spec sections 3-6): matches every LR query patch to
    its k nearest son patches, aggregates the AdaPN-normalised s-times larger blocks of F
    with edge-conditioned weights, at HR (x1_hr) and, through the DEN, at LR (x1_lr).

    Ranks are processed one at a time (edge maps, ECN, DEN input), so inference memory
    does not grow with k beyond the (B, k, ...) logits. In training, autograd keeps every
    rank's activations for the backward pass (a (B, C, sH, sW) DEN input and 64-channel
    HR edge maps per rank); with `checkpoint = True` each rank's edge maps + ECN and
    aggregation + DEN are recomputed in the backward pass instead, so training memory does
    not grow with k either, for one more forward pass of those stages.
    """

    def __init__(self, n_feats: int, scale: int, k: int = 5, patch_size: int = 3,
                 stride: int = 2, window: int = 30, embed_channels: int = 64,
                 checkpoint: bool = False):
        super().__init__()
        self.scale, self.k, self.patch, self.stride, self.window = scale, k, patch_size, stride, window
        self.checkpoint = checkpoint
        self.knn_downsample = ConvChain(  # DEN: HR -> LR, shared over ranks
            conv_block(n_feats, n_feats, 5, stride=scale, relu=True),
            conv_block(n_feats, n_feats, 3, relu=True),
            conv_block(n_feats, n_feats, 3))
        self.weightnet_lr = edge_conditioned_net(embed_channels)
        self.weightnet_hr = edge_conditioned_net(embed_channels)

    def _per_rank(self, fn, *args):
        """fn(*args); with self.checkpoint and autograd recording, its activations are
        recomputed in the backward pass rather than kept."""
        if self.checkpoint and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def _rank_logits(self, diff_r: torch.Tensor, lr_hw: tuple[int, int], dtype: torch.dtype):
        """One rank's ECN logits, HR and LR, both (B, 1, H, W): diff_r (B, M, 1, E). The HR
        edge map D_hr is the LR one upsampled s times (ops.edge_maps) and the ECN is
        pointwise, so its HR logits are computed once per LR pixel and upsampled later."""
        with stage("ignn/edges"):
            edges = ops.edge_maps(diff_r, lr_hw, self.patch, self.stride)[:, 0].to(dtype)
        with stage("ignn/ecn") as st:
            return st.outputs(_banded(self.weightnet_hr, edges), _banded(self.weightnet_lr, edges))

    def _aggregate_rank(self, feat, idx_r, query, key, out=None) -> torch.Tensor:
        """One rank's knn_hr (B, C, sH, sW), written into `out` (B, 1, C, sH, sW) if given."""
        with stage("ignn/aggregate") as st:
            inputs = st.inputs(feat, idx_r, query, key)
            return st.outputs(ops.patch_aggregate(*inputs, self.scale, self.patch,
                                                  self.stride, out=out)[:, 0])

    def _den(self, knn_hr: torch.Tensor, w_r: torch.Tensor) -> torch.Tensor:
        """w_r * DEN(knn_hr): one rank's weighted LR contribution (B, C, H, W)."""
        with stage("ignn/den") as st:
            w_r, knn_hr = st.inputs(w_r, knn_hr)
            return st.outputs(w_r.to(knn_hr.dtype) * self.knn_downsample(knn_hr))

    def _rank_den(self, feat, idx_r, query, key, w_r):
        """One rank's weighted DEN output (B, C, H, W); its knn_hr lives only inside."""
        return self._den(self._aggregate_rank(feat, idx_r, query, key), w_r)

    def forward(self, feat: torch.Tensor, ye: torch.Tensor, xe: torch.Tensor):
        s, p, t = self.scale, self.patch, self.stride
        H, W = feat.shape[-2:]  # feat (B, C, H, W)
        with stage("ignn/knn"):
            _, idx = ops.patch_knn(ye, xe, self.k, s, self.window, p, t)  # (B, M, k)
        with stage("ignn/edges"):
            diff = ops.edge_features(ye, xe, idx, s, p, t)  # (B, M, k, E)
        ranks = []  # a loop, not a comprehension: Dynamo cannot `del` a closure's variable
        for r in range(self.k):
            ranks.append(self._per_rank(self._rank_logits, diff[:, :, r:r + 1], (H, W),
                                        feat.dtype))
        del diff
        with stage("ignn/ecn") as st:
            logits_hr = torch.cat([hr for hr, _ in ranks], 1)  # (B, k, H, W), per s x s HR block
            w_lr = torch.softmax(torch.cat([lr for _, lr in ranks], 1).float(), 1)  # (B, k, H, W)
            logits_hr, w_lr = st.outputs(logits_hr, w_lr)
        del ranks
        with stage("ignn/stats") as st:
            feat_in = st.inputs(feat)
            query = ops.query_stats(feat_in, p, t)  # (B, C, M) each
            key = ops.key_stats(feat_in, s, p, t)  # (B, C, N) each
            query, key = st.outputs(query, key)
        logits_hr = F.interpolate(logits_hr, scale_factor=s, mode="nearest")  # (B, k, sH, sW)
        if _cpu_inference(feat) and feat.dtype in (torch.float32, torch.float64):
            return self._ranks_once(feat, idx, query, key, logits_hr, w_lr)
        with stage("ignn/aggregate") as st:
            *inputs, logits_hr = st.inputs(feat, idx, query, key, logits_hr)
            x1_hr = st.outputs(ops.patch_aggregate(*inputs, s, p, t, logits=logits_hr))
        x1_lr = 0
        for r in range(self.k):  # one rank at a time: the DEN input is (B, C, sH, sW)
            x1_lr = x1_lr + self._per_rank(self._rank_den, feat, idx[:, :, r:r + 1], query,
                                           key, w_lr[:, r:r + 1])
        return x1_lr, x1_hr

    def _ranks_once(self, feat, idx, query, key, logits_hr, w_lr):
        """(x1_lr, x1_hr) with each rank's knn_hr aggregated once and used twice: weighted
        into x1_hr and through the DEN into x1_lr. For CPU inference in fp32 / fp64: half
        the aggregation work of the fused x1_hr op plus the DEN's own aggregations, the same
        sums in the same rank order (bit-identical to it). Elsewhere the fused op keeps
        training memory free of knn_hr, accumulates 16-bit F's ranks unrounded, and is the
        GPU path measured on a GPU."""
        w_hr = torch.softmax(logits_hr.to(feat.dtype), 1)  # (B, k, sH, sW), as the fused op
        x1_hr, x1_lr = 0, None
        for r in range(self.k):  # every rank's knn_hr in the first one's memory
            knn_hr = self._aggregate_rank(feat, idx[:, :, r:r + 1], query, key,
                                          out=None if r == 0 else knn_hr.unsqueeze(1))
            with stage("ignn/aggregate"):  # rank 0 needs no zeroed map: 0 + a * b == a * b
                x1_hr = (knn_hr * w_hr[:, :1] if r == 0
                         else x1_hr.addcmul_(knn_hr, w_hr[:, r:r + 1]))
            with stage("ignn/den"):  # x1_lr + w * DEN(knn_hr), a band at a time
                x1_lr = self.knn_downsample.add_weighted(x1_lr, w_lr[:, r:r + 1].to(knn_hr.dtype),
                                                         knn_hr)
        return x1_lr, x1_hr
