"""Windowed patch k-NN (fused squared-L2 distance + top-k, no M x window array) and edge features.
Cost: FLOPs ~ 2*M*wh*ww*p^2*E (x ~1.2 window-union halo); bytes ~ 2(|ye|+|xe|) (packing) + |ye| + |xe| + 12*B*M*k (out); diff: 3*M*k*p^2*E FLOPs, ~2*M*k*p^2*E elements gathered.
Must match reference.graph.patch_knn (dist, idx; NaN ranks last, in-window) and reference.graph.edge_features (diff).

Design
------
* Layout. A packing kernel writes each embedding once as a zero-padded channels-last copy
  (B, h + pads, w + pads, EP), EP = E rounded up to the channel block. This is 1x the map, not
  an unfold (p^2 x): it removes every bounds check from the inner loop (the spatial zero
  padding of spec section 2 and the channel padding that tl.dot's K >= 16 needs are real
  zeros) and makes every operand load a contiguous run of channels (its cost:
  profiling/NOTES.md).
* Squared norms |q|^2, |k|^2 of every patch come from a small pre-pass kernel (fp32), so the
  main loop only does dot products: dist = (|q|^2 + |k|^2) - 2 q.k, the reference's formula.
* Main kernel: one program = BLOCK_QR x BLOCK_QC neighbouring queries (default 8 x 8). Their
  windows overlap almost entirely, so the program scans the union of their windows (son rows
  ci(i0) .. ci(i_last)+wh-1 by columns cj(j0) .. cj(j_last)+ww-1, flattened) in tiles of
  BLOCK_N candidates (default 32); at w = 30 the union adds ~20% of candidates that get
  masked out per query. A tile's son rows and columns are carried from tile to tile (one int32
  row << 16 | column per candidate, advanced by an add and a carry: no integer division in
  the loop), and the in-window test is two unsigned compares per (query, candidate) pair.
  Per tile, a K loop over p*p positions x EP/BLOCK_E channel blocks runs tl.dot(queries
  (BM, BE), candidates (BE, BN)) into an fp32 accumulator: fp16 / bf16 on tensor cores
  (wgmma on sm_90: 64 query rows = one warpgroup tile), fp32 as "tf32x3" (three tf32
  tensor-core passes, fp32-level accuracy, faster than the FMA "ieee" path, which
  dataclasses.replace(default_knn_config(E, k, dtype), fp32_precision="ieee") selects).
* Top-k in registers. A distance becomes an int32 whose signed order is the float order
  (bits, or bits ^ 0x7fffffff when negative; NaN canonicalised to +qNaN so it ranks after
  +inf), then an int64 key (sortable << 32) | n: "smaller key" is exactly "smaller distance,
  ties to the smaller n, NaN last"; candidates outside a query's own window get INT64_MAX.
  A program keeps each query's k best keys as an unsorted (BM, KPAD) set, its maximum (the
  threshold key) and that key's distance thr_d in fp32 (NaN while the set has an empty
  slot). Per tile, a pre-test on the fp32 distances, inside & ~(d >= thr_d), keeps every
  candidate whose key can be below the threshold key: a smaller d, a NaN d, and any d while
  thr_d is NaN. A tie d == thr_d cannot be: tiles visit son indices n in ascending order,
  so a candidate's n is larger than that of every key in the set (and d is never -0.0:
  |q|^2 + |k|^2 is +0 or more, and +0 - (+-0) = +0). When no candidate of the block
  passes, the tile is done without building a key; otherwise the keys are built and a while
  loop inserts each row's tile minimum in place of the set's maximum until no row has a
  candidate below its threshold (at most k rounds). At the end k rounds of tl.min emit the set in ascending
  order and the keys are decoded. idx is always an in-window index, NaN or not.
* Split scans. With few query blocks (LR 128x128: 64 blocks for an H100's 132 SMs) one
  program per block leaves SMs idle, and each program is one long dependent chain of tiles.
  The launcher then gives each block `splits` programs (auto_splits: enough to fill the
  resident slots of one wave), each scanning a contiguous share of its tiles in the same
  ascending order (so the strict pre-test stays exact) and writing its unsorted set of k keys;
  a small merge kernel takes each query's k smallest of its splits * k keys. Exact, since
  every candidate is scanned by one share that keeps it if it is among its k best; extra
  memory splits * k int64 per query.
* Edge features: a second, memory-bound kernel. The ops API hands idx in separately, and
  the work is ~1/(wh*ww) of the matching, so fusing it would only add registers to the hot
  loop. One program = BLOCK_Q (query, rank) pairs x BLOCK_E channels; it gathers both
  patches from the packed channels-last copies and sums |q - k| in fp32. An idx outside
  [0, N) reads nothing and gives NaN (as the aggregation does).
* Sizes: a patch's offset in a packed map is int64 (an LR map of 33 MP at E = 64 passes
  2^31 elements); the son-grid limit of the packed son rows and columns and the int32
  bounds are checked in the launchers (_check_sizes), with an error that says to tile.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..geometry import GraphGeometry, graph_geometry
from .aot import launch_spec
from .utils import (SUPPORTED, TILE_ADVICE, TL_TYPES, check_int32, check_tensor, grid, launch,
                    on_tensor_device, record_launches)

__all__ = ["KnnConfig", "EdgeConfig", "patch_knn", "edge_features", "default_knn_config",
           "default_edge_config", "auto_splits", "launch_splits", "CTAS_PER_SM",
           "DEFAULT_CONFIGS", "aot_specs"]

_INT64_MAX = tl.constexpr(0x7FFFFFFFFFFFFFFF)  # key of a candidate outside the window
_INT64_MIN = tl.constexpr(-0x8000000000000000)  # key of an unused top-k slot (>= k)
_PACK_BLOCK_W = 32  # pixels per program of the channels-last packing kernel
_SQNORM_BLOCK_P = 32  # patches per program of the squared-norm kernel
_MERGE_BLOCK_Q = 16  # queries per program of the split merge kernel
_MIN_SPLIT_TILES = 4  # fewest candidate tiles per program when a block's scan is split
_MAX_SPLITS = 16
# k-NN programs of the default configs resident per SM, keyed (fp32?, compute capability
# major): registers x 128 threads and shared memory as compiled ahead of time, the fewer of
# the whole-scan and split kernels (tests/test_aot.py recomputes them from the AOT report;
# the counts behind them: profiling/NOTES.md). Other archs: 2.
CTAS_PER_SM = {(False, 8): 2, (True, 8): 2, (False, 9): 4, (True, 9): 3}


# --------------------------------------------------------------------------- configs

@dataclass(frozen=True)
class KnnConfig:
    """Tile shape of the k-NN kernel. BLOCK_M = block_qr * block_qc queries; every tl.dot dim
    must be >= 16: block_qr * block_qc >= 16, block_n >= 16, block_e >= 16 (powers of two).
    The tile fields have no defaults: the defaults depend on E and the dtype and are
    default_knn_config's (change one field with dataclasses.replace)."""

    block_qr: int  # query rows per program
    block_qc: int  # query columns per program
    block_n: int  # candidates per tile
    block_e: int  # channels per K step
    num_warps: int
    num_stages: int
    fp32_precision: str  # tl.dot input_precision for fp32 inputs: ieee | tf32x3
    splits: int | None = None  # programs per query block (window scan split); None: launcher's

    @property
    def block_m(self) -> int:
        return self.block_qr * self.block_qc


