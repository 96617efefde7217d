"""The graph-aggregation operations: the single dispatch point between modules and kernels.

Every public function here checks its inputs once and calls a torch.library custom op
(schema, fake implementation for meta/fake tensors and torch.compile, autograd), whose one
implementation picks a backend (`_use_triton`): the fused Triton kernels (kernels/) for
CUDA tensors in fp32 / fp16 / bf16 with triton installed, else the memory-efficient torch
backend (torch_backend.py). One choice point rather than torch.library's per-device
registration, so that the tests can send CPU tensors through the kernels under the Triton
interpreter (CI has no GPU). Neither path ever holds the (B, M, N)
distance matrix or the (B, M, 9*C*s^2, k) gathered tensor of the released code. Matching
outputs (dist, idx, diff, edge maps) carry no gradient; the statistics and the
aggregation are differentiable.

Both paths treat an idx entry outside [0, N) alike, without reading it or synchronising:
NaN wherever it is used (its edge features; the HR pixels of its query's patch in its
rank's knn_hr, and in x1_hr), and no contribution to any gradient but the logits'
(NaN at those pixels). Under torch.use_deterministic_algorithms(True) the aggregation's
backward on CUDA (fp32 atomics) is replaced by the torch backend (deterministic, slower).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import kernels
from . import torch_backend as backend
from .geometry import GraphGeometry, PatchGrid, graph_geometry

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _use_triton(*tensors: torch.Tensor) -> bool:
    """The Triton kernels take CUDA tensors in fp32 / fp16 / bf16; fp64 takes the torch
    backend."""
    return kernels.HAS_TRITON and all(t.is_cuda and t.dtype != torch.float64 for t in tensors
                                      if t.is_floating_point())


# --------------------------------------------------------------------------- checks

def _check_embeddings(ye: torch.Tensor, xe: torch.Tensor, scale: int) -> None:
    for name, t in (("ye", ye), ("xe", xe)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a (B, E, h, w) tensor; got {shape}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be float32, float16, bfloat16 or float64; got {t.dtype}")
    B, E, H, W = ye.shape
    expected = (B, E, H // scale, W // scale)
    if tuple(xe.shape) != expected or H % scale or W % scale:
        raise ValueError(f"xe must be the son embedding of ye (B, E, H/s, W/s) = {expected} "
                         f"with H, W divisible by s = {scale}; got ye {tuple(ye.shape)}, "
                         f"xe {tuple(xe.shape)}")
    if xe.dtype != ye.dtype or xe.device != ye.device:
        raise ValueError(f"ye and xe must share dtype and device; got {ye.dtype} on {ye.device} "
                         f"and {xe.dtype} on {xe.device}")


def _check_idx(idx: torch.Tensor, batch: int, geo: GraphGeometry) -> None:
    """Shape and dtype; the values are not checked (that would synchronise with the GPU):
    entries outside [0, N) give NaN (module docstring)."""
    if idx.dtype != torch.int64 or idx.dim() != 3 or idx.shape[:2] != (batch, geo.num_queries):
        raise ValueError(f"idx must be int64 (B, M, k) = ({batch}, {geo.num_queries}, k); "
                         f"got {idx.dtype} {tuple(idx.shape)}")


def _check_feat(feat: torch.Tensor) -> None:
    if not isinstance(feat, torch.Tensor) or feat.dim() != 4 or feat.dtype not in _FLOAT_DTYPES:
        got = f"{feat.dtype} {tuple(feat.shape)}" if isinstance(feat, torch.Tensor) else type(feat)
        raise ValueError(f"feat must be a float (B, C, H, W) tensor; got {got}")


def _geometry(x: torch.Tensor, scale: int, patch: int, stride: int,
              window: int = 30) -> GraphGeometry:
    return graph_geometry(x.shape[2], x.shape[3], scale, patch, stride, window)


# --------------------------------------------------------------------------- matching

@torch.library.custom_op("ignn::patch_knn", mutates_args=())
def _patch_knn(ye: torch.Tensor, xe: torch.Tensor, k: int, scale: int, window: int,
               patch: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    if _use_triton(ye, xe):
        return kernels.patch_knn(ye, xe, k, scale, window, patch, stride)
    return backend.patch_knn(ye, xe, k, _geometry(ye, scale, patch, stride, window))


@_patch_knn.register_fake
def _(ye, xe, k, scale, window, patch, stride):
    shape = (ye.shape[0], _geometry(ye, scale, patch, stride, window).num_queries, k)
    return ye.new_empty(shape, dtype=torch.float32), ye.new_empty(shape, dtype=torch.int64)


def patch_knn(ye: torch.Tensor, xe: torch.Tensor, k: int = 5, scale: int = 2, window: int = 30,
              patch: int = 3, stride: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest son patches of every query patch, inside its window (spec section 3).

    ye (B, E, H, W) LR embedding, xe (B, E, H/s, W/s) son embedding. Returns dist (B, M, k)
    float32 ascending and idx (B, M, k) int64 flat son indices; ties go to the smaller
    index; a NaN distance ranks after every number (+inf included) and stays NaN in dist.
    """
    _check_embeddings(ye, xe, scale)
    geo = _geometry(ye, scale, patch, stride, window)
    if not 1 <= k <= geo.num_candidates:
        raise ValueError(f"k must be in [1, wh*ww] = [1, {geo.num_candidates}] for a "
                         f"{geo.window_h}x{geo.window_w} window; got k = {k}")
    return _patch_knn(ye.detach().contiguous(), xe.detach().contiguous(), k, scale, window,
                      patch, stride)


