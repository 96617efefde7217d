"""The graph-aggregation operations: the single dispatch point between modules and kernels.

Every function here checks its inputs once, then runs either a fused Triton kernel
(CUDA tensors, triton installed) or a memory-efficient torch implementation (CPU, or no
triton). Neither path ever holds the (B, M, N) distance matrix or the (B, M, 9*C*s^2, k)
gathered tensor of the released code. Matching outputs (dist, idx, diff, D_hr) carry no
gradient; the statistics and the aggregation are differentiable.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import kernels
from .geometry import GraphGeometry, graph_geometry, window_start

EPS = 1e-5  # added to the unbiased variance in AdaPN

# Bound on the elements of one temporary of the torch path (about 256 MB in fp64).
_CHUNK_ELEMENTS = 1 << 25

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _use_triton(*tensors: torch.Tensor) -> bool:
    return kernels.HAS_TRITON and all(t.is_cuda for t in tensors)


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
    if idx.dtype != torch.int64 or idx.dim() != 3 or idx.shape[:2] != (batch, geo.num_queries):
        raise ValueError(f"idx must be int64 (B, M, k) = ({batch}, {geo.num_queries}, k); "
                         f"got {idx.dtype} {tuple(idx.shape)}")
    if (not idx.is_cuda and not torch.compiler.is_compiling() and idx.numel()
            and (idx.min() < 0 or idx.max() >= geo.num_keys)):
        raise ValueError(f"idx holds son indices outside [0, {geo.num_keys}); "
                         f"got [{int(idx.min())}, {int(idx.max())}]")


# --------------------------------------------------------------------------- patches

def _pad(x: torch.Tensor, geo_h, geo_w, factor: int = 1) -> torch.Tensor:
    """Zero-pad (B, C, h, w) like the patch grids geo_h/geo_w, paddings times factor."""
    return F.pad(x, (geo_w.pad_before * factor, geo_w.pad_after * factor,
                     geo_h.pad_before * factor, geo_h.pad_after * factor))


def _query_patches(ye: torch.Tensor, geo: GraphGeometry) -> torch.Tensor:
    """(B, E, p*p, M) patch vectors of the query grid (a copy: bounded by callers)."""
    B, E = ye.shape[:2]
    cols = F.unfold(_pad(ye, geo.query_h, geo.query_w), geo.patch, stride=geo.stride)
    return cols.view(B, E, geo.patch * geo.patch, geo.num_queries)


def _son_patches(xe: torch.Tensor, geo: GraphGeometry) -> torch.Tensor:
    """(B, E, p*p, N) patch vectors of the son grid."""
    B, E = xe.shape[:2]
    cols = F.unfold(_pad(xe, geo.son_h, geo.son_w), geo.patch, stride=geo.stride)
    return cols.view(B, E, geo.patch * geo.patch, geo.num_keys)


def _key_blocks(feat: torch.Tensor, geo: GraphGeometry) -> torch.Tensor:
    """(B, C, (p*s)^2, N): the block of F under each son patch, F padded s x son padding."""
    B, C = feat.shape[:2]
    padded = _pad(feat, geo.son_h, geo.son_w, factor=geo.scale)
    cols = F.unfold(padded, geo.hr_patch, stride=geo.hr_stride)
    return cols.view(B, C, geo.hr_patch ** 2, geo.num_keys)


def _window_candidates(geo: GraphGeometry, rows: range, device):
    """The wh*ww candidates of every query in query rows `rows`: son indices relative to
    the first son row those windows touch, (len(rows) * m2, wh * ww) int64, plus the
    range of son rows [first, last) they touch."""
    i = torch.arange(rows.start, rows.stop, device=device)
    j = torch.arange(geo.m2, device=device)
    ci = (i // geo.scale - geo.window_h // 2).clamp(0, geo.n1 - geo.window_h)  # (rows,)
    cj = (j // geo.scale - geo.window_w // 2).clamp(0, geo.n2 - geo.window_w)  # (m2,)
    first = window_start(rows.start, geo.scale, geo.window_h, geo.n1)
    last = window_start(rows.stop - 1, geo.scale, geo.window_h, geo.n1) + geo.window_h
    a = ci[:, None] - first + torch.arange(geo.window_h, device=device)  # (rows, wh)
    b = cj[:, None] + torch.arange(geo.window_w, device=device)  # (m2, ww)
    n = a[:, None, :, None] * geo.n2 + b[None, :, None, :]  # (rows, m2, wh, ww)
    return n.reshape(len(rows) * geo.m2, geo.num_candidates), first, last


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
    """Query rows in chunks: distances to the son rows their windows touch, then the
    wh*ww in-window candidates per query, then a stable sort (ties to the smaller n,
    NaN last). Temporaries are O(chunk * wh * ww)."""
    work = torch.float64 if ye.dtype == torch.float64 else torch.float32
    B = ye.shape[0]
    q = _query_patches(ye.to(work), geo).flatten(1, 2)  # (B, D, M)
    key = _son_patches(xe.to(work), geo).flatten(1, 2)  # (B, D, N)
    q_norm, key_norm = (q * q).sum(1), (key * key).sum(1)  # (B, M), (B, N)
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(1, B * geo.m2 * (geo.window_h + 1) * geo.n2))
    dist, idx = [], []
    for start in range(0, geo.m1, rows_per_chunk):
        rows = range(start, min(geo.m1, start + rows_per_chunk))
        cand, first, last = _window_candidates(geo, rows, ye.device)  # (Mc, wh*ww)
        keys = slice(first * geo.n2, last * geo.n2)
        queries = slice(rows.start * geo.m2, rows.stop * geo.m2)
        d = (q_norm[:, queries, None] + key_norm[:, None, keys]
             - 2 * q[:, :, queries].transpose(1, 2) @ key[:, :, keys])  # (B, Mc, Nc)
        d = torch.gather(d, 2, cand.expand(B, -1, -1))  # (B, Mc, wh*ww)
        d_sorted, order = torch.sort(d, dim=2, stable=True)
        dist.append(d_sorted[..., :k])
        idx.append(torch.gather(cand.expand(B, -1, -1), 2, order[..., :k]) + first * geo.n2)
    return torch.cat(dist, 1).float(), torch.cat(idx, 1)


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
    work = torch.float64 if ye.dtype == torch.float64 else torch.float32
    B, E = ye.shape[:2]
    k = idx.shape[2]
    q = _query_patches(ye.to(work), geo)  # (B, E, P, M)
    key = _son_patches(xe.to(work), geo)  # (B, E, P, N)
    P = q.shape[2]
    step = max(1, _CHUNK_ELEMENTS // max(1, B * E * P * k))
    out = []
    for start in range(0, geo.num_queries, step):
        m = slice(start, start + step)
        n = idx[:, m]  # (B, Mc, k)
        Mc = n.shape[1]
        neighbours = torch.gather(key, 3, n.reshape(B, 1, 1, Mc * k).expand(B, E, P, Mc * k))
        d = (q[:, :, :, m, None] - neighbours.view(B, E, P, Mc, k)).abs().sum(2)  # (B, E, Mc, k)
        out.append(d.permute(0, 2, 3, 1))
    return torch.cat(out, 1).to(ye.dtype).contiguous()


def edge_features(ye: torch.Tensor, xe: torch.Tensor, idx: torch.Tensor, scale: int = 2,
                  patch: int = 3, stride: int = 2) -> torch.Tensor:
    """diff (B, M, k, E): per channel, sum over patch positions of |query - neighbour|."""
    _check_embeddings(ye, xe, scale)
    geo = _geometry(ye, scale, 1, patch, stride)
    _check_idx(idx, ye.shape[0], geo)
    return _edge_features(ye.detach().contiguous(), xe.detach().contiguous(), idx.contiguous(),
                          scale, patch, stride)


# --------------------------------------------------------------------------- folding

def _fold_hr_constant(values: torch.Tensor, geo: GraphGeometry) -> torch.Tensor:
    """values (B, D, m1, m2), constant over each query's HR patch -> overlap-averaged HR map
    (B, D, sH, sW). A transposed box convolution: no per-patch copy is made."""
    B, D = values.shape[:2]
    box = values.new_ones(1, 1, geo.hr_patch, geo.hr_patch)
    total = F.conv_transpose2d(values.reshape(B * D, 1, geo.m1, geo.m2), box, stride=geo.hr_stride)
    count = F.conv_transpose2d(torch.ones_like(values[:1, :1]), box, stride=geo.hr_stride)
    out = (total / count).view(B, D, *total.shape[-2:])
    s = geo.scale
    top, left = s * geo.query_h.pad_before, s * geo.query_w.pad_before
    return out[..., top: top + s * geo.query_h.size, left: left + s * geo.query_w.size]


def fold_edges(diff: torch.Tensor, lr_hw: tuple[int, int], scale: int = 2, patch: int = 3,
               stride: int = 2) -> torch.Tensor:
    """D_hr (B, k, E, sH, sW): every query's edge features spread over its HR patch with
    overlap averaging (spec section 4). Detached."""
    geo = graph_geometry(lr_hw[0], lr_hw[1], scale, patch, stride)
    if diff.dim() != 4 or diff.shape[1] != geo.num_queries:
        raise ValueError(f"diff must be (B, M, k, E) with M = {geo.num_queries}; "
                         f"got {tuple(diff.shape)}")
    B, M, k, E = diff.shape
    grid = diff.detach().permute(0, 2, 3, 1).reshape(B, k * E, geo.m1, geo.m2)
    return _fold_hr_constant(grid, geo).reshape(B, k, E, scale * lr_hw[0], scale * lr_hw[1])


# --------------------------------------------------------------------------- AdaPN

def _stats(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, P, L) -> mean and sqrt(unbiased var + EPS), each (B, C, L); fp32 or better."""
    work = torch.float64 if blocks.dtype == torch.float64 else torch.float32
    blocks = blocks.to(work)
    mean = blocks.mean(2)
    var = (blocks - mean[:, :, None]).square().sum(2) / (blocks.shape[2] - 1)
    return mean, torch.sqrt(var + EPS)