@dataclass(frozen=True)
class EdgeConfig:
    """Tile of the edge-feature kernel; the defaults are default_edge_config's."""

    block_q: int  # (query, rank) pairs per program
    block_e: int  # channels per program
    num_warps: int


def _pow2_at_least(x: int, lo: int) -> int:
    return max(lo, triton.next_power_of_2(max(1, x)))


def default_knn_config(E: int, k: int, dtype: torch.dtype) -> KnnConfig:
    """Defaults keyed on dtype and E (k only sets KPAD, derived at launch): 8 x 8 query
    blocks (union halo ~20%, 64 rows = one wgmma warpgroup tile on sm_90) with 32 candidates
    per tile, channel steps of up to 64 (32 for fp32), on 4 warps in 3 stages; fp32 as
    tf32x3 (three tensor-core passes, fp32-level error). Why these (timings, errors):
    profiling/NOTES.md. The FMA path: dataclasses.replace(default_knn_config(E, k,
    torch.float32), fp32_precision="ieee")."""
    be = min(64, _pow2_at_least(E, 16))
    if dtype == torch.float32:
        return KnnConfig(block_qr=8, block_qc=8, block_n=32, block_e=min(be, 32), num_warps=4,
                         num_stages=3, fp32_precision="tf32x3")
    return KnnConfig(block_qr=8, block_qc=8, block_n=32, block_e=be, num_warps=4, num_stages=3,
                     fp32_precision="ieee")


def default_edge_config(E: int, dtype: torch.dtype) -> EdgeConfig:
    return EdgeConfig(block_q=32, block_e=min(64, _pow2_at_least(E, 16)), num_warps=4)


def _precision(cfg: KnnConfig, dtype: torch.dtype) -> str:
    if dtype != torch.float32:
        return "default"
    assert cfg.fp32_precision in ("ieee", "tf32x3"), cfg.fp32_precision
    return cfg.fp32_precision


def _kpad(k: int) -> int:
    return _pow2_at_least(k, 2)


# --------------------------------------------------------------------------- kernels