@torch.library.custom_op("ignn::edge_features", mutates_args=())
def _edge_features(ye: torch.Tensor, xe: torch.Tensor, idx: torch.Tensor, scale: int,
                   patch: int, stride: int) -> torch.Tensor:
    if _use_triton(ye, xe, idx):
        return kernels.edge_features(ye, xe, idx, patch, stride)
    return backend.edge_features(ye, xe, idx, _geometry(ye, scale, patch, stride))


@_edge_features.register_fake
def _(ye, xe, idx, scale, patch, stride):
    return ye.new_empty((*idx.shape, ye.shape[1]))


def edge_features(ye: torch.Tensor, xe: torch.Tensor, idx: torch.Tensor, scale: int = 2,
                  patch: int = 3, stride: int = 2) -> torch.Tensor:
    """diff (B, M, k, E): per channel, sum over patch positions of |query - neighbour|;
    NaN for an idx entry outside [0, N)."""
    _check_embeddings(ye, xe, scale)
    _check_idx(idx, ye.shape[0], _geometry(ye, scale, patch, stride))
    return _edge_features(ye.detach().contiguous(), xe.detach().contiguous(), idx.contiguous(),
                          scale, patch, stride)


# --------------------------------------------------------------------------- edge maps

def edge_maps(diff: torch.Tensor, lr_hw: tuple[int, int], patch: int = 3,
              stride: int = 2) -> torch.Tensor:
    """D_lr (B, k, E, H, W): every query's edge features spread over its LR patch with
    overlap averaging. Detached. It is the spec's D_lr = avg_pool(D_hr, s) (up to rounding)
    and D_hr is it upsampled s times (nearest): the HR patch of query i covers HR rows
    [s t i, s (t i + p)), the s-row groups of its LR rows, so an HR pixel is covered by
    exactly the queries whose LR patches cover its LR pixel (fold_edges)."""
    geo = graph_geometry(lr_hw[0], lr_hw[1], 1, patch, stride)
    if diff.dim() != 4 or diff.shape[1] != geo.num_queries:
        raise ValueError(f"diff must be (B, M, k, E) with M = {geo.num_queries}; "
                         f"got {tuple(diff.shape)}")
    B, M, k, E = diff.shape
    grid = diff.detach().permute(0, 2, 3, 1).reshape(B, k * E, geo.m1, geo.m2)
    return backend.fold_constant(grid, geo).view(B, k, E, *lr_hw)