def query_stats(feat: torch.Tensor, patch: int = 3, stride: int = 2):
    """AdaPN statistics of every query patch of F (B, C, H, W): mean, std (B, C, M)."""
    geo = graph_geometry(feat.shape[2], feat.shape[3], 1, patch, stride)
    return _stats(_query_patches(feat, geo))


def key_stats(feat: torch.Tensor, scale: int = 2, patch: int = 3, stride: int = 2):
    """AdaPN statistics of every key block of F, once per son patch: mean, std (B, C, N)."""
    geo = graph_geometry(feat.shape[2], feat.shape[3], scale, patch, stride)
    return _stats(_key_blocks(feat, geo))


def patch_aggregate(feat: torch.Tensor, idx: torch.Tensor, query: tuple, key: tuple,
                    scale: int = 2, patch: int = 3, stride: int = 2) -> torch.Tensor:
    """knn_hr (B, k, C, sH, sW): each neighbour's key block of F normalised to its query's
    statistics (AdaPN), folded onto the HR grid with overlap averaging (spec section 6).

    query = (mean, std) (B, C, M) and key = (mean, std) (B, C, N) from query_stats and
    key_stats. Channels are processed in chunks so temporaries stay bounded; the result
    is in feat's dtype, computed in fp32 or better.
    """
    if feat.dim() != 4 or feat.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"feat must be a float (B, C, H, W) tensor; got {feat.dtype} "
                         f"{tuple(feat.shape)}")
    B, C, H, W = feat.shape
    geo = graph_geometry(H, W, scale, patch, stride)
    _check_idx(idx, B, geo)
    k = idx.shape[2]
    (mu_q, sigma_q), (mu_k, sigma_k) = query, key
    P = geo.hr_patch ** 2
    blocks = _key_blocks(feat, geo)  # (B, C, P, N), a view-sized copy of F (2.25x)
    work = mu_q.dtype
    step = max(1, _CHUNK_ELEMENTS // max(1, B * P * geo.num_queries))
    out = []
    for r in range(k):
        n = idx[:, :, r]  # (B, M)
        rank = []
        for c0 in range(0, C, step):
            c = slice(c0, c0 + step)
            Cc = blocks[:, c].shape[1]
            alpha = sigma_q[:, c] / torch.gather(sigma_k[:, c], 2, n[:, None].expand(B, Cc, -1))
            beta = mu_q[:, c] - torch.gather(mu_k[:, c], 2, n[:, None].expand(B, Cc, -1)) * alpha
            gathered = torch.gather(blocks[:, c].to(work), 3,
                                    n[:, None, None].expand(B, Cc, P, -1))  # (B, Cc, P, M)
            z = gathered * alpha[:, :, None] + beta[:, :, None]
            rank.append(_fold_hr_blocks(z, geo))
        out.append(torch.cat(rank, 1))
    return torch.stack(out, 1).to(feat.dtype)


def _fold_hr_blocks(z: torch.Tensor, geo: GraphGeometry) -> torch.Tensor:
    """z (B, C, (p*s)^2, M) per-query HR blocks -> overlap-averaged HR map (B, C, sH, sW)."""
    B, C = z.shape[:2]
    s = geo.scale
    padded_hw = (s * (geo.query_h.size + geo.query_h.pad_before + geo.query_h.pad_after),
                 s * (geo.query_w.size + geo.query_w.pad_before + geo.query_w.pad_after))
    total = F.fold(z.flatten(1, 2), padded_hw, geo.hr_patch, stride=geo.hr_stride)
    count = F.fold(torch.ones_like(z[:1, :1]).flatten(1, 2), padded_hw, geo.hr_patch,
                   stride=geo.hr_stride)
    top, left = s * geo.query_h.pad_before, s * geo.query_w.pad_before
    return (total / count)[..., top: top + s * geo.query_h.size, left: left + s * geo.query_w.size]


def weighted_sum(knn: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """sum_r softmax_r(logits) * knn[:, r]: knn (B, k, C, h, w), logits (B, k, h, w)."""
    if logits.shape != knn.shape[:2] + knn.shape[3:]:
        raise ValueError(f"logits must be (B, k, h, w) = {tuple(knn.shape[:2] + knn.shape[3:])}; "
                         f"got {tuple(logits.shape)}")
    work = torch.float64 if logits.dtype == torch.float64 else torch.float32
    weights = torch.softmax(logits.to(work), dim=1).to(knn.dtype)
    return torch.einsum("bkhw,bkchw->bchw", weights, knn)
