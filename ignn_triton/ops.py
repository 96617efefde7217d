"""The graph-aggregation operations: the single dispatch point between modules and kernels.

Every function here checks its inputs once, then runs either a fused Triton kernel
(CUDA tensors, triton installed) or a memory-efficient torch implementation (CPU, or no
triton). Neither path ever holds the (B, M, N) distance matrix or the (B, M, 9*C*s^2, k)
gathered tensor of the released code. Matching outputs (dist, idx, diff, D_hr) carry no
gradient; the statistics and the aggregation are differentiable.

Both paths treat an idx entry outside [0, N) alike, without reading it or synchronising:
NaN wherever it is used (its edge features; the HR pixels of its query's patch in its
rank's knn_hr, and in x1_hr), and no contribution to any gradient but the logits'
(NaN at those pixels). Under torch.use_deterministic_algorithms(True) the aggregation's
backward on CUDA (fp32 atomics) is replaced by the torch implementation (deterministic,
slower).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake

from . import kernels
from .geometry import GraphGeometry, graph_geometry, window_start

EPS = 1e-5  # added to the unbiased variance in AdaPN

# Bound on the elements of one temporary of the torch path (about 256 MB in fp64).
_CHUNK_ELEMENTS = 1 << 25
_GATHER_ELEMENTS = 1 << 20  # a gathered chunk of the CPU aggregation: 4 MiB in fp32, cache-sized
_KNN_TILE = 32  # queries a side of a tile of the CPU k-NN search

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _use_triton(*tensors: torch.Tensor) -> bool:
    """The Triton kernels take CUDA tensors in fp32 / fp16 / bf16; fp64 takes the torch path."""
    return kernels.HAS_TRITON and all(t.is_cuda and t.dtype != torch.float64 for t in tensors
                                      if t.is_floating_point())


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    """fp32 accumulation, or fp64 for fp64 inputs (the tests' oracle precision)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


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


def _geometry(ye: torch.Tensor, scale: int, window: int, patch: int, stride: int) -> GraphGeometry:
    return graph_geometry(ye.shape[2], ye.shape[3], scale, patch, stride, window)


def _check_idx(idx: torch.Tensor, batch: int, geo: GraphGeometry) -> None:
    """Shape and dtype; the values are not checked (that would synchronise with the GPU):
    entries outside [0, N) give NaN (module docstring)."""
    if idx.dtype != torch.int64 or idx.dim() != 3 or idx.shape[:2] != (batch, geo.num_queries):
        raise ValueError(f"idx must be int64 (B, M, k) = ({batch}, {geo.num_queries}, k); "
                         f"got {idx.dtype} {tuple(idx.shape)}")


def _bad_idx(idx: torch.Tensor, num_keys: int):
    """(idx with its entries outside [0, N) replaced by 0, their mask), or (idx, None) when
    there are none: the torch path's side of the kernels' rule for such entries."""
    bad = (idx < 0) | (idx >= num_keys)
    if not bad.any():
        return idx, None
    return idx.masked_fill(bad, 0), bad


# --------------------------------------------------------------------------- patches

def _pad_to_grid(x: torch.Tensor, patch: int, stride: int, pad_top: int, pad_left: int,
                 grid_h: int, grid_w: int) -> torch.Tensor:
    """x (..., H, W) zero-padded to exactly cover a grid_h x grid_w grid of patches."""
    H, W = x.shape[-2:]
    return F.pad(x, (pad_left, (grid_w - 1) * stride + patch - pad_left - W,
                     pad_top, (grid_h - 1) * stride + patch - pad_top - H))


def _patches(x: torch.Tensor, patch: int, stride: int, pad_top: int, pad_left: int,
             grid_h: int, grid_w: int) -> torch.Tensor:
    """(B, C, patch^2, grid_h * grid_w): the patches of a zero-padded patch grid (a copy:
    callers bound its size)."""
    B, C = x.shape[:2]
    padded = _pad_to_grid(x, patch, stride, pad_top, pad_left, grid_h, grid_w)
    return F.unfold(padded, patch, stride=stride).view(B, C, patch * patch, grid_h * grid_w)


def _query_patches(ye: torch.Tensor, geo: GraphGeometry) -> torch.Tensor:
    """(B, E, p*p, M) patch vectors of the query grid."""
    return _patches(ye, geo.patch, geo.stride, geo.query_h.pad_before, geo.query_w.pad_before,
                    geo.m1, geo.m2)


def _son_patches(xe: torch.Tensor, geo: GraphGeometry) -> torch.Tensor:
    """(B, E, p*p, N) patch vectors of the son grid."""
    return _patches(xe, geo.patch, geo.stride, geo.son_h.pad_before, geo.son_w.pad_before,
                    geo.n1, geo.n2)


def _key_grid(geo: GraphGeometry) -> tuple[int, int, int, int, int, int]:
    """(patch, stride, pad_top, pad_left, grid_h, grid_w) of the key blocks of F: (p*s)^2
    blocks at stride t*s over F padded by s x the son grid's padding (spec section 6)."""
    s = geo.scale
    return (geo.hr_patch, geo.hr_stride, s * geo.son_h.pad_before, s * geo.son_w.pad_before,
            geo.n1, geo.n2)


def _window_axis(geo: GraphGeometry, axis: int, first: int, last: int):
    """Along one axis (0: rows, 1: columns), for the queries first .. last - 1: their
    windows' first son rows (or columns) as a list, and the son range [lo, hi) that those
    windows cover together (starts never decrease)."""
    window, count = (geo.window_h, geo.n1) if axis == 0 else (geo.window_w, geo.n2)
    starts = [window_start(i, geo.scale, window, count) for i in range(first, last)]
    return starts, starts[0], starts[-1] + window


# --------------------------------------------------------------------------- matching

@torch.library.custom_op("ignn::patch_knn", mutates_args=())
def _patch_knn(ye: torch.Tensor, xe: torch.Tensor, k: int, scale: int, window: int,
               patch: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    if _use_triton(ye, xe):
        return kernels.patch_knn(ye, xe, k, scale, window, patch, stride)
    return _patch_knn_torch(ye, xe, k, _geometry(ye, scale, window, patch, stride))


@_patch_knn.register_fake
def _(ye, xe, k, scale, window, patch, stride):
    geo = _geometry(ye, scale, window, patch, stride)
    shape = (ye.shape[0], geo.num_queries, k)
    return ye.new_empty(shape, dtype=torch.float32), ye.new_empty(shape, dtype=torch.int64)


def _patch_knn_torch(ye: torch.Tensor, xe: torch.Tensor, k: int, geo: GraphGeometry):
    """Square tiles of _KNN_TILE x _KNN_TILE queries: one matmul gives their distances
    (|q|^2 + |key|^2 - 2 q.key) to the son patches of the rectangle their windows cover
    together, each query's wh x ww window is gathered from it, and its k nearest are
    selected by _k_smallest (ties to the smaller n, NaN last). Patch vectors are unfolded
    a row of tiles at a time: temporaries are O(tile * width * (window + tile)), never
    O(M)."""
    work = _work_dtype(ye)
    B, dev = ye.shape[0], ye.device
    p, t, wh, ww = geo.patch, geo.stride, geo.window_h, geo.window_w
    q_map = _pad_to_grid(ye.to(work), p, t, geo.query_h.pad_before, geo.query_w.pad_before,
                         geo.m1, geo.m2)
    key_map = _pad_to_grid(xe.to(work), p, t, geo.son_h.pad_before, geo.son_w.pad_before,
                           geo.n1, geo.n2)
    q_norm, key_norm = _patch_sqnorms(q_map, p, t), _patch_sqnorms(key_map, p, t)
    dist = torch.empty(B, geo.m1, geo.m2, k, dtype=torch.float32, device=dev)
    idx = torch.empty(B, geo.m1, geo.m2, k, dtype=torch.int64, device=dev)
    for i0 in range(0, geo.m1, _KNN_TILE):
        i1 = min(geo.m1, i0 + _KNN_TILE)
        row_starts, r0, r1 = _window_axis(geo, 0, i0, i1)
        rows = torch.tensor(row_starts, device=dev)[:, None] + torch.arange(wh, device=dev)
        q_rows = _grid_rows(q_map, p, t, i0, i1)  # (B, D, i1 - i0, m2)
        key_rows = _grid_rows(key_map, p, t, r0, r1)  # (B, D, r1 - r0, n2)
        for j0 in range(0, geo.m2, _KNN_TILE):
            j1 = min(geo.m2, j0 + _KNN_TILE)
            col_starts, c0, c1 = _window_axis(geo, 1, j0, j1)
            cols = torch.tensor(col_starts, device=dev)[:, None] + torch.arange(ww, device=dev)
            q = q_rows[..., j0:j1].flatten(2)  # (B, D, Mt)
            key = key_rows[..., c0:c1].flatten(2)  # (B, D, Nt)
            norms = (q_norm[:, i0:i1, j0:j1].reshape(B, -1, 1)
                     + key_norm[:, r0:r1, c0:c1].reshape(B, 1, -1))
            d = torch.baddbmm(norms, q.transpose(1, 2), key, alpha=-2)  # (B, Mt, Nt)
            # each query's window, row-major: n = row * n2 + col; in the tile, (row - r0, col - c0)
            n = (rows[:, None, :, None] * geo.n2 + cols[None, :, None, :]).reshape(-1, wh * ww)
            local = ((rows[:, None, :, None] - r0) * (c1 - c0)
                     + cols[None, :, None, :] - c0).reshape(-1, wh * ww)
            d, pos = _k_smallest(torch.gather(d, 2, local.expand(B, -1, -1)), k)
            dist[:, i0:i1, j0:j1] = d.view(B, i1 - i0, j1 - j0, k)
            idx[:, i0:i1, j0:j1] = torch.gather(n.expand(B, -1, -1), 2, pos).view(
                B, i1 - i0, j1 - j0, k)
    return dist.view(B, geo.num_queries, k), idx.view(B, geo.num_queries, k)


def _patch_sqnorms(padded: torch.Tensor, patch: int, stride: int) -> torch.Tensor:
    """(B, grid_h, grid_w): the squared norm of every patch vector of a map padded to its
    grid, as a sum-pooling of the pixels' squared norms."""
    box = padded.new_ones(1, 1, patch, patch)
    return F.conv2d(padded.square().sum(1, keepdim=True), box, stride=stride)[:, 0]


def _grid_rows(padded: torch.Tensor, patch: int, stride: int, r0: int, r1: int) -> torch.Tensor:
    """(B, C * patch^2, r1 - r0, grid_w): the patch vectors of grid rows r0 .. r1 - 1 of a map
    padded to its grid."""
    band = padded[:, :, r0 * stride: (r1 - 1) * stride + patch]
    grid_w = (padded.shape[3] - patch) // stride + 1
    return F.unfold(band, patch, stride=stride).view(band.shape[0], -1, r1 - r0, grid_w)


def _k_smallest(d: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, positions) of the k smallest entries of each row of d (..., L), ascending,
    ties to the smaller position, NaN after every number: the first k columns of a stable
    sort, from two top-k selections (a sort of IGNN's 900 candidates costs about 20x more).
    The k-th smallest value v splits a row: every entry below v is chosen, then entries
    equal to v by position. Rows with fewer than k numbers (v is NaN) are sorted."""
    L = d.shape[-1]
    kth = torch.topk(d, k, dim=-1, largest=False).values[..., -1:]  # NaN ranks last in topk
    position = torch.arange(L, device=d.device)
    order = torch.where(d < kth, position, torch.where(d == kth, position + L, 2 * L))
    pos = torch.topk(order, k, dim=-1, largest=False).values.remainder_(L)  # by position
    values, by_value = torch.sort(torch.gather(d, -1, pos), dim=-1, stable=True)
    pos = torch.gather(pos, -1, by_value)
    short = torch.isnan(kth[..., 0])
    if not is_fake(d) and short.any():  # a memory estimate's fake tensors hold no values
        sorted_d, sorted_pos = torch.sort(d[short], dim=-1, stable=True)
        values[short], pos[short] = sorted_d[..., :k], sorted_pos[..., :k]
    return values.float(), pos


def patch_knn(ye: torch.Tensor, xe: torch.Tensor, k: int = 5, scale: int = 2, window: int = 30,
              patch: int = 3, stride: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest son patches of every query patch, inside its window (spec section 3).

    ye (B, E, H, W) LR embedding, xe (B, E, H/s, W/s) son embedding. Returns dist (B, M, k)
    float32 ascending and idx (B, M, k) int64 flat son indices; ties go to the smaller
    index; a NaN distance ranks after every number (+inf included) and stays NaN in dist.
    """
    _check_embeddings(ye, xe, scale)
    geo = _geometry(ye, scale, window, patch, stride)
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
    return _edge_features_torch(ye, xe, idx, _geometry(ye, scale, 1, patch, stride))


@_edge_features.register_fake
def _(ye, xe, idx, scale, patch, stride):
    return ye.new_empty((*idx.shape, ye.shape[1]))


def _edge_features_torch(ye, xe, idx, geo: GraphGeometry) -> torch.Tensor:
    """Patch vectors laid out (B, M | N, p*p, E), so that a chunk of queries' neighbours is
    one index_select of whole rows and their differences reduce straight into the output
    layout (B, M, k, E)."""
    work = _work_dtype(ye)
    idx, bad = _bad_idx(idx, geo.num_keys)
    B, E = ye.shape[:2]
    k = idx.shape[2]
    q = _query_patches(ye.to(work), geo).permute(0, 3, 2, 1)  # (B, M, P, E), a view
    key = _son_patches(xe.to(work), geo).permute(0, 3, 2, 1).contiguous()  # (B, N, P, E)
    P = key.shape[2]
    out = torch.empty(B, geo.num_queries, k, E, dtype=work, device=ye.device)
    step = max(1, _GATHER_ELEMENTS // max(1, E * P * k))
    for b in range(B):
        for start in range(0, geo.num_queries, step):
            m = slice(start, start + step)
            n = idx[b, m]  # (Mc, k)
            neighbours = key[b].index_select(0, n.flatten()).view(*n.shape, P, E)
            torch.sum(neighbours.sub_(q[b, m, None]).abs_(), 2, out=out[b, m])
    if bad is not None:
        out.masked_fill_(bad[..., None], float("nan"))
    return out.to(ye.dtype)


def edge_features(ye: torch.Tensor, xe: torch.Tensor, idx: torch.Tensor, scale: int = 2,
                  patch: int = 3, stride: int = 2) -> torch.Tensor:
    """diff (B, M, k, E): per channel, sum over patch positions of |query - neighbour|;
    NaN for an idx entry outside [0, N)."""
    _check_embeddings(ye, xe, scale)
    geo = _geometry(ye, scale, 1, patch, stride)
    _check_idx(idx, ye.shape[0], geo)
    return _edge_features(ye.detach().contiguous(), xe.detach().contiguous(), idx.contiguous(),
                          scale, patch, stride)


# --------------------------------------------------------------------------- folding

def _fold_constant(values: torch.Tensor, geo: GraphGeometry) -> torch.Tensor:
    """values (B, D, m1, m2), constant over each query's patch at the geometry's scale s ->
    overlap-averaged map (B, D, sH, sW); no per-patch copy is made. GPUs and torch.compile:
    a transposed box convolution (cuDNN; inductor takes many minutes over the strided adds);
    eager CPU: ceil(ps / ts)^2 broadcast adds into the phase layout (_fold_rows_), about 4x
    faster there than the convolution (measured: E = 64, LR 128x128)."""
    if values.device.type != "cpu" or torch.compiler.is_compiling():
        return _fold_constant_conv(values, geo)
    B, D, m1, m2 = values.shape
    ps, ts = geo.hr_patch, geo.hr_stride
    q, crop, count = _hr_crop(geo, values)
    out = []
    for b in range(B):
        total = values.new_zeros(D, m1 + q, ts, m2 + q, ts)
        blocks = values[b].permute(1, 2, 0)[:, :, :, None, None].expand(m1, m2, D, ps, ps)
        _fold_rows_(total, blocks, 0, geo)
        out.append(total.view(D, (m1 + q) * ts, (m2 + q) * ts)[crop] / count)
    return torch.stack(out)


def _fold_constant_conv(values: torch.Tensor, geo: GraphGeometry) -> torch.Tensor:
    """_fold_constant as a transposed box convolution (the GPU and compiled path)."""
    B, D = values.shape[:2]
    box = values.new_ones(1, 1, geo.hr_patch, geo.hr_patch)
    total = F.conv_transpose2d(values.reshape(B * D, 1, geo.m1, geo.m2), box, stride=geo.hr_stride)
    count = F.conv_transpose2d(torch.ones_like(values[:1, :1]), box, stride=geo.hr_stride)
    out = (total / count).view(B, D, *total.shape[-2:])
    s = geo.scale
    top, left = s * geo.query_h.pad_before, s * geo.query_w.pad_before
    return out[..., top: top + s * geo.query_h.size, left: left + s * geo.query_w.size]


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
    return _fold_constant(grid, geo).view(B, k, E, *lr_hw)


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

def _check_feat(feat: torch.Tensor) -> None:
    if not isinstance(feat, torch.Tensor) or feat.dim() != 4 or feat.dtype not in _FLOAT_DTYPES:
        got = f"{feat.dtype} {tuple(feat.shape)}" if isinstance(feat, torch.Tensor) else type(feat)
        raise ValueError(f"feat must be a float (B, C, H, W) tensor; got {got}")


def _stats(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, P, L) -> mean and sqrt(unbiased var + EPS), each (B, C, L); two-pass."""
    blocks = blocks.to(_work_dtype(blocks))
    mean = blocks.mean(2)
    var = (blocks - mean[:, :, None]).square().sum(2) / (blocks.shape[2] - 1)
    return mean, torch.sqrt(var + EPS)


@torch.library.custom_op("ignn::patch_stats", mutates_args=())
def _patch_stats(feat: torch.Tensor, patch: int, stride: int, pad_top: int, pad_left: int,
                 grid_h: int, grid_w: int) -> tuple[torch.Tensor, torch.Tensor]:
    if _use_triton(feat):
        return kernels.patch_stats(feat, patch, stride, pad_top, pad_left, grid_h, grid_w)
    # (B, C, P, L) unfold: 2.25x F for IGNN's grids, bounded and short-lived
    return _stats(_patches(feat, patch, stride, pad_top, pad_left, grid_h, grid_w))


@_patch_stats.register_fake
def _(feat, patch, stride, pad_top, pad_left, grid_h, grid_w):
    shape = (feat.shape[0], feat.shape[1], grid_h * grid_w)
    dtype = _work_dtype(feat)
    return feat.new_empty(shape, dtype=dtype), feat.new_empty(shape, dtype=dtype)


@torch.library.custom_op("ignn::patch_stats_backward", mutates_args=())
def _patch_stats_backward(feat: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                          grad_mean: torch.Tensor, grad_std: torch.Tensor, patch: int,
                          stride: int, pad_top: int, pad_left: int, grid_h: int,
                          grid_w: int) -> torch.Tensor:
    if _use_triton(feat):
        return kernels.patch_stats_backward(feat, mean, std, grad_mean, grad_std, patch, stride,
                                            pad_top, pad_left, grid_h, grid_w)
    # d mean / dx = 1/P, d std / dx = (x - mean) / ((P - 1) std), folded back over the grid
    blocks = _patches(feat.to(mean.dtype), patch, stride, pad_top, pad_left, grid_h, grid_w)
    P = blocks.shape[2]
    cols = (grad_mean[:, :, None] / P
            + grad_std[:, :, None] * (blocks - mean[:, :, None]) / ((P - 1) * std[:, :, None]))
    B, C, H, W = feat.shape
    padded_hw = ((grid_h - 1) * stride + patch, (grid_w - 1) * stride + patch)
    grad = F.fold(cols.flatten(1, 2), padded_hw, patch, stride=stride)
    return grad[..., pad_top: pad_top + H, pad_left: pad_left + W].contiguous()


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
    geo = graph_geometry(feat.shape[2], feat.shape[3], 1, patch, stride)
    return _patch_stats(feat.contiguous(), patch, stride, geo.query_h.pad_before,
                        geo.query_w.pad_before, geo.m1, geo.m2)


def key_stats(feat: torch.Tensor, scale: int = 2, patch: int = 3, stride: int = 2):
    """AdaPN statistics of every key block of F, once per son patch: mean, std (B, C, N).
    Differentiable."""
    _check_feat(feat)
    geo = graph_geometry(feat.shape[2], feat.shape[3], scale, patch, stride)
    return _patch_stats(feat.contiguous(), *_key_grid(geo))


def _key_block_rows(feat_c: torch.Tensor, geo: GraphGeometry) -> torch.Tensor:
    """(N, Cc, (p*s)^2): one item's key blocks of F (Cc, H, W), a son patch per row (one copy
    out of a strided view of the padded map), so that gathering neighbours is index_select."""
    patch, stride, _, _, grid_h, grid_w = grid = _key_grid(geo)
    Cc = feat_c.shape[0]
    padded = _pad_to_grid(feat_c, *grid)
    Hp, Wp = padded.shape[1:]
    view = padded.as_strided((grid_h, grid_w, Cc, patch, patch),
                             (stride * Wp, stride, Hp * Wp, Wp, 1), padded.storage_offset())
    return view.reshape(grid_h * grid_w, Cc, patch * patch)


def _phases(geo: GraphGeometry, i0: int, rows: int, cols: int):
    """Pairs (block offsets, phase-layout slice) that map the (ps, ps) blocks of query rows
    i0 .. i0 + rows (all `cols` columns) onto the padded HR layout (Cc, m1 + Q, ts, m2 + Q,
    ts): the block of query (i, j) lies at padded HR rows ts*i .. ts*i + ps, so offset u
    lands in phase row i + u // ts, row u % ts. ceil(ps / ts)^2 pairs (4 for IGNN)."""
    ps, ts = geo.hr_patch, geo.hr_stride
    for qu in range(-(-ps // ts)):
        u = slice(qu * ts, min(ps, qu * ts + ts))
        for qv in range(-(-ps // ts)):
            v = slice(qv * ts, min(ps, qv * ts + ts))
            yield (u, v), (slice(None), slice(i0 + qu, i0 + qu + rows), slice(0, u.stop - u.start),
                           slice(qv, qv + cols), slice(0, v.stop - v.start))


def _fold_rows_(hr: torch.Tensor, z: torch.Tensor, i0: int, geo: GraphGeometry) -> None:
    """hr (Cc, m1 + Q, ts, m2 + Q, ts) += the fold of z (rows, m2, Cc, ps, ps), the HR blocks
    of query rows i0 .. i0 + rows: a few strided adds instead of col2im's per-element loop."""
    for (u, v), dst in _phases(geo, i0, *z.shape[:2]):
        hr[dst] += z[:, :, :, u, v].permute(2, 0, 3, 1, 4)


def _cpu_chunks(geo: GraphGeometry, C: int) -> tuple[int, int]:
    """(channels per chunk, query rows per gather) of the CPU aggregation: a chunk's key
    blocks (N, Cc, ps^2) and padded HR buffer (Cc, ~sH, ~sW) stay under _CHUNK_ELEMENTS, a
    gather (rows * m2, Cc, ps^2) under _GATHER_ELEMENTS."""
    ps, ts = geo.hr_patch, geo.hr_stride
    q = -(-ps // ts) - 1
    per_channel = max(geo.num_keys * ps * ps, (geo.m1 + q) * (geo.m2 + q) * ts * ts)
    cc = max(1, min(C, _CHUNK_ELEMENTS // per_channel))
    return cc, max(1, min(geo.m1, _GATHER_ELEMENTS // max(1, geo.m2 * cc * ps * ps)))


def _hr_crop(geo: GraphGeometry, like: torch.Tensor):
    """(Q, crop, count): the phase rows past the last query row of the padded HR layout
    (m1 + Q, ts, m2 + Q, ts), the (channel, row, col) slices of the unpadded HR map in it
    flattened, and that map's cover counts (sH, sW)."""
    s = geo.scale
    top, left = s * geo.query_h.pad_before, s * geo.query_w.pad_before
    crop = (slice(None), slice(top, top + s * geo.query_h.size),
            slice(left, left + s * geo.query_w.size))
    return -(-geo.hr_patch // geo.hr_stride) - 1, crop, _hr_count(geo, like)[crop[1:]]


def _cpu_chunk_items(feat, stats, geo: GraphGeometry, cc: int):
    """Per item b and chunk c of cc channels: (b, c, the key blocks (N, Cc, ps^2) and the
    statistics (M | N, Cc) contiguous) in the work dtype."""
    views = [t.transpose(1, 2) for t in stats]  # (B, M | N, C)
    for b in range(feat.shape[0]):
        for c0 in range(0, feat.shape[1], cc):
            c = slice(c0, min(feat.shape[1], c0 + cc))
            yield (b, c, _key_block_rows(feat[b, c].to(stats[0].dtype), geo),
                   [v[b, :, c].contiguous() for v in views])


def _key_offsets(feat_c: torch.Tensor, geo: GraphGeometry) -> torch.Tensor:
    """(ps^2, Cc, N): for every offset (u, v) inside a key block, the pixel of F (Cc, H, W)
    at that offset in every son patch's block, contiguous (one copy out of a strided view
    of the padded map), so that the neighbours' pixels at one offset are one index_select."""
    patch, stride, _, _, grid_h, grid_w = grid = _key_grid(geo)
    Cc = feat_c.shape[0]
    padded = _pad_to_grid(feat_c, *grid)
    Hp, Wp = padded.shape[1:]
    view = padded.as_strided((patch, patch, Cc, grid_h, grid_w),
                             (Wp, 1, Hp * Wp, stride * Wp, stride), padded.storage_offset())
    return view.reshape(patch * patch, Cc, grid_h * grid_w)


def _offset_rows(geo: GraphGeometry, cc: int) -> int:
    """Query rows per step of the CPU aggregation's forward: one offset's gathered pixels
    (cc, rows * m2) stay under a quarter of _GATHER_ELEMENTS (cache-sized)."""
    return max(1, min(geo.m1, _GATHER_ELEMENTS // 4 // max(1, geo.m2 * cc)))


def _aggregate_torch(feat, idx, stats, logits, geo: GraphGeometry) -> torch.Tensor:
    """Per (item, channel chunk, rank, a few query rows) and per offset (u, v) of the key
    blocks: gather the neighbours' pixels at that offset (index_select of (Cc, N) rows),
    normalise them (one addcmul) and add them, a contiguous (Cc, rows, m2) slab, into one
    reused polyphase HR buffer (Cc, ts, ts, m1 + Q, m2 + Q); never the (B, M, 9*C*s^2, k)
    gathered tensor. The offsets run in the order of _fold_rows_' phases, so every HR pixel
    sums the same terms in the same order. Large temporaries are allocated once per call
    and reused: on CPU a fresh one costs its page faults, about as much as the arithmetic."""
    B, C, H, W = feat.shape
    k = idx.shape[2]
    idx, bad = _bad_idx(idx, geo.num_keys)
    s, ps, ts, m1, m2 = geo.scale, geo.hr_patch, geo.hr_stride, geo.m1, geo.m2
    work = stats[0].dtype
    q, crop, count = _hr_crop(geo, stats[0])
    cc = _cpu_chunks(geo, C)[0]
    rows = _offset_rows(geo, cc)
    poly = torch.empty(cc, ts, ts, m1 + q, m2 + q, dtype=work, device=feat.device)
    hr = torch.empty(cc, m1 + q, ts, m2 + q, ts, dtype=work, device=feat.device)
    gathered = torch.empty(cc * rows * m2, dtype=work, device=feat.device)
    if logits is None:
        out = torch.empty(B, k, C, s * H, s * W, dtype=work, device=feat.device)
    else:
        out = torch.zeros(B, C, s * H, s * W, dtype=work, device=feat.device)
        weights = torch.softmax(logits.to(work), dim=1)
        knn = torch.empty(cc, s * H, s * W, dtype=work, device=feat.device)
    for b in range(B):
        for c0 in range(0, C, cc):
            c = slice(c0, min(C, c0 + cc))
            width = c.stop - c.start
            offsets = _key_offsets(feat[b, c].to(work), geo)  # (ps^2, width, N)
            qm, qs, km, ks = (t[b, c] for t in stats)  # (width, M | N)
            fold = poly[:width]
            for r in range(k):
                fold.zero_()
                for i0 in range(0, m1, rows):
                    i1 = min(m1, i0 + rows)
                    m = slice(i0 * m2, i1 * m2)
                    n = idx[b, m, r]
                    alpha = qs[:, m] / ks[:, n]  # (width, rows * m2)
                    if bad is not None:
                        alpha.masked_fill_(bad[b, m, r], float("nan"))
                    beta = qm[:, m] - km[:, n] * alpha
                    z = gathered[: width * n.numel()].view(width, n.numel())
                    for (u, v), dst in _offset_phases(geo, i0, i1 - i0):
                        torch.index_select(offsets[u * ps + v], 1, n, out=z)
                        torch.addcmul(beta, z, alpha, out=z)
                        fold[dst] += z.view(width, i1 - i0, m2)
                hr[:width].copy_(fold.permute(0, 3, 1, 4, 2))
                total = hr[:width].view(width, (m1 + q) * ts, (m2 + q) * ts)[crop]
                if logits is None:
                    torch.div(total, count, out=out[b, r, c])
                else:
                    out[b, c].addcmul_(torch.div(total, count, out=knn[:width]), weights[b, r])
    return out.to(feat.dtype)


def _offset_phases(geo: GraphGeometry, i0: int, rows: int):
    """Pairs ((u, v), polyphase index) for every offset of a (ps, ps) block, in the order of
    _phases (phase, then offset within it): offset (u, v) of the blocks of query rows
    i0 .. i0 + rows lands at (Cc, rows, m2) positions of the polyphase HR layout (Cc, ts, ts,
    m1 + Q, m2 + Q), padded HR pixel (ts I + a, ts J + b) at [:, a, b, I, J]."""
    ts = geo.hr_stride
    for (us, vs), _ in _phases(geo, i0, rows, geo.m2):
        for u in range(us.start, us.stop):
            for v in range(vs.start, vs.stop):
                yield (u, v), (slice(None), u % ts, v % ts,
                               slice(i0 + u // ts, i0 + u // ts + rows),
                               slice(v // ts, v // ts + geo.m2))


@torch.library.custom_op("ignn::patch_aggregate", mutates_args=())
def _patch_aggregate(feat: torch.Tensor, idx: torch.Tensor, q_mean: torch.Tensor,
                     q_std: torch.Tensor, k_mean: torch.Tensor, k_std: torch.Tensor,
                     logits: torch.Tensor | None, scale: int, patch: int,
                     stride: int) -> torch.Tensor:
    if _use_triton(feat, idx):
        return kernels.patch_aggregate(feat, idx, q_mean, q_std, k_mean, k_std, scale, patch,
                                       stride, logits)
    geo = graph_geometry(feat.shape[2], feat.shape[3], scale, patch, stride)
    return _aggregate_torch(feat, idx, (q_mean, q_std, k_mean, k_std), logits, geo)


@_patch_aggregate.register_fake
def _(feat, idx, q_mean, q_std, k_mean, k_std, logits, scale, patch, stride):
    B, C, H, W = feat.shape
    if logits is None:
        return feat.new_empty(B, idx.shape[2], C, scale * H, scale * W)
    return feat.new_empty(B, C, scale * H, scale * W)


@torch.library.custom_op("ignn::patch_aggregate_backward", mutates_args=())
def _patch_aggregate_backward(
        feat: torch.Tensor, idx: torch.Tensor, q_mean: torch.Tensor, q_std: torch.Tensor,
        k_mean: torch.Tensor, k_std: torch.Tensor, logits: torch.Tensor | None,
        grad_out: torch.Tensor, scale: int, patch: int, stride: int) -> list[torch.Tensor]:
    """[grad_feat, grad_q_mean, grad_q_std, grad_k_mean, grad_k_std, grad_logits] (the last
    is empty when logits is None); gradients in the statistics' dtype."""
    # the kernels accumulate with fp32 atomics (not bit-deterministic); the torch code is
    # deterministic on CUDA too (its index_add_ is, in this mode)
    if _use_triton(feat, idx) and not torch.are_deterministic_algorithms_enabled():
        grads = kernels.patch_aggregate_backward(feat, idx, q_mean, q_std, k_mean, k_std,
                                                 grad_out, scale, patch, stride, logits)
        return [g if g is not None else feat.new_empty(0) for g in grads]
    return _aggregate_backward_torch(feat, idx, (q_mean, q_std, k_mean, k_std), logits,
                                     grad_out, graph_geometry(feat.shape[2], feat.shape[3],
                                                              scale, patch, stride))


@_patch_aggregate_backward.register_fake
def _(feat, idx, q_mean, q_std, k_mean, k_std, logits, grad_out, scale, patch, stride):
    dtype = q_mean.dtype
    return [feat.new_empty(feat.shape, dtype=dtype), torch.empty_like(q_mean),
            torch.empty_like(q_std), torch.empty_like(k_mean), torch.empty_like(k_std),
            torch.empty_like(logits) if logits is not None else feat.new_empty(0)]


def _hr_count(geo: GraphGeometry, like: torch.Tensor) -> torch.Tensor:
    """(padded sH, padded sW): how many query HR patches cover each padded HR pixel."""
    s = geo.scale
    padded_hw = (s * geo.query_h.padded, s * geo.query_w.padded)
    ones = like.new_ones(1, geo.hr_patch ** 2, geo.num_queries)
    return F.fold(ones, padded_hw, geo.hr_patch, stride=geo.hr_stride)[0, 0]


def _unfold_rows(dz: torch.Tensor, d: torch.Tensor, i0: int, geo: GraphGeometry) -> None:
    """dz (rows, m2, Cc, ps, ps) = the HR blocks of query rows i0 .. i0 + rows read from d
    (Cc, m1 + Q, ts, m2 + Q, ts): the adjoint of _fold_rows_ (every block offset once)."""
    for (u, v), src in _phases(geo, i0, *dz.shape[:2]):
        dz[:, :, :, u, v] = d[src].permute(1, 3, 0, 2, 4)


def _aggregate_backward_torch(feat, idx, stats, logits, grad_out, geo: GraphGeometry):
    """Vector-Jacobian products of _aggregate_torch, in the same (item, channel chunk, rank,
    query rows) order and with the same reused buffers: the upstream gradient over the
    overlap average is read back per block (_unfold_rows), the key blocks' gradient is
    accumulated with index_add_ over the ranks and folded onto F once per chunk. The logits'
    gradient is the softmax backward of g_r = <dx1, knn_r> (knn_r refolded as forward)."""
    B, C, H, W = feat.shape
    k = idx.shape[2]
    idx, bad = _bad_idx(idx, geo.num_keys)
    ps, ts, m1, m2 = geo.hr_patch, geo.hr_stride, geo.m1, geo.m2
    work = stats[0].dtype
    dev = feat.device
    q, crop, count = _hr_crop(geo, stats[0])
    patch, stride, pad_top, pad_left, n1, n2 = _key_grid(geo)
    cc, rows = _cpu_chunks(geo, C)
    d_hr = torch.empty(cc, m1 + q, ts, m2 + q, ts, dtype=work, device=dev)  # upstream / count
    d_pad = torch.empty(cc, n1 + q, ts, n2 + q, ts, dtype=work, device=dev)  # d padded F
    gathered = torch.empty(rows * m2 * cc * ps * ps, dtype=work, device=dev)
    d_gathered = torch.empty_like(gathered)
    weights = None if logits is None else torch.softmax(logits.to(work), dim=1)  # (B, k, ..)
    if weights is not None:
        hr = torch.empty_like(d_hr)  # knn_r, refolded for the logits' gradient
        g = torch.zeros_like(weights)  # (B, k, sH, sW)
        scaled = weights / count  # the upstream of rank r is dx1 * w_r, then / count
    d_feat = torch.zeros(feat.shape, dtype=work, device=dev)
    d_stats = [torch.zeros_like(t) for t in stats]
    for b, c, blocks, (qm, qs, km, ks) in _cpu_chunk_items(feat, stats, geo, cc):
        width = c.stop - c.start
        d_blocks = torch.zeros_like(blocks)
        d_km, d_ks = torch.zeros_like(km), torch.zeros_like(ks)
        d_qm, d_qs = d_stats[0][b, c], d_stats[1][b, c]  # (width, M) views
        upstream = d_hr[:width]
        up_hr = upstream.view(width, (m1 + q) * ts, (m2 + q) * ts)
        for r in range(k):
            up_hr.zero_()
            if weights is None:
                torch.div(grad_out[b, r, c].to(work), count, out=up_hr[crop])
            else:
                torch.mul(grad_out[b, c].to(work), scaled[b, r], out=up_hr[crop])
                hr[:width].zero_()
            for i0 in range(0, m1, rows):
                i1 = min(m1, i0 + rows)
                m = slice(i0 * m2, i1 * m2)
                n = idx[b, m, r]
                size = n.numel() * width * ps * ps
                z = gathered[:size].view(n.numel(), width, ps * ps)
                torch.index_select(blocks, 0, n, out=z)
                dz = d_gathered[:size].view(n.numel(), width, ps * ps)
                _unfold_rows(dz.view(i1 - i0, m2, width, ps, ps), upstream, i0, geo)
                bad_rows = None if bad is None else bad[b, m, r, None, None]
                if bad_rows is not None:  # no gradient through an entry outside [0, N)
                    dz.masked_fill_(bad_rows, 0.0)
                sigma_kn, mu_kn = ks[n], km[n]  # (rows * m2, width)
                alpha = qs[m] / sigma_kn
                d_alpha = (dz * z).sum(2)
                d_beta = dz.sum(2)
                if weights is not None:  # this rank's normalised blocks, folded as forward
                    z.mul_(alpha[:, :, None]).add_((qm[m] - mu_kn * alpha)[:, :, None])
                    if bad_rows is not None:  # NaN there, as the forward's
                        z.masked_fill_(bad_rows, float("nan"))
                    _fold_rows_(hr[:width], z.view(i1 - i0, m2, width, ps, ps), i0, geo)
                d_blocks.index_add_(0, n, dz.mul_(alpha[:, :, None]))
                d_alpha -= d_beta * mu_kn  # beta = mu_q - mu_kn * alpha
                d_qm[:, m] += d_beta.T
                d_qs[:, m] += (d_alpha / sigma_kn).T
                d_km.index_add_(0, n, -d_beta * alpha)
                d_ks.index_add_(0, n, -d_alpha * alpha / sigma_kn)
            if weights is not None:
                knn = hr[:width].view(width, (m1 + q) * ts, (m2 + q) * ts)[crop] / count
                g[b, r] += (grad_out[b, c].to(work) * knn).sum(0)
        # the key blocks' gradient onto F: the same phase fold on the son grid
        d_pad[:width].zero_()
        _fold_rows_(d_pad[:width], d_blocks.view(n1, n2, width, patch, patch), 0, geo)
        d_flat = d_pad[:width].view(width, (n1 + q) * ts, (n2 + q) * ts)
        d_feat[b, c] += d_flat[:, pad_top: pad_top + H, pad_left: pad_left + W]
        d_stats[2][b, c] += d_km.T
        d_stats[3][b, c] += d_ks.T
    grad_logits = (feat.new_empty(0) if logits is None else
                   (weights * (g - (weights * g).sum(1, keepdim=True))).to(logits.dtype))
    return [d_feat, *d_stats, grad_logits]


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


def patch_aggregate(feat: torch.Tensor, idx: torch.Tensor, query: tuple, key: tuple,
                    scale: int = 2, patch: int = 3, stride: int = 2,
                    logits: torch.Tensor | None = None) -> torch.Tensor:
    """AdaPN aggregation (spec section 6), differentiable in feat, the statistics and logits.

    Each neighbour's key block of F is normalised to its query's statistics and folded onto
    the HR grid with overlap averaging. query = (mean, std) (B, C, M) and key = (mean, std)
    (B, C, N) come from query_stats / key_stats; idx (B, M, k) int64.
    logits None: knn_hr (B, k, C, sH, sW).
    logits (B, k, sH, sW): x1_hr (B, C, sH, sW) = sum_r softmax_r(logits) * knn_hr[:, r],
    without materialising knn_hr. The result is in feat's dtype, computed in fp32 or better.
    """
    _check_feat(feat)
    B, C, H, W = feat.shape
    geo = graph_geometry(H, W, scale, patch, stride)
    _check_idx(idx, B, geo)
    (q_mean, q_std), (k_mean, k_std) = query, key
    for name, t, L in (("query mean", q_mean, geo.num_queries), ("query std", q_std, geo.num_queries),
                       ("key mean", k_mean, geo.num_keys), ("key std", k_std, geo.num_keys)):
        if tuple(t.shape) != (B, C, L):
            raise ValueError(f"{name} must be (B, C, {L}) = {(B, C, L)}; got {tuple(t.shape)}")
    if logits is not None and tuple(logits.shape) != (B, idx.shape[2], scale * H, scale * W):
        raise ValueError(f"logits must be (B, k, sH, sW) = {(B, idx.shape[2], scale * H, scale * W)}"
                         f"; got {tuple(logits.shape)}")
    return _patch_aggregate(feat.contiguous(), idx.contiguous(), q_mean.contiguous(),
                            q_std.contiguous(), k_mean.contiguous(), k_std.contiguous(),
                            None if logits is None else logits.contiguous(), scale, patch, stride)