def fold_edges(diff: torch.Tensor, lr_hw: tuple[int, int], scale: int = 2, patch: int = 3,
               stride: int = 2) -> torch.Tensor:
    """D_hr (B, k, E, sH, sW): every query's edge features spread over its HR patch with
    overlap averaging (spec section 4): edge_maps upsampled s times. Detached."""
    graph_geometry(lr_hw[0], lr_hw[1], scale, patch, stride)  # the HR grid exists
    d_lr = edge_maps(diff, lr_hw, patch, stride)
    B, k, E, H, W = d_lr.shape
    d_hr = F.interpolate(d_lr.view(B, k * E, H, W), scale_factor=scale, mode="nearest")
    return d_hr.view(B, k, E, scale * H, scale * W)


# --------------------------------------------------------------------------- AdaPN

@torch.library.custom_op("ignn::patch_stats", mutates_args=())
def _patch_stats(feat: torch.Tensor, patch: int, stride: int, pad_top: int, pad_left: int,
                 grid_h: int, grid_w: int) -> tuple[torch.Tensor, torch.Tensor]:
    grid = PatchGrid(patch, stride, pad_top, pad_left, grid_h, grid_w)
    if _use_triton(feat):
        return kernels.patch_stats(feat, *grid)
    return backend.patch_stats(feat, grid)


@_patch_stats.register_fake
def _(feat, patch, stride, pad_top, pad_left, grid_h, grid_w):
    shape = (feat.shape[0], feat.shape[1], grid_h * grid_w)
    dtype = backend.work_dtype(feat)
    return feat.new_empty(shape, dtype=dtype), feat.new_empty(shape, dtype=dtype)


@torch.library.custom_op("ignn::patch_stats_backward", mutates_args=())
def _patch_stats_backward(feat: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                          grad_mean: torch.Tensor, grad_std: torch.Tensor, patch: int,
                          stride: int, pad_top: int, pad_left: int, grid_h: int,
                          grid_w: int) -> torch.Tensor:
    grid = PatchGrid(patch, stride, pad_top, pad_left, grid_h, grid_w)
    if _use_triton(feat):
        return kernels.patch_stats_backward(feat, mean, std, grad_mean, grad_std, *grid)
    return backend.patch_stats_backward(feat, mean, std, grad_mean, grad_std, grid)


@_patch_stats_backward.register_fake
def _(feat, mean, std, grad_mean, grad_std, patch, stride, pad_top, pad_left, grid_h, grid_w):
    return feat.new_empty(feat.shape, dtype=mean.dtype)


def _patch_stats_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], *output)
    ctx.grid = inputs[1:]


def _patch_stats_grad(ctx, grad_mean, grad_std):
    feat, mean, std = ctx.saved_tensors
    grad_mean = torch.zeros_like(mean) if grad_mean is None else grad_mean.to(mean.dtype)
    grad_std = torch.zeros_like(std) if grad_std is None else grad_std.to(std.dtype)
    grad = _patch_stats_backward(feat, mean, std, grad_mean.contiguous(), grad_std.contiguous(),
                                 *ctx.grid)
    return (grad.to(feat.dtype),) + (None,) * 6


torch.library.register_autograd("ignn::patch_stats", _patch_stats_grad,
                                setup_context=_patch_stats_setup)


def query_stats(feat: torch.Tensor, patch: int = 3, stride: int = 2):
    """AdaPN statistics of every query patch of F (B, C, H, W): mean, std (B, C, M),
    fp32 (fp64 for fp64 F). Differentiable."""
    _check_feat(feat)
    return _patch_stats(feat.contiguous(), *_geometry(feat, 1, patch, stride).query_grid)


def key_stats(feat: torch.Tensor, scale: int = 2, patch: int = 3, stride: int = 2):
    """AdaPN statistics of every key block of F, once per son patch: mean, std (B, C, N).
    Differentiable."""
    _check_feat(feat)
    return _patch_stats(feat.contiguous(), *_geometry(feat, scale, patch, stride).key_grid)


# --------------------------------------------------------------------------- aggregation