@triton.jit
def _pack_kernel(x_ptr, out_ptr, E, h, w, Hp, Wp, top, left,
                 EP: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[b, r, c, e] = x[b, e, r - top, c - left] inside the map, 0 in the padding and for
    e >= E: the zero-padded channels-last copy (B, Hp, Wp, EP) of x (B, E, h, w), one row of
    BLOCK_W pixels per program (loads coalesced along w, stores along e). Program
    (r * cdiv(Wp, BLOCK_W) + column block, b): the row count on grid axis 0."""
    nwb = tl.cdiv(Wp, BLOCK_W)
    r = tl.program_id(0) // nwb
    pid_w = tl.program_id(0) - r * nwb
    b = tl.program_id(1)
    c = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    src_r = tl.zeros((BLOCK_W,), tl.int32) + (r - top)  # a vector: scalar masks trip the interpreter
    src_c = c - left
    in_px = (src_c >= 0) & (src_c < w) & (src_r >= 0) & (src_r < h)
    src = x_ptr + b.to(tl.int64) * E * h * w + src_r * w + src_c  # (BW,)
    dst = out_ptr + ((b.to(tl.int64) * Hp + r) * Wp + c) * EP  # (BW,)
    re = tl.arange(0, BLOCK_C)
    for e0 in tl.static_range(0, EP, BLOCK_C):
        e = e0 + re
        v = tl.load(src[None, :] + e.to(tl.int64)[:, None] * (h * w),
                    mask=(e[:, None] < E) & in_px[None, :], other=0.0)  # (BC, BW)
        tl.store(dst[None, :] + e[:, None], v, mask=(c[None, :] < Wp) & (e[:, None] < EP))


@triton.jit
def _patch_sqnorm_kernel(x_ptr, out_ptr, Hp, Wp, g1, g2,
                         STRIDE: tl.constexpr, PATCH: tl.constexpr, EP: tl.constexpr,
                         BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr):
    """out[b, p] = sum over the patch p of the padded channels-last map x (B, Hp, Wp, EP) of
    x^2, in fp32. One program = BLOCK_P patches of one batch item."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    G = g1 * g2
    p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    valid = p < G
    pc = tl.where(valid, p, 0)
    off = ((pc // g2) * STRIDE * Wp + (pc % g2) * STRIDE).to(tl.int64) * EP
    base = x_ptr + b.to(tl.int64) * Hp * Wp * EP
    re = tl.arange(0, BLOCK_E)
    acc = tl.zeros((BLOCK_P, BLOCK_E), tl.float32)
    for pos in tl.static_range(PATCH * PATCH):
        for e0 in tl.static_range(0, EP, BLOCK_E):
            v = tl.load(base + off[:, None] + ((pos // PATCH) * Wp + pos % PATCH) * EP
                        + e0 + re[None, :]).to(tl.float32)
            acc += v * v
    tl.store(out_ptr + b.to(tl.int64) * G + p, tl.sum(acc, 1), mask=valid)


@triton.jit
def _window_start(x, scale, win, count):
    """clamp(x // s - win // 2, 0, count - win): first son row/col of the window of x."""
    return tl.minimum(tl.maximum(x // scale - win // 2, 0), count - win)


@triton.jit
def _in_range(x, lo, width):
    """lo <= x < lo + width, for width > 0, in one compare: x - lo as uint32 wraps below lo."""
    return (x - lo).to(tl.uint32, bitcast=True) < width


@triton.jit
def _key(d, n):
    """int64 key (sortable(d) << 32) | n, n >= 0: "smaller key" is "smaller d, ties to the smaller
    n, NaN last". sortable(d): an int32 whose signed order is the float order (bits, or
    bits ^ 0x7fffffff when negative), NaN canonicalised to +qNaN so it ranks after +inf."""
    bits = d.to(tl.int32, bitcast=True)
    bits = tl.where(d != d, 0x7FC00000, bits)  # (a GPU's NaN is 0x7FFFFFFF: canonicalise)
    hi = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return (hi.to(tl.int64) << 32) | n.to(tl.int64)


@triton.jit
def _key_distance(key):
    """d of an int64 key from _key; NaN for INT64_MAX (an empty slot)."""
    hi = (key >> 32).to(tl.int32)
    return tl.where(hi >= 0, hi, hi ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)


@triton.jit
def _patch_knn_kernel(yq_ptr, xk_ptr, qn_ptr, kn_ptr, dist_ptr, idx_ptr, keys_ptr,
                      Hq, Wq, Hk, Wk, m1, m2, n1, n2, wh, ww, k, scale, splits,
                      STRIDE: tl.constexpr, PATCH: tl.constexpr, EP: tl.constexpr,
                      BLOCK_QR: tl.constexpr, BLOCK_QC: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_E: tl.constexpr, KPAD: tl.constexpr, PRECISION: tl.constexpr,
                      PARTIAL: tl.constexpr):
    """Windowed top-k of squared patch distances. yq (B, Hq, Wq, EP), xk (B, Hk, Wk, EP):
    zero-padded channels-last embeddings; qn (B, M), kn (B, N): fp32 squared patch norms.
    Program (pid_c * splits + part, pid_r, b) scans the part-th of `splits` shares of its
    query block's candidate tiles. PARTIAL = False (splits = 1): writes dist (B, M, k) fp32
    ascending and idx (B, M, k) int64; PARTIAL = True: writes its share's k best keys,
    unsorted, to keys (B, M, splits * k) int64, for _knn_merge_kernel."""
    BLOCK_M: tl.constexpr = BLOCK_QR * BLOCK_QC
    KSTEPS: tl.constexpr = PATCH * PATCH * (EP // BLOCK_E)
    pid_c = tl.program_id(0) // splits
    part = tl.program_id(0) % splits
    pid_r = tl.program_id(1)
    b = tl.program_id(2)
    M = m1 * m2
    N = n1 * n2

    # ---- the queries of this program and their windows
    rm = tl.arange(0, BLOCK_M)
    i = pid_r * BLOCK_QR + rm // BLOCK_QC
    j = pid_c * BLOCK_QC + rm % BLOCK_QC
    q_valid = (i < m1) & (j < m2)
    i = tl.minimum(i, m1 - 1)
    j = tl.minimum(j, m2 - 1)
    ci = _window_start(i, scale, wh, n1)  # (BM,)
    cj = _window_start(j, scale, ww, n2)
    m = i * m2 + j
    q_off = (i * STRIDE * Wq + j * STRIDE).to(tl.int64) * EP  # (BM,) the patch's first pixel
    qn = tl.load(qn_ptr + b.to(tl.int64) * M + m)  # (BM,) fp32

    # ---- the union of their windows: son rows [a0, a0 + urows), cols [b0, b0 + ucols)
    i_last = tl.minimum(pid_r * BLOCK_QR + BLOCK_QR, m1) - 1
    j_last = tl.minimum(pid_c * BLOCK_QC + BLOCK_QC, m2) - 1
    a0 = _window_start(pid_r * BLOCK_QR, scale, wh, n1)
    b0 = _window_start(pid_c * BLOCK_QC, scale, ww, n2)
    ucols = _window_start(j_last, scale, ww, n2) + ww - b0
    count = (_window_start(i_last, scale, wh, n1) + wh - a0) * ucols

    yq = yq_ptr + b.to(tl.int64) * Hq * Wq * EP
    xk = xk_ptr + b.to(tl.int64) * Hk * Wk * EP
    re = tl.arange(0, BLOCK_E)
    col = tl.arange(0, KPAD)[None, :]
    # the running k best keys per query (unsorted), columns >= k never selected
    best = tl.where(col < k, tl.full((BLOCK_M, KPAD), _INT64_MAX, tl.int64),
                    tl.full((BLOCK_M, KPAD), _INT64_MIN, tl.int64))
    thr = tl.max(best, 1)  # (BM,) the current k-th best key
    thr_d = _key_distance(thr)  # (BM,) its distance: NaN until the set is full

    # this program's share of the union's tiles: [t_begin, t_end), in ascending order
    share = tl.cdiv(tl.cdiv(count, BLOCK_N), splits) * BLOCK_N
    t_begin = part * share
    t_end = tl.minimum(count, t_begin + share)

    # candidate t of the union (flattened) is union row t // ucols, column t % ucols. The tile's
    # rows and columns are carried as rc = row << 16 | column (one register per candidate) and
    # advanced by BLOCK_N per tile with an add and a carry: no integer division in the loop
    rn = t_begin + tl.arange(0, BLOCK_N)
    rc = ((rn // ucols) << 16) | (rn % ucols)  # (BN,)
    step = ((BLOCK_N // ucols) << 16) | (BLOCK_N % ucols)
    carry = (1 << 16) - ucols  # column -= ucols, row += 1
    kn_b = kn_ptr + b.to(tl.int64) * N
    for t0 in range(t_begin, t_end, BLOCK_N):
        a = a0 + (rc >> 16)  # (BN,) son row: past the union for t >= count, outside every window
        bb = b0 + (rc & 0xFFFF)
        a_in = tl.minimum(a, n1 - 1)  # = a for t < count; loads stay in the map
        n = a_in * n2 + bb  # (BN,) son index
        k_off = (a_in * STRIDE * Wk + bb * STRIDE).to(tl.int64) * EP
        kn = tl.load(kn_b + n)  # (BN,) fp32

        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for s in tl.range(0, KSTEPS):
            pos = s // (EP // BLOCK_E)
            e0 = (s % (EP // BLOCK_E)) * BLOCK_E
            shift_q = ((pos // PATCH) * Wq + pos % PATCH) * EP + e0
            shift_k = ((pos // PATCH) * Wk + pos % PATCH) * EP + e0
            qt = tl.load(yq + q_off[:, None] + shift_q + re[None, :])  # (BM, BE)
            kt = tl.load(xk + k_off[None, :] + shift_k + re[:, None])  # (BE, BN)
            if PRECISION == "default":  # fp16 / bf16 operands
                acc = tl.dot(qt, kt, acc)
            else:  # fp32 operands: "ieee" (FMA) or "tf32x3" (3 tensor-core passes)
                acc = tl.dot(qt, kt, acc, input_precision=PRECISION)

        d = (qn[:, None] + kn[None, :]) - 2.0 * acc
        inside = _in_range(a[None, :], ci[:, None], wh) & _in_range(bb[None, :], cj[:, None], ww)
        # fp32 pre-test: keys are built only when a candidate of the block passes. It keeps
        # every candidate that can beat the threshold key: a smaller d, a NaN d, and any d
        # while thr_d is NaN (set not full). Not a tie: this tile's n are larger than the
        # set's (ascending scan), and d is never -0.0 (|q|^2 + |k|^2 >= +0, +0 - (+-0) = +0)
        if tl.max((inside & ~(d >= thr_d[:, None])).to(tl.int32)) > 0:
            key = _key(d, n[None, :])  # (BM, BN)
            cand = tl.where(inside & (key < thr[:, None]), key, _INT64_MAX)
            # ---- merge: insert each row's minimum in place of the set's maximum
            while tl.min(cand) < _INT64_MAX:
                low = tl.min(cand, 1)  # (BM,)
                slot = tl.min(tl.where(best == thr[:, None], col, KPAD), 1)
                best = tl.where((col == slot[:, None]) & (low < thr)[:, None], low[:, None], best)
                thr = tl.max(best, 1)
                cand = tl.where((cand > low[:, None]) & (cand < thr[:, None]), cand, _INT64_MAX)
            thr_d = _key_distance(thr)
        rc += step
        rc = tl.where((rc & 0xFFFF) >= ucols, rc + carry, rc)

    row = b.to(tl.int64) * M + m  # (BM,)
    if PARTIAL:  # this share's set as it is (unsorted); slots >= k are not written
        keys = keys_ptr + (row * splits + part) * k
        tl.store(keys[:, None] + col, best, mask=q_valid[:, None] & (col < k))
    else:
        _emit_sorted(tl.where(col < k, best, _INT64_MAX), row * k, k, q_valid, dist_ptr, idx_ptr)


@triton.jit
def _emit_sorted(keys, out, k, valid, dist_ptr, idx_ptr):
    """The k smallest of each row of keys (R, C) int64 (distinct, but for INT64_MAX fillers),
    ascending, decoded to dist_ptr[out + r] (fp32) and idx_ptr[out + r] (int64), r < k."""
    for r in range(0, k):
        low = tl.min(keys, 1)
        keys = tl.where(keys == low[:, None], _INT64_MAX, keys)
        tl.store(dist_ptr + out + r, _key_distance(low), mask=valid)
        tl.store(idx_ptr + out + r, low & 0x7FFFFFFF, mask=valid)  # n < 2^31


@triton.jit
def _knn_merge_kernel(keys_ptr, dist_ptr, idx_ptr, rows, k, width,
                      BLOCK_Q: tl.constexpr, WPAD: tl.constexpr):
    """dist, idx (rows, k) from keys (rows, width = splits * k): per row the k smallest of its
    splits' sets. Exact: every candidate was scanned by one split, which kept it if it is among
    its k best, so the row's k best are among the kept ones."""
    row = tl.program_id(0).to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    c = tl.arange(0, WPAD)[None, :]
    valid = row < rows
    keys = tl.load(keys_ptr + row[:, None] * width + c, mask=valid[:, None] & (c < width),
                   other=_INT64_MAX)
    _emit_sorted(keys, row * k, k, valid, dist_ptr, idx_ptr)


@triton.jit
def _edge_features_kernel(yq_ptr, xk_ptr, idx_ptr, out_ptr,
                          Hq, Wq, Hk, Wk, m2, n2, N, MK, k, E,
                          STRIDE: tl.constexpr, PATCH: tl.constexpr, EP: tl.constexpr,
                          BLOCK_Q: tl.constexpr, BLOCK_E: tl.constexpr):
    """out[b, m, r, c] = sum over the patch of |yq patch(m) - xk patch(idx[b, m, r])| (fp32 sum,
    stored in out's dtype); NaN for an idx outside [0, N) (no read). yq, xk: zero-padded
    channels-last maps with EP channels."""
    pid_q = tl.program_id(0)
    pid_e = tl.program_id(1)
    b = tl.program_id(2)
    t = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)  # flat (m, r)
    t_valid = t < MK
    e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    e_valid = e < E
    n = tl.load(idx_ptr + b.to(tl.int64) * MK + t, mask=t_valid, other=0)
    n_ok = (n >= 0) & (n < N)
    n = tl.where(n_ok, n, 0).to(tl.int32)  # never read outside the son map
    m = tl.where(t_valid, t, 0) // k
    # each patch's first pixel (int64: the packed maps may pass 2^31 elements)
    yq = (yq_ptr + b.to(tl.int64) * Hq * Wq * EP
          + ((m // m2) * STRIDE * Wq + (m % m2) * STRIDE).to(tl.int64) * EP)  # (BLOCK_Q,)
    xk = (xk_ptr + b.to(tl.int64) * Hk * Wk * EP
          + ((n // n2) * STRIDE * Wk + (n % n2) * STRIDE).to(tl.int64) * EP)
    mask = t_valid[:, None] & e_valid[None, :]
    k_mask = mask & n_ok[:, None]  # a bad idx reads nothing: NaN
    acc = tl.zeros((BLOCK_Q, BLOCK_E), tl.float32)
    for pos in range(0, PATCH * PATCH):  # not unrolled: 9 tiles of loads in flight spill
        qv = tl.load(yq[:, None] + ((pos // PATCH) * Wq + pos % PATCH) * EP + e[None, :],
                     mask=mask, other=0.0)
        kv = tl.load(xk[:, None] + ((pos // PATCH) * Wk + pos % PATCH) * EP + e[None, :],
                     mask=k_mask, other=float("nan"))
        acc += tl.abs(qv.to(tl.float32) - kv.to(tl.float32))
    out = out_ptr + (b.to(tl.int64) * MK + t)[:, None] * E + e[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- launchers

def _padded_channels_last(x: torch.Tensor, grid_h, grid_w, ep: int) -> torch.Tensor:
    """(B, E, h, w) -> zero-padded (B, pad_before + h + pad_after, ..., ep) channels-last copy,
    one pass (_pack_kernel writes every element, pads and extra channels as zeros)."""
    B, E, h, w = x.shape
    Hp, Wp = grid_h.padded, grid_w.padded
    out = torch.empty(B, Hp, Wp, ep, device=x.device, dtype=x.dtype)
    launch(_pack_kernel, grid("pack", triton.cdiv(Wp, _PACK_BLOCK_W) * Hp, B),
           x, out, E, h, w, Hp, Wp, grid_h.pad_before, grid_w.pad_before, EP=ep,
           BLOCK_W=_PACK_BLOCK_W, BLOCK_C=min(64, triton.next_power_of_2(ep)), num_warps=4)
    return out


def _sqnorms(xp: torch.Tensor, g1: int, g2: int, geo: GraphGeometry, block_e: int) -> torch.Tensor:
    B, Hp, Wp, EP = xp.shape
    out = torch.empty(B, g1 * g2, device=xp.device, dtype=torch.float32)
    launch(_patch_sqnorm_kernel, grid("patch_sqnorm", triton.cdiv(g1 * g2, _SQNORM_BLOCK_P), B),
           xp, out, Hp, Wp, g1, g2, STRIDE=geo.stride, PATCH=geo.patch, EP=EP,
           BLOCK_P=_SQNORM_BLOCK_P, BLOCK_E=block_e, num_warps=4)
    return out


def _check_sizes(kernel: str, geo: GraphGeometry, k: int, ep: int) -> None:
    """The sizes the k-NN and edge kernels support: any B; packed maps past 2^31 elements
    (offsets of patches in them are int64); per item fewer than 2^31 LR pixels per plane,
    M * k matches and p * (padded W) * E (int32 offsets within a patch)."""
    check_int32(kernel, "LR pixels per plane H * W", geo.query_h.size * geo.query_w.size)
    check_int32(kernel, "matches per item M * k", geo.num_queries * k)
    check_int32(kernel, "p * W * E", geo.patch * geo.query_w.padded * ep)


@on_tensor_device
def patch_knn(ye: torch.Tensor, xe: torch.Tensor, k: int, scale: int, window: int = 30,
              patch: int = 3, stride: int = 2, *, config: KnnConfig | None = None):
    """dist (B, M, k) fp32 ascending, idx (B, M, k) int64: the k nearest son patches of every
    query patch inside its window (reference.graph.patch_knn semantics, NaN last)."""
    check_tensor("ye", ye, ("B", "E", "H", "W"))
    B, E, H, W = ye.shape
    check_tensor("xe", xe, (B, E, H // scale, W // scale), (ye.dtype,))
    geo = graph_geometry(H, W, scale, patch, stride, window)
    assert 1 <= k <= geo.num_candidates, f"k = {k} outside [1, {geo.num_candidates}]"
    if geo.n1 >= 1 << 15 or geo.n2 >= 1 << 16:
        raise ValueError(f"patch_knn: son grid {geo.n1} x {geo.n2} patches, past the kernel's "
                         "2^15 x 2^16 (it packs a son row and column into one int32); "
                         + TILE_ADVICE)
    cfg = config or default_knn_config(E, k, ye.dtype)
    assert cfg.block_m >= 16 and cfg.block_n >= 16 and cfg.block_e >= 16, cfg
    ep = triton.cdiv(E, cfg.block_e) * cfg.block_e
    _check_sizes("patch_knn", geo, k, ep)
    yq = _padded_channels_last(ye, geo.query_h, geo.query_w, ep)
    xk = _padded_channels_last(xe, geo.son_h, geo.son_w, ep)
    qn = _sqnorms(yq, geo.m1, geo.m2, geo, cfg.block_e)
    kn = _sqnorms(xk, geo.n1, geo.n2, geo, cfg.block_e)
    M = geo.num_queries
    dist = torch.empty(B, M, k, device=ye.device, dtype=torch.float32)
    idx = torch.empty(B, M, k, device=ye.device, dtype=torch.int64)
    blocks = (triton.cdiv(geo.m2, cfg.block_qc), triton.cdiv(geo.m1, cfg.block_qr), B)
    splits = launch_splits(geo, cfg, B, ye.device, ye.dtype)
    keys = idx if splits == 1 else torch.empty(B, M, splits * k, device=ye.device,
                                               dtype=torch.int64)
    launch(_patch_knn_kernel, grid("patch_knn", blocks[0] * splits, blocks[1], B),
           yq, xk, qn, kn, dist, idx, keys,
           yq.shape[1], yq.shape[2], xk.shape[1], xk.shape[2],
           geo.m1, geo.m2, geo.n1, geo.n2, geo.window_h, geo.window_w, k, geo.scale, splits,
           STRIDE=geo.stride, PATCH=geo.patch, EP=ep, BLOCK_QR=cfg.block_qr,
           BLOCK_QC=cfg.block_qc, BLOCK_N=cfg.block_n, BLOCK_E=cfg.block_e, KPAD=_kpad(k),
           PRECISION=_precision(cfg, ye.dtype), PARTIAL=splits > 1, num_warps=cfg.num_warps,
           num_stages=cfg.num_stages)
    if splits > 1:
        launch(_knn_merge_kernel, grid("knn_merge", triton.cdiv(B * M, _MERGE_BLOCK_Q)),
               keys, dist, idx, B * M, k, splits * k, BLOCK_Q=_MERGE_BLOCK_Q,
               WPAD=triton.next_power_of_2(splits * k), num_warps=4)
    return dist, idx


def launch_splits(geo: GraphGeometry, cfg: KnnConfig, B: int, device: torch.device,
                  dtype: torch.dtype) -> int:
    """Programs per query block that patch_knn launches: cfg.splits, else auto_splits."""
    if cfg.splits is not None:
        assert cfg.splits >= 1, cfg
        return cfg.splits
    programs = triton.cdiv(geo.m2, cfg.block_qc) * triton.cdiv(geo.m1, cfg.block_qr) * B
    return auto_splits(programs, _tiles(geo, cfg), *_slots(device, dtype))


def _union_extent(geo: GraphGeometry, axis: int, block: int) -> int:
    """The most son rows (axis 0) or columns (axis 1) that the union of the windows of a
    block of `block` query rows (or columns) spans."""
    queries, win = (geo.m1, geo.window_h) if axis == 0 else (geo.m2, geo.window_w)
    return max(geo.window_start(axis, min(q0 + block, queries) - 1) + win
               - geo.window_start(axis, q0) for q0 in range(0, queries, block))


@functools.lru_cache(maxsize=256)
def _tiles(geo: GraphGeometry, cfg: KnnConfig) -> int:
    """Candidate tiles of the largest union of windows (the kernel's trip count); cached, as
    the Python loop over query blocks costs tens of microseconds per launch."""
    rows = _union_extent(geo, 0, cfg.block_qr)
    cols = _union_extent(geo, 1, cfg.block_qc)
    return triton.cdiv(rows * cols, cfg.block_n)


def _slots(device: torch.device, dtype: torch.dtype) -> tuple[int, int]:
    """(streaming multiprocessors, default-config k-NN programs resident per SM) of a device;
    (0, 0) off CUDA (the interpreter: no split unless a config asks for one)."""
    if device.type != "cuda":
        return 0, 0
    props = torch.cuda.get_device_properties(device)
    per_sm = CTAS_PER_SM.get((dtype == torch.float32, props.major), 2)
    return props.multi_processor_count, per_sm


def auto_splits(programs: int, tiles: int, sms: int, per_sm: int) -> int:
    """How many programs share each query block's candidate tiles. One program per block
    leaves a GPU mostly idle when the blocks are few (LR 128x128: 64 blocks of 8 x 8 queries
    for 132 SMs, 4 resident programs each on an H100), and each program's scan is one long
    dependent chain. So: the smallest split that fills at least 90% of the last wave of
    resident programs (else the fullest), keeping >= _MIN_SPLIT_TILES tiles per program (each
    share starts from an empty set, and the merge reads splits * k keys per query)."""
    slots = sms * per_sm
    most = max(1, min(_MAX_SPLITS, tiles // _MIN_SPLIT_TILES))
    if slots <= 0 or programs >= slots:
        return 1
    best, best_fill = 1, 0.0
    for p in range(1, most + 1):
        waves = programs * p / slots
        fill = waves / math.ceil(waves)
        if fill >= 0.9:
            return p
        if fill > best_fill:
            best, best_fill = p, fill
    return best


@on_tensor_device
def edge_features(ye: torch.Tensor, xe: torch.Tensor, idx: torch.Tensor, patch: int = 3,
                  stride: int = 2, *, config: EdgeConfig | None = None) -> torch.Tensor:
    """diff (B, M, k, E) in ye's dtype: per channel, the sum over the patch positions of
    |query patch - neighbour patch| (reference.graph.edge_features); NaN (every channel)
    for an idx outside [0, N), which is never read."""
    check_tensor("ye", ye, ("B", "E", "H", "W"))
    B, E, H, W = ye.shape
    check_tensor("xe", xe, (B, E, "h", "w"), (ye.dtype,))
    scale = H // xe.shape[2]
    geo = graph_geometry(H, W, scale, patch, stride, 1)
    M = geo.num_queries
    check_tensor("idx", idx, (B, M, "k"), (torch.int64,))
    k = idx.shape[2]
    cfg = config or default_edge_config(E, ye.dtype)
    ep = triton.cdiv(E, 8) * 8  # channel stride a multiple of 8: 16-byte vector loads
    _check_sizes("edge_features", geo, k, ep)
    yq = _padded_channels_last(ye, geo.query_h, geo.query_w, ep)
    xk = _padded_channels_last(xe, geo.son_h, geo.son_w, ep)
    out = torch.empty(B, M, k, E, device=ye.device, dtype=ye.dtype)
    if out.numel() == 0:
        return out
    launch(_edge_features_kernel,
           grid("edge_features", triton.cdiv(M * k, cfg.block_q), triton.cdiv(E, cfg.block_e), B),
           yq, xk, idx, out, yq.shape[1], yq.shape[2], xk.shape[1], xk.shape[2],
           geo.m2, geo.n2, geo.num_keys, M * k, k, E,
           STRIDE=geo.stride, PATCH=geo.patch, EP=ep, BLOCK_Q=cfg.block_q, BLOCK_E=cfg.block_e,
           num_warps=cfg.num_warps)
    return out


# --------------------------------------------------------------------------- AOT specs

# Default configs for the spec's shapes: E = 64 embedding channels, k = 5 (the launchers'
# default p = 3, t = 2).
DEFAULT_CONFIGS = [
    {"dtype": dt, "E": 64, "k": 5, "knn": default_knn_config(64, 5, dt),
     "edge": default_edge_config(64, dt)}
    for dt in SUPPORTED
]


def aot_specs(configs=None):
    """(name, kernel, signature, constexprs, options) of every kernel the launchers run with
    the given default configs, all dtypes, as they launch them at the bench's shape (LR
    256 x 256, s = 2, window 30, B = 1; recorded on meta tensors): the k-NN scan whole and
    split (2 programs per query block), the edge features, and the packing and norm kernels
    (as compiled for any shape only: they run at two shapes per call, the LR and son maps),
    and the split merge at its widest (_MAX_SPLITS splits); consumed by kernels.aot and
    tests/test_aot.py."""
    configs = configs or DEFAULT_CONFIGS
    specs = []
    for c in configs:
        ty, k, knn = TL_TYPES[c["dtype"]], c["k"], c["knn"]
        ye, xe = _aot_inputs(c)
        with record_launches() as whole:
            _, idx = patch_knn(ye, xe, k, 2, config=knn)
        with record_launches() as split:
            patch_knn(ye, xe, k, 2, config=dataclasses.replace(knn, splits=2))
        with record_launches() as edge:
            edge_features(ye, xe, idx, config=c["edge"])
        specs += [launch_spec(f"pack[{ty}]", whole, _pack_kernel, jit=False),
                  launch_spec(f"patch_sqnorm[{ty}]", whole, _patch_sqnorm_kernel, jit=False),
                  launch_spec(f"patch_knn[{ty}]", whole, _patch_knn_kernel),
                  launch_spec(f"patch_knn_split[{ty}]", split, _patch_knn_kernel),
                  launch_spec(f"edge_features[{ty}]", edge, _edge_features_kernel)]
    with record_launches() as widest:
        patch_knn(*_aot_inputs(configs[0]), configs[0]["k"], 2,
                  config=dataclasses.replace(configs[0]["knn"], splits=_MAX_SPLITS))
    specs.append(launch_spec("knn_merge", widest, _knn_merge_kernel, jit=False))
    return specs


def _aot_inputs(c: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """ye (1, E, 256, 256) and xe (1, E, 128, 128) of a default config, on the meta device."""
    return tuple(torch.empty(1, c["E"], n, n, dtype=c["dtype"], device="meta") for n in (256, 128))
