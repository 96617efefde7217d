"""The memory-efficient torch backend of the graph-aggregation ops: the sibling of the
Triton kernels (kernels/), used on the CPU, on CUDA without triton, for fp64 (the tests'
oracle precision) and for a deterministic aggregation backward.

Each function takes checked, contiguous inputs and a `GraphGeometry` (ops.py validates,
registers and dispatches). None holds the (B, M, N) distance matrix or the
(B, M, 9*C*s^2, k) gathered tensor of the released code: temporaries are bounded by the
chunk sizes below. Arithmetic is in fp32, or fp64 for fp64 inputs. An idx entry outside
[0, N) is never read: NaN wherever it is used, no contribution to any gradient but the
logits' (ops.py's docstring).

Names: M = m1 x m2 query patches (LR, p x p, stride t), N = n1 x n2 son patches (LR / s),
k ranks, ps = p*s and ts = t*s the HR patch and stride; a key block is the ps x ps block of
F under a son patch. The padded HR map is laid out in phases (Cc, m1 + X, ts, m2 + X, ts),
X = slots - 1 extra phase rows past the last query row, so that query (i, j)'s HR block
lands in phase rows i .. i + X: the fold is a few strided adds.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake

from .geometry import EPS, GraphGeometry, PatchGrid, estimate_starts, even_step

# Bound on the elements of a channel chunk's buffers in the aggregation: 16 MiB in fp32,
# under glibc's 32 MiB ceiling for serving a block from the heap, so that every chunk and
# rank reuses the memory of the one before instead of faulting in fresh pages (measured:
# one rank at LR 256x256, 130 ms with 128 MiB chunks -> 79 ms).
CHUNK_ELEMENTS = 1 << 22
GATHER_ELEMENTS = 1 << 20  # a gathered chunk of the aggregation: 4 MiB in fp32, cache-sized
KNN_TILE = 16  # queries a side of a tile of the k-NN search


def work_dtype(t: torch.Tensor) -> torch.dtype:
    """fp32 accumulation, or fp64 for fp64 inputs (the tests' oracle precision)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _bad_idx(idx: torch.Tensor, num_keys: int):
    """(idx with its entries outside [0, N) replaced by 0, their mask), or (idx, None) when
    there are none."""
    bad = (idx < 0) | (idx >= num_keys)
    if not bad.any():
        return idx, None
    return idx.masked_fill(bad, 0), bad


# --------------------------------------------------------------------------- patches

def pad_to_grid(x: torch.Tensor, grid: PatchGrid) -> torch.Tensor:
    """x (..., H, W) zero-padded to exactly cover the grid's patches."""
    H, W = x.shape[-2:]
    return F.pad(x, (grid.pad_left, (grid.grid_w - 1) * grid.stride + grid.patch - grid.pad_left - W,
                     grid.pad_top, (grid.grid_h - 1) * grid.stride + grid.patch - grid.pad_top - H))


def patches(x: torch.Tensor, grid: PatchGrid) -> torch.Tensor:
    """(B, C, patch^2, grid_h * grid_w): the patches of a grid (a copy: callers bound its
    size)."""
    B, C = x.shape[:2]
    unfolded = F.unfold(pad_to_grid(x, grid), grid.patch, stride=grid.stride)
    return unfolded.view(B, C, grid.patch ** 2, grid.grid_h * grid.grid_w)


def _grid_rows(padded: torch.Tensor, patch: int, stride: int, r0: int, r1: int) -> torch.Tensor:
    """(B, C * patch^2, r1 - r0, grid_w): the patch vectors of grid rows r0 .. r1 - 1 of a
    map padded to its grid."""
    band = padded[:, :, r0 * stride: (r1 - 1) * stride + patch]
    grid_w = (padded.shape[3] - patch) // stride + 1
    return F.unfold(band, patch, stride=stride).view(band.shape[0], -1, r1 - r0, grid_w)


def _patch_sqnorms(padded: torch.Tensor, patch: int, stride: int) -> torch.Tensor:
    """(B, grid_h, grid_w): the squared norm of every patch vector of a map padded to its
    grid, as a sum-pooling of the pixels' squared norms."""
    box = padded.new_ones(1, 1, patch, patch)
    return F.conv2d(padded.square().sum(1, keepdim=True), box, stride=stride)[:, 0]


# --------------------------------------------------------------------------- matching

def _window_axis(geo: GraphGeometry, axis: int, first: int, last: int):
    """Along one axis (0: rows, 1: columns), for the queries first .. last - 1: their
    windows' first son rows (or columns) as a list, and the son range [lo, hi) that those
    windows cover together (starts never decrease)."""
    window = geo.window_h if axis == 0 else geo.window_w
    starts = [geo.window_start(axis, i) for i in range(first, last)]
    return starts, starts[0], starts[-1] + window


def patch_knn(ye: torch.Tensor, xe: torch.Tensor, k: int, geo: GraphGeometry):
    """dist (B, M, k) float32, idx (B, M, k) int64 (ops.patch_knn). Square tiles of KNN_TILE
    x KNN_TILE queries: one matmul gives their distances (|q|^2 + |key|^2 - 2 q.key) to the
    son patches of the rectangle their windows cover together, each query's wh x ww window
    is gathered from it, and its k nearest are selected by k_smallest (ties to the smaller
    n, NaN last). Patch vectors are unfolded a row of tiles at a time: temporaries are
    O(tile * width * (window + tile)), never O(M)."""
    work = work_dtype(ye)
    B, dev = ye.shape[0], ye.device
    p, t, wh, ww = geo.patch, geo.stride, geo.window_h, geo.window_w
    q_map, key_map = pad_to_grid(ye.to(work), geo.query_grid), pad_to_grid(xe.to(work), geo.son_grid)
    q_norm, key_norm = _patch_sqnorms(q_map, p, t), _patch_sqnorms(key_map, p, t)
    dist = torch.empty(B, geo.m1, geo.m2, k, dtype=torch.float32, device=dev)
    idx = torch.empty(B, geo.m1, geo.m2, k, dtype=torch.int64, device=dev)
    tile_rows, tile_cols = range(0, geo.m1, KNN_TILE), range(0, geo.m2, KNN_TILE)
    if is_fake(ye):  # a memory estimate
        tile_rows, tile_cols = estimate_starts(tile_rows), estimate_starts(tile_cols)
    for i0 in tile_rows:
        i1 = min(geo.m1, i0 + KNN_TILE)
        row_starts, r0, r1 = _window_axis(geo, 0, i0, i1)
        rows = torch.tensor(row_starts, device=dev)[:, None] + torch.arange(wh, device=dev)
        q_rows = _grid_rows(q_map, p, t, i0, i1)  # (B, D, i1 - i0, m2)
        key_rows = _grid_rows(key_map, p, t, r0, r1)  # (B, D, r1 - r0, n2)
        for j0 in tile_cols:
            j1 = min(geo.m2, j0 + KNN_TILE)
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
            d, pos = k_smallest(torch.gather(d, 2, local.expand(B, -1, -1)), k)
            dist[:, i0:i1, j0:j1] = d.view(B, i1 - i0, j1 - j0, k)
            idx[:, i0:i1, j0:j1] = torch.gather(n.expand(B, -1, -1), 2, pos).view(
                B, i1 - i0, j1 - j0, k)
    return dist.view(B, geo.num_queries, k), idx.view(B, geo.num_queries, k)


def k_smallest(d: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
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


def edge_features(ye, xe, idx, geo: GraphGeometry) -> torch.Tensor:
    """diff (B, M, k, E) (ops.edge_features). Patch vectors laid out (B, M | N, p*p, E), so
    that a chunk of queries' neighbours is one index_select of whole rows and their
    differences with the chunk's query rows (copied out of the unfold's strided view first:
    the op 1.8x faster at LR 256x256) reduce straight into the output layout."""
    work = work_dtype(ye)
    idx, bad = _bad_idx(idx, geo.num_keys)
    B, E = ye.shape[:2]
    k = idx.shape[2]
    q = patches(ye.to(work), geo.query_grid).permute(0, 3, 2, 1)  # (B, M, P, E), a view
    key = patches(xe.to(work), geo.son_grid).permute(0, 3, 2, 1).contiguous()  # (B, N, P, E)
    P = key.shape[2]
    out = torch.empty(B, geo.num_queries, k, E, dtype=work, device=ye.device)
    step = max(1, GATHER_ELEMENTS // max(1, E * P * k))
    for b in range(B):
        for start in range(0, geo.num_queries, step):
            m = slice(start, start + step)
            n = idx[b, m]  # (Mc, k)
            neighbours = key[b].index_select(0, n.flatten()).view(*n.shape, P, E)
            rows = q[b, m].contiguous()  # (Mc, P, E), read in order below
            torch.sum(neighbours.sub_(rows[:, None]).abs_(), 2, out=out[b, m])
    if bad is not None:
        out.masked_fill_(bad[..., None], float("nan"))
    return out.to(ye.dtype)


# --------------------------------------------------------------------------- folding

def phases(geo: GraphGeometry, i0: int, rows: int, cols: int):
    """Pairs (block offsets, phase-layout slice) that map the (ps, ps) blocks of query rows
    i0 .. i0 + rows (all `cols` columns) onto the padded HR layout (Cc, m1 + X, ts, m2 + X,
    ts): the block of query (i, j) lies at padded HR rows ts*i .. ts*i + ps, so offset u
    lands in phase row i + u // ts, row u % ts. slots^2 pairs (4 for IGNN)."""
    ps, ts = geo.hr_patch, geo.hr_stride
    for qu in range(geo.slots):
        u = slice(qu * ts, min(ps, qu * ts + ts))
        for qv in range(geo.slots):
            v = slice(qv * ts, min(ps, qv * ts + ts))
            yield (u, v), (slice(None), slice(i0 + qu, i0 + qu + rows), slice(0, u.stop - u.start),
                           slice(qv, qv + cols), slice(0, v.stop - v.start))


def _fold_rows_(hr: torch.Tensor, z: torch.Tensor, i0: int, geo: GraphGeometry) -> None:
    """hr (Cc, m1 + X, ts, m2 + X, ts) += the fold of z (rows, m2, Cc, ps, ps), the HR blocks
    of query rows i0 .. i0 + rows: a few strided adds instead of col2im's per-element loop."""
    for (u, v), dst in phases(geo, i0, *z.shape[:2]):
        hr[dst].add_(z[:, :, :, u, v].permute(2, 0, 3, 1, 4))


def _unfold_rows(dz: torch.Tensor, d: torch.Tensor, i0: int, geo: GraphGeometry) -> None:
    """dz (rows, m2, Cc, ps, ps) = the HR blocks of query rows i0 .. i0 + rows read from d
    (Cc, m1 + X, ts, m2 + X, ts): the adjoint of _fold_rows_ (every block offset once)."""
    for (u, v), src in phases(geo, i0, *dz.shape[:2]):
        dz[:, :, :, u, v] = d[src].permute(1, 3, 0, 2, 4)


def hr_count(geo: GraphGeometry, like: torch.Tensor) -> torch.Tensor:
    """(padded sH, padded sW): how many query HR patches cover each padded HR pixel."""
    padded_hw = (geo.scale * geo.query_h.padded, geo.scale * geo.query_w.padded)
    ones = like.new_ones(1, geo.hr_patch ** 2, geo.num_queries)
    return F.fold(ones, padded_hw, geo.hr_patch, stride=geo.hr_stride)[0, 0]


def _hr_crop(geo: GraphGeometry, like: torch.Tensor):
    """(crop, count): the (channel, row, col) slices of the HR map in the flattened padded
    phase layout, and that map's cover counts (sH, sW)."""
    crop = (slice(None), slice(geo.hr_top, geo.hr_top + geo.hr_height),
            slice(geo.hr_left, geo.hr_left + geo.hr_width))
    return crop, hr_count(geo, like)[crop[1:]]


def fold_constant(values: torch.Tensor, geo: GraphGeometry) -> torch.Tensor:
    """values (B, D, m1, m2), constant over each query's patch at the geometry's scale s ->
    overlap-averaged map (B, D, sH, sW); no per-patch copy is made. GPUs and torch.compile:
    a transposed box convolution (cuDNN; inductor takes many minutes over the strided adds);
    eager CPU: slots^2 broadcast adds into the phase layout (_fold_rows_), about 4x faster
    there than the convolution (measured: E = 64, LR 128x128)."""
    if values.device.type != "cpu" or torch.compiler.is_compiling():
        return fold_constant_conv(values, geo)
    B, D, m1, m2 = values.shape
    ps, ts, X = geo.hr_patch, geo.hr_stride, geo.slots - 1
    crop, count = _hr_crop(geo, values)
    out = []
    for b in range(B):
        total = values.new_zeros(D, m1 + X, ts, m2 + X, ts)
        blocks = values[b].permute(1, 2, 0)[:, :, :, None, None].expand(m1, m2, D, ps, ps)
        _fold_rows_(total, blocks, 0, geo)
        out.append(total.view(D, (m1 + X) * ts, (m2 + X) * ts)[crop] / count)
    return torch.stack(out)


def fold_constant_conv(values: torch.Tensor, geo: GraphGeometry) -> torch.Tensor:
    """fold_constant as a transposed box convolution (the GPU and compiled path)."""
    B, D = values.shape[:2]
    box = values.new_ones(1, 1, geo.hr_patch, geo.hr_patch)
    total = F.conv_transpose2d(values.reshape(B * D, 1, geo.m1, geo.m2), box, stride=geo.hr_stride)
    count = F.conv_transpose2d(torch.ones_like(values[:1, :1]), box, stride=geo.hr_stride)
    out = (total / count).view(B, D, *total.shape[-2:])
    return out[..., geo.hr_top: geo.hr_top + geo.hr_height,
               geo.hr_left: geo.hr_left + geo.hr_width]


# --------------------------------------------------------------------------- AdaPN

def _stats(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, P, L) -> mean and sqrt(unbiased var + EPS), each (B, C, L); two-pass."""
    blocks = blocks.to(work_dtype(blocks))
    mean = blocks.mean(2)
    var = (blocks - mean[:, :, None]).square().sum(2) / (blocks.shape[2] - 1)
    return mean, torch.sqrt(var + EPS)


def patch_stats(feat: torch.Tensor, grid: PatchGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """mean, std (B, C, grid_h * grid_w) of the grid's patches of F, a few channels at a
    time: each chunk's (B, Cc, P, L) unfold and its temporaries stay cache-sized (about
    GATHER_ELEMENTS) instead of 2.25x F each, and every statistic sums the same terms in the
    same order as on the whole map."""
    B, C = feat.shape[:2]
    step = max(1, GATHER_ELEMENTS // (B * grid.patch ** 2 * grid.grid_h * grid.grid_w))
    if step >= C:
        return _stats(patches(feat, grid))
    parts = [_stats(patches(feat[:, c0: c0 + step], grid)) for c0 in range(0, C, step)]
    return torch.cat([m for m, _ in parts], 1), torch.cat([s for _, s in parts], 1)


def patch_stats_backward(feat, mean, std, grad_mean, grad_std, grid: PatchGrid) -> torch.Tensor:
    """The gradient on F: d mean / dx = 1/P, d std / dx = (x - mean) / ((P - 1) std), folded
    back over the grid."""
    blocks = patches(feat.to(mean.dtype), grid)
    P = blocks.shape[2]
    cols = (grad_mean[:, :, None] / P
            + grad_std[:, :, None] * (blocks - mean[:, :, None]) / ((P - 1) * std[:, :, None]))
    H, W = feat.shape[-2:]
    padded_hw = ((grid.grid_h - 1) * grid.stride + grid.patch,
                 (grid.grid_w - 1) * grid.stride + grid.patch)
    grad = F.fold(cols.flatten(1, 2), padded_hw, grid.patch, stride=grid.stride)
    return grad[..., grid.pad_top: grid.pad_top + H, grid.pad_left: grid.pad_left + W].contiguous()


# --------------------------------------------------------------------------- aggregation

def cpu_chunks(geo: GraphGeometry, C: int) -> tuple[int, int]:
    """(channels per chunk, query rows per gather of the backward): a chunk's key blocks
    (N, Cc, ps^2) and padded HR buffer (Cc, ~sH, ~sW) stay under CHUNK_ELEMENTS, a gather
    (rows * m2, Cc, ps^2) under GATHER_ELEMENTS. Chunks are of equal width (the last may
    be narrower by less than their number)."""
    ps, ts, X = geo.hr_patch, geo.hr_stride, geo.slots - 1
    per_channel = max(geo.num_keys * ps * ps, (geo.m1 + X) * (geo.m2 + X) * ts * ts)
    most = max(1, min(C, CHUNK_ELEMENTS // per_channel))
    cc = even_step(C, most)
    return cc, max(1, min(geo.m1, GATHER_ELEMENTS // max(1, geo.m2 * cc * ps * ps)))


def offset_rows(geo: GraphGeometry, cc: int) -> int:
    """Query rows per step of the aggregation's forward: one offset's gathered pixels
    (cc, rows * m2) stay under a quarter of GATHER_ELEMENTS (cache-sized)."""
    return max(1, min(geo.m1, GATHER_ELEMENTS // 4 // max(1, geo.m2 * cc)))


def _key_offsets(feat_c: torch.Tensor, geo: GraphGeometry) -> torch.Tensor:
    """(ps^2, Cc, N): for every offset (u, v) inside a key block, the pixel of F (Cc, H, W)
    at that offset in every son patch's block, contiguous (one copy out of a strided view
    of the padded map), so that the neighbours' pixels at one offset are one index_select
    from a compact array (about 4x faster than gathering from the padded map itself)."""
    grid = geo.key_grid
    Cc = feat_c.shape[0]
    padded = pad_to_grid(feat_c, grid)
    Hp, Wp = padded.shape[1:]
    view = padded.as_strided((grid.patch, grid.patch, Cc, grid.grid_h, grid.grid_w),
                             (Wp, 1, Hp * Wp, grid.stride * Wp, grid.stride),
                             padded.storage_offset())
    return view.reshape(grid.patch ** 2, Cc, grid.grid_h * grid.grid_w)


def _offset_phases(geo: GraphGeometry, i0: int, rows: int):
    """Pairs ((u, v), polyphase index) for every offset of a (ps, ps) block, in the order of
    `phases` (phase, then offset within it): offset (u, v) of the blocks of query rows
    i0 .. i0 + rows lands at (Cc, rows, m2) positions of the polyphase HR layout (Cc, ts, ts,
    m1 + X, m2 + X), padded HR pixel (ts I + a, ts J + b) at [:, a, b, I, J]."""
    ts = geo.hr_stride
    for (us, vs), _ in phases(geo, i0, rows, geo.m2):
        for u in range(us.start, us.stop):
            for v in range(vs.start, vs.stop):
                yield (u, v), (slice(None), u % ts, v % ts,
                               slice(i0 + u // ts, i0 + u // ts + rows),
                               slice(v // ts, v // ts + geo.m2))


def unpolyphase_in_place(geo: GraphGeometry) -> bool:
    """Whether `_unpolyphase` reads the polyphase buffer in one pass (the HR map starts on a
    phase boundary and spans whole phases: IGNN's maps at x2 and x4, and at x3 for even
    sizes); else it makes a padded HR copy first."""
    ts = geo.hr_stride
    return not (geo.hr_top % ts or geo.hr_left % ts or geo.hr_height % ts
                or geo.hr_width % ts)


def _unpolyphase(poly: torch.Tensor, count: torch.Tensor, geo: GraphGeometry,
                 out: torch.Tensor) -> torch.Tensor:
    """out (Cc, sH, sW) = the HR map held in the polyphase layout (Cc, ts, ts, m1 + X,
    m2 + X), cropped, divided by the cover counts (sH, sW); through the padded HR layout
    unless `unpolyphase_in_place`."""
    ts = geo.hr_stride
    Cc, sH, sW = out.shape
    phases_of = poly.permute(0, 3, 1, 4, 2)  # (Cc, m1 + X, ts, m2 + X, ts), a view
    if not unpolyphase_in_place(geo):
        hr = phases_of.contiguous().view(Cc, phases_of.shape[1] * ts, phases_of.shape[3] * ts)
        return torch.div(hr[:, geo.hr_top: geo.hr_top + sH, geo.hr_left: geo.hr_left + sW],
                         count, out=out)
    I0, J0 = geo.hr_top // ts, geo.hr_left // ts
    region = phases_of[:, I0: I0 + sH // ts, :, J0: J0 + sW // ts]
    torch.div(region, count.view(sH // ts, ts, sW // ts, ts),
              out=out.view(Cc, sH // ts, ts, sW // ts, ts))
    return out


def aggregate(feat, idx, stats, logits, geo: GraphGeometry, out=None) -> torch.Tensor:
    """knn_hr (B, k, C, sH, sW), or with logits x1_hr (B, C, sH, sW) (ops.patch_aggregate);
    stats = (query mean, query std, key mean, key std). knn_hr is written into `out` when
    given (contiguous; each value rounded once to its dtype, as by the final .to()).

    Per (item, channel chunk, rank, a few query rows) and per offset (u, v) of the key
    blocks: gather the neighbours' pixels at that offset (from (Cc, N) rows),
    normalise them (one addcmul) and add them, a contiguous (Cc, rows, m2) slab, into one
    reused polyphase HR buffer (Cc, ts, ts, m1 + X, m2 + X). The offsets run in the order
    of `phases`, so every HR pixel sums the same terms in the same order as _fold_rows_.
    Large temporaries are allocated once per call and reused: on CPU a fresh one costs its
    page faults, about as much as the arithmetic."""
    B, C, H, W = feat.shape
    k = idx.shape[2]
    idx, bad = _bad_idx(idx, geo.num_keys)
    ps, ts, m1, m2, X = geo.hr_patch, geo.hr_stride, geo.m1, geo.m2, geo.slots - 1
    work = stats[0].dtype
    count = _hr_crop(geo, stats[0])[1]
    cc = cpu_chunks(geo, C)[0]
    rows = offset_rows(geo, cc)
    poly = torch.empty(cc, ts, ts, m1 + X, m2 + X, dtype=work, device=feat.device)
    gathered = torch.empty(cc * rows * m2, dtype=work, device=feat.device)
    hr_shape = (geo.hr_height, geo.hr_width)
    if logits is None:
        if out is None:
            out = torch.empty(B, k, C, *hr_shape, dtype=work, device=feat.device)
    else:
        out = torch.zeros(B, C, *hr_shape, dtype=work, device=feat.device)
        weights = torch.softmax(logits.to(work), dim=1)
        knn = torch.empty(cc, *hr_shape, dtype=work, device=feat.device)
    for b in range(B):
        for c0 in range(0, C, cc):
            c = slice(c0, min(C, c0 + cc))
            width = c.stop - c.start
            offsets = _key_offsets(feat[b, c].to(work), geo)  # (ps^2, width, N)
            q_mean, q_std, k_mean, k_std = (t[b, c] for t in stats)  # (width, M | N)
            fold = poly[:width]
            # per step of query rows, its (source offset, destination slab) pairs: the same
            # views for every rank, made once
            steps = [(i0, min(m1, i0 + rows),
                      [(offsets[u * ps + v], fold[dst])
                       for (u, v), dst in _offset_phases(geo, i0, min(m1 - i0, rows))])
                     for i0 in range(0, m1, rows)]
            for r in range(k):
                fold.zero_()
                for i0, i1, pairs in steps:
                    m = slice(i0 * m2, i1 * m2)
                    n = idx[b, m, r]
                    alpha = q_std[:, m] / k_std[:, n]  # (width, rows * m2)
                    if bad is not None:
                        alpha.masked_fill_(bad[b, m, r], float("nan"))
                    beta = q_mean[:, m] - k_mean[:, n] * alpha
                    z = gathered[: width * n.numel()].view(width, n.numel())
                    slab = z.view(width, i1 - i0, m2)
                    n_rows = n.expand(width, -1)  # a gather on 2 threads, index_select on 1
                    for source, dst in pairs:
                        torch.gather(source, 1, n_rows, out=z)
                        torch.addcmul(beta, z, alpha, out=z)
                        dst.add_(slab)
                if logits is None:
                    _unpolyphase(fold, count, geo, out=out[b, r, c])
                else:
                    out[b, c].addcmul_(_unpolyphase(fold, count, geo, out=knn[:width]),
                                       weights[b, r])
    return out.to(feat.dtype)


def _key_block_rows(feat_c: torch.Tensor, geo: GraphGeometry) -> torch.Tensor:
    """(N, Cc, ps^2): one item's key blocks of F (Cc, H, W), a son patch per row (one copy
    out of a strided view of the padded map), so that gathering neighbours is index_select."""
    grid = geo.key_grid
    Cc = feat_c.shape[0]
    padded = pad_to_grid(feat_c, grid)
    Hp, Wp = padded.shape[1:]
    view = padded.as_strided((grid.grid_h, grid.grid_w, Cc, grid.patch, grid.patch),
                             (grid.stride * Wp, grid.stride, Hp * Wp, Wp, 1),
                             padded.storage_offset())
    return view.reshape(grid.grid_h * grid.grid_w, Cc, grid.patch ** 2)


class _Chunk:
    """One (item b, channel slice c) of the backward: its key blocks (N, Cc, ps^2), the
    statistics (M | N, Cc) contiguous, and the gradients accumulated for them."""

    def __init__(self, feat, stats, b: int, c: slice, geo: GraphGeometry):
        self.b, self.c = b, c
        self.width = c.stop - c.start
        self.blocks = _key_block_rows(feat[b, c].to(stats[0].dtype), geo)
        self.q_mean, self.q_std, self.k_mean, self.k_std = (
            t[b, c].T.contiguous() for t in stats)
        self.d_blocks = torch.zeros_like(self.blocks)
        self.d_k_mean, self.d_k_std = torch.zeros_like(self.k_mean), torch.zeros_like(self.k_std)


def aggregate_backward(feat, idx, stats, logits, grad_out, geo: GraphGeometry):
    """[grad_feat, grad of each statistic, grad_logits (empty without logits)]: the
    vector-Jacobian products of `aggregate`, per (item, channel chunk, rank, query rows),
    deterministic. The upstream gradient over the overlap average is read back per block
    (_unfold_rows), the key blocks' gradient is accumulated with index_add_ over the ranks
    and folded onto F once per chunk. The logits' gradient is the softmax backward of
    g_r = <dx1, knn_r> (knn_r refolded as the forward does)."""
    B, C, H, W = feat.shape
    k = idx.shape[2]
    idx, bad = _bad_idx(idx, geo.num_keys)
    ps, ts, m1, m2, X = geo.hr_patch, geo.hr_stride, geo.m1, geo.m2, geo.slots - 1
    work, dev = stats[0].dtype, feat.device
    crop, count = _hr_crop(geo, stats[0])
    grid = geo.key_grid
    cc, rows = cpu_chunks(geo, C)
    upstream = torch.empty(cc, m1 + X, ts, m2 + X, ts, dtype=work, device=dev)  # dx / count
    d_padded = torch.empty(cc, grid.grid_h + X, ts, grid.grid_w + X, ts, dtype=work, device=dev)
    gathered = torch.empty(rows * m2 * cc * ps * ps, dtype=work, device=dev)
    d_gathered = torch.empty_like(gathered)
    weights = None if logits is None else torch.softmax(logits.to(work), dim=1)  # (B, k, ..)
    if weights is not None:
        refolded = torch.empty_like(upstream)  # knn_r, for the logits' gradient
        g = torch.zeros_like(weights)  # (B, k, sH, sW)
        scaled = weights / count  # the upstream of rank r is dx1 * w_r, then / count
    d_feat = torch.zeros(feat.shape, dtype=work, device=dev)
    d_stats = [torch.zeros_like(t) for t in stats]
    for b in range(B):
        for c0 in range(0, C, cc):
            ch = _Chunk(feat, stats, b, slice(c0, min(C, c0 + cc)), geo)
            up = upstream[:ch.width]
            up_map = up.view(ch.width, (m1 + X) * ts, (m2 + X) * ts)
            for r in range(k):
                up_map.zero_()
                if weights is None:
                    torch.div(grad_out[b, r, ch.c].to(work), count, out=up_map[crop])
                else:
                    torch.mul(grad_out[b, ch.c].to(work), scaled[b, r], out=up_map[crop])
                    refolded[:ch.width].zero_()
                for i0 in range(0, m1, rows):
                    i1 = min(m1, i0 + rows)
                    size = (i1 - i0) * m2 * ch.width * ps * ps
                    _rank_rows_backward(
                        ch, d_stats, n=idx[b, i0 * m2: i1 * m2, r],
                        bad=None if bad is None else bad[b, i0 * m2: i1 * m2, r, None, None],
                        queries=slice(i0 * m2, i1 * m2), i0=i0, up=up,
                        refolded=None if weights is None else refolded[:ch.width],
                        z=gathered[:size], dz=d_gathered[:size], geo=geo)
                if weights is not None:
                    knn = refolded[:ch.width].view(ch.width, (m1 + X) * ts, (m2 + X) * ts)
                    g[b, r].add_((grad_out[b, ch.c].to(work) * knn[crop] / count).sum(0))
            # the key blocks' gradient onto F: the same phase fold on the son grid
            d_pad = d_padded[:ch.width]
            d_pad.zero_()
            _fold_rows_(d_pad, ch.d_blocks.view(grid.grid_h, grid.grid_w, ch.width, ps, ps),
                        0, geo)
            d_map = d_pad.view(ch.width, (grid.grid_h + X) * ts, (grid.grid_w + X) * ts)
            d_feat[b, ch.c].add_(d_map[:, grid.pad_top: grid.pad_top + H,
                                       grid.pad_left: grid.pad_left + W])
            d_stats[2][b, ch.c].add_(ch.d_k_mean.T)
            d_stats[3][b, ch.c].add_(ch.d_k_std.T)
    grad_logits = (feat.new_empty(0) if logits is None else
                   (weights * (g - (weights * g).sum(1, keepdim=True))).to(logits.dtype))
    return [d_feat, *d_stats, grad_logits]


def _rank_rows_backward(ch: _Chunk, d_stats, *, n, bad, queries: slice, i0: int, up,
                        refolded, z, dz, geo: GraphGeometry) -> None:
    """One rank's gradients for the queries of a few rows (neighbours n): the key blocks'
    and key statistics' into ch, the query statistics' into d_stats; with `refolded`, the
    rank's normalised blocks are folded into it as the forward does (for the logits)."""
    rows, width, ps, m2 = len(n) // geo.m2, ch.width, geo.hr_patch, geo.m2
    z = z.view(len(n), width, ps * ps)
    torch.index_select(ch.blocks, 0, n, out=z)
    dz = dz.view(len(n), width, ps * ps)
    _unfold_rows(dz.view(rows, m2, width, ps, ps), up, i0, geo)
    if bad is not None:  # no gradient through an entry outside [0, N)
        dz.masked_fill_(bad, 0.0)
    sigma_kn, mu_kn = ch.k_std[n], ch.k_mean[n]  # (rows * m2, width)
    alpha = ch.q_std[queries] / sigma_kn
    d_alpha = (dz * z).sum(2)
    d_beta = dz.sum(2)
    if refolded is not None:  # this rank's normalised blocks, folded as forward
        z.mul_(alpha[:, :, None]).add_((ch.q_mean[queries] - mu_kn * alpha)[:, :, None])
        if bad is not None:  # NaN there, as the forward's
            z.masked_fill_(bad, float("nan"))
        _fold_rows_(refolded, z.view(rows, m2, width, ps, ps), i0, geo)
    ch.d_blocks.index_add_(0, n, dz.mul_(alpha[:, :, None]))
    d_alpha -= d_beta * mu_kn  # beta = mu_q - mu_kn * alpha
    d_stats[0][ch.b, ch.c, queries].add_(d_beta.T)
    d_stats[1][ch.b, ch.c, queries].add_((d_alpha / sigma_kn).T)
    ch.d_k_mean.index_add_(0, n, -d_beta * alpha)
    ch.d_k_std.index_add_(0, n, -d_alpha * alpha / sigma_kn)