@torch.library.custom_op("ignn::patch_aggregate", mutates_args=())
def _patch_aggregate(feat: torch.Tensor, idx: torch.Tensor, q_mean: torch.Tensor,
                     q_std: torch.Tensor, k_mean: torch.Tensor, k_std: torch.Tensor,
                     logits: torch.Tensor | None, scale: int, patch: int,
                     stride: int) -> torch.Tensor:
    if _use_triton(feat, idx):
        return kernels.patch_aggregate(feat, idx, q_mean, q_std, k_mean, k_std, scale, patch,
                                       stride, logits)
    return backend.aggregate(feat, idx, (q_mean, q_std, k_mean, k_std), logits,
                             _geometry(feat, scale, patch, stride))


@_patch_aggregate.register_fake
def _(feat, idx, q_mean, q_std, k_mean, k_std, logits, scale, patch, stride):
    B, C, H, W = feat.shape
    if logits is None:
        return feat.new_empty(B, idx.shape[2], C, scale * H, scale * W)
    return feat.new_empty(B, C, scale * H, scale * W)


@torch.library.custom_op("ignn::patch_aggregate_into", mutates_args=("out",))
def _patch_aggregate_into(feat: torch.Tensor, idx: torch.Tensor, q_mean: torch.Tensor,
                          q_std: torch.Tensor, k_mean: torch.Tensor, k_std: torch.Tensor,
                          scale: int, patch: int, stride: int, out: torch.Tensor) -> None:
    """knn_hr written into out (patch_aggregate(..., out=out)); no gradient."""
    if _use_triton(feat, idx):
        out.copy_(kernels.patch_aggregate(feat, idx, q_mean, q_std, k_mean, k_std, scale, patch,
                                          stride, None))
    else:
        backend.aggregate(feat, idx, (q_mean, q_std, k_mean, k_std), None,
                          _geometry(feat, scale, patch, stride), out=out)


@_patch_aggregate_into.register_fake
def _(feat, idx, q_mean, q_std, k_mean, k_std, scale, patch, stride, out):
    return None


@torch.library.custom_op("ignn::patch_aggregate_backward", mutates_args=())
def _patch_aggregate_backward(
        feat: torch.Tensor, idx: torch.Tensor, q_mean: torch.Tensor, q_std: torch.Tensor,
        k_mean: torch.Tensor, k_std: torch.Tensor, logits: torch.Tensor | None,
        grad_out: torch.Tensor, scale: int, patch: int, stride: int) -> list[torch.Tensor]:
    """[grad_feat, grad_q_mean, grad_q_std, grad_k_mean, grad_k_std, grad_logits] (the last
    is empty when logits is None); gradients in the statistics' dtype."""
    # the kernels accumulate with fp32 atomics (not bit-deterministic); the torch backend is
    # deterministic on CUDA too (its index_add_ is, in this mode)
    if _use_triton(feat, idx) and not torch.are_deterministic_algorithms_enabled():
        grads = kernels.patch_aggregate_backward(feat, idx, q_mean, q_std, k_mean, k_std,
                                                 grad_out, scale, patch, stride, logits)
        return [g if g is not None else feat.new_empty(0) for g in grads]
    return backend.aggregate_backward(feat, idx, (q_mean, q_std, k_mean, k_std), logits,
                                      grad_out, _geometry(feat, scale, patch, stride))


@_patch_aggregate_backward.register_fake
def _(feat, idx, q_mean, q_std, k_mean, k_std, logits, grad_out, scale, patch, stride):
    dtype = q_mean.dtype
    return [feat.new_empty(feat.shape, dtype=dtype), torch.empty_like(q_mean),
            torch.empty_like(q_std), torch.empty_like(k_mean), torch.empty_like(k_std),
            torch.empty_like(logits) if logits is not None else feat.new_empty(0)]


def _patch_aggregate_setup(ctx, inputs, output):
    feat, idx, q_mean, q_std, k_mean, k_std, logits, scale, patch, stride = inputs
    ctx.save_for_backward(feat, idx, q_mean, q_std, k_mean, k_std, logits)
    ctx.geometry = (scale, patch, stride)


def _patch_aggregate_grad(ctx, grad_out):
    feat, idx, q_mean, q_std, k_mean, k_std, logits = ctx.saved_tensors
    grads = _patch_aggregate_backward(feat, idx, q_mean, q_std, k_mean, k_std, logits,
                                      grad_out.contiguous(), *ctx.geometry)
    grad_feat, gqm, gqs, gkm, gks, grad_logits = grads
    return (grad_feat.to(feat.dtype), None, gqm.to(q_mean.dtype), gqs.to(q_std.dtype),
            gkm.to(k_mean.dtype), gks.to(k_std.dtype),
            None if logits is None else grad_logits.to(logits.dtype), None, None, None)


torch.library.register_autograd("ignn::patch_aggregate", _patch_aggregate_grad,
                                setup_context=_patch_aggregate_setup)


def _check_out(out, feat, idx, logits, scale, *stats) -> None:
    B, C, H, W = feat.shape
    shape = (B, idx.shape[2], C, scale * H, scale * W)
    if logits is not None:
        raise ValueError("out holds knn_hr: it cannot be given with logits")
    if (tuple(out.shape) != shape or out.dtype != feat.dtype or out.device != feat.device
            or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {shape} {feat.dtype} tensor on "
                         f"{feat.device}; got {tuple(out.shape)} {out.dtype} on {out.device}"
                         f"{'' if out.is_contiguous() else ', not contiguous'}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (feat, *stats)):
        raise RuntimeError("patch_aggregate(out=...) records no gradient: call it under "
                           "torch.no_grad(), or without out")


def patch_aggregate(feat: torch.Tensor, idx: torch.Tensor, query: tuple, key: tuple,
                    scale: int = 2, patch: int = 3, stride: int = 2,
                    logits: torch.Tensor | None = None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """AdaPN aggregation (spec section 6), differentiable in feat, the statistics and logits.

    Each neighbour's key block of F is normalised to its query's statistics and folded onto
    the HR grid with overlap averaging. query = (mean, std) (B, C, M) and key = (mean, std)
    (B, C, N) come from query_stats / key_stats; idx (B, M, k) int64.
    logits None: knn_hr (B, k, C, sH, sW).
    logits (B, k, sH, sW): x1_hr (B, C, sH, sW) = sum_r softmax_r(logits) * knn_hr[:, r],
    without materialising knn_hr. The result is in feat's dtype, computed in fp32 or better.
    out: knn_hr is written into it and it is returned (contiguous, feat's shape of knn_hr
    and dtype; without logits, and recording no gradient), so that a loop over ranks can
    reuse one map: on the CPU a fresh map above 32 MiB costs its page faults.
    """
    _check_feat(feat)
    B, C, H, W = feat.shape
    geo = _geometry(feat, scale, patch, stride)
    _check_idx(idx, B, geo)
    (q_mean, q_std), (k_mean, k_std) = query, key
    for name, t, L in (("query mean", q_mean, geo.num_queries), ("query std", q_std, geo.num_queries),
                       ("key mean", k_mean, geo.num_keys), ("key std", k_std, geo.num_keys)):
        if tuple(t.shape) != (B, C, L):
            raise ValueError(f"{name} must be (B, C, {L}) = {(B, C, L)}; got {tuple(t.shape)}")
    if logits is not None and tuple(logits.shape) != (B, idx.shape[2], scale * H, scale * W):
        raise ValueError(f"logits must be (B, k, sH, sW) = {(B, idx.shape[2], scale * H, scale * W)}"
                         f"; got {tuple(logits.shape)}")
    if out is not None:
        _check_out(out, feat, idx, logits, scale, q_mean, q_std, k_mean, k_std)
        _patch_aggregate_into(feat.contiguous(), idx.contiguous(), q_mean.contiguous(),
                              q_std.contiguous(), k_mean.contiguous(), k_std.contiguous(),
                              scale, patch, stride, out)
        return out
    return _patch_aggregate(feat.contiguous(), idx.contiguous(), q_mean.contiguous(),
                            q_std.contiguous(), k_mean.contiguous(), k_std.contiguous(),
                            None if logits is None else logits.contiguous(), scale, patch, stride)
