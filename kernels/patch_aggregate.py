"""AdaPN graph aggregation: knn_hr (B, k, C, sH, sW) = every query's k neighbour key blocks of F, normalised to the query's statistics and folded onto the HR grid with overlap averaging, or its softmax-weighted sum x1_hr (B, C, sH, sW); and the backward of both.
Forward traffic ~ 2|F| (NHWC copy) + |stats| + out (k*s^2*|F| knn_hr, s^2*|F| x1_hr) from DRAM; L1/L2 gathers per output and rank ~ (3/2)^2 F values + 6/s statistics; FLOPs ~ 4*B*k*C*(sH*sW)*(3/2)^2 (+3*B*k*sH*sW softmax). Backward ~ 2x forward (+ 9s^2*B*M*k*C fp32 atomics to grad F).
Must match reference.graph.aggregate (knn_hr) and reference.graph.weighted_sum(aggregate(...), logits) (x1_hr), with the statistics of reference.graph.query_stats / key_stats taken as independent inputs (spec section 6).

Design
------
* Layout. F is read through a channels-last copy (B, H, W, C) made by the launcher (cost: one
  read + one write of F, ~2/(k s^2) of the knn_hr store traffic), and the statistics through
  channels-contiguous (B, M, C) / (B, N, C) copies (|F|/4 and |F|/(4 s^2) floats). Every
  gathered operand (a neighbour pixel of F, mu_k, sigma_k, mu_q, sigma_q) is then one
  contiguous, vectorisable run of channels, whatever idx says; in NCHW the same gathers
  would be scalar loads in runs of at most 2s pixels. The forward pads these copies' channels
  to a multiple of 4 (CS; a no-op for C = 64, 256) so that its loads are 4-channel vectors
  whatever C is, and reads 1 / sigma_k instead of sigma_k. The outputs stay NCHW planes (the
  contract): the store of a tile goes through one layout conversion (vectors along X).
* Forward = gather, deterministic, no atomics. In padded HR coordinates (Yp, Xp) query row i
  covers rows [HSTRIDE*i, HSTRIDE*i + HPATCH) (HSTRIDE = t*s, HPATCH = p*s), so an HR row is
  covered by a scalar range of query rows (1 or 2 for p = 3, t = 2), and the HSTRIDE columns
  Xp = HSTRIDE*jb + ph (ph < HSTRIDE, one column block jb) share their covering query columns
  jb - dj, dj < NSLOT = ceil(p/t) (query jb - dj covers phase ph iff ph + dj*HSTRIDE <
  HPATCH). One program = BLOCK_Y HR rows (default 1) x BLOCK_J column blocks x PH phases
  (HSTRIDE rounded up to a power of 2) x BLOCK_C channels of one batch item, as a
  (BLOCK_Y*PH, BLOCK_J, BLOCK_C) tile whose threads each own all the pixels of VEC channels
  of one column block.
  Per rank r, covering query row i and column slot dj, per column block: n = idx[b, m, r]
  once, the four statistics once per channel (alpha = sigma_q / sigma_k, beta = mu_q -
  mu_k * alpha, broadcast over the phases), and F as one VEC-channel vector per phase from
  the key block's row (the key pixel (row, col) = (HSTRIDE*a + u, HSTRIDE*b' + v) - s * son
  padding, zero outside F, still normalised); acc += (F * alpha + beta) * weight. With one
  row per program the phase masks are compile-time constants: the phases a slot does not
  cover cost no instruction (dj = 1 reads 2 of the 4 phases at s = 2). The weight is
  1 / (number of covering queries) in knn_hr mode, which stores each rank's tile; x1_hr
  mode (WEIGHTED) folds in the per-pixel softmax over ranks, computed in fp32 from the
  logits (max, then sum of exp: weight = exp(logit - max - log(sum * count))), and
  accumulates all ranks in registers: knn_hr is never materialised.
* Backward, two kernels.
  1. x1_hr mode only, pixel-centric (per pixel, its NSLOT^2 covering-query slots with five
     gathers each): recomputes knn_r per pixel, reduces
     g_r = sum_c dx1[c] * knn_r[c] over all channels inside the program (deterministic),
     writes grad_logits = w_r (g_r - sum_r' w_r' g_r') and the softmax weights w (fp32) that
     kernel 2 needs.
  2. query-centric: one program = BLOCK_QI x BLOCK_QJ queries x BLOCK_C channels; per
     rank it walks the (p s)^2 HR pixels of each query's patch, with the incoming gradient
     dZ = dknn_r / count (knn mode) or w_r dx1 / count (x1 mode). grad mu_q, grad sigma_q
     are reduced in registers (deterministic, plain stores). grad mu_k, grad sigma_k are
     reduced over the patch and added with one fp32 atomic per (query, rank, channel);
     grad F gets one fp32 atomic per (query, rank, patch pixel, channel) into an NHWC fp32
     buffer (contiguous channel runs), permuted to NCHW at the end. Those three gradients
     are therefore NOT bit-deterministic (fp32 addition order of the atomics varies);
     under torch.use_deterministic_algorithms(True) ignn_triton.ops runs its torch
     implementation instead.
* Offsets into F are int64 (a 12 MP LR map at C = 256 is 1.4 x 2^31 elements): the key
  block's first pixel, or the pixel's row, in int64 and the rest in int32, the forms that
  keep every default config spill-free; the other sizes are bounded in _prepare.
* idx is read as int64 and never trusted for addressing: a son index outside [0, N) masks
  every load it would drive and yields NaN outputs (forward) / no contribution (backward).
  With IGNN_TRITON_DEBUG=1 the launchers compile a DEBUG variant whose tl.device_assert
  traps on CUDA (launched with debug=True); under the interpreter device asserts are no-ops,
  so there the launcher checks the range on the host instead.
* Loops that carry gathers are runtime loops (the forward's covering query rows and ranks,
  the backward's NSLOT^2 covering-query slots and flattened (p s)^2 patch pixels): unrolled
  or nested, LLVM hoists every iteration's gathers together and the kernels spill. The
  forward unrolls only its NSLOT = 2 column slots (for the compile-time phase masks).
  Register counts, timings and the kernels' history: profiling/NOTES.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..geometry import GraphGeometry, graph_geometry
from .aot import launch_spec
from .utils import (SUPPORTED, TL_TYPES, check_int32, check_tensor, debug, grid, launch,
                    launch_options, on_tensor_device, record_launches)

__all__ = ["AggregateConfig", "patch_aggregate", "patch_aggregate_backward",
           "default_aggregate_config", "DEFAULT_CONFIGS", "aot_specs"]


# --------------------------------------------------------------------------- configs

@dataclass(frozen=True)
class AggregateConfig:
    """Tiles (powers of two) of the three kernels.
    Forward: block_y HR rows x block_j column blocks (of 2s HR columns: p = 3, t = 2) x
    block_c channels per program, num_warps; block_y = 1 gets compile-time phase masks.
    Backward to the logits: block_ly x block_lx HR pixels per program, looping over the
    channels in steps of block_lc, l_num_warps. Main backward (query-centric): block_qi x
    block_qj queries x block_qc channels per program, q_num_warps. No field defaults: the
    defaults depend on C, the dtype and the HR stride and are default_aggregate_config's
    (change one field with dataclasses.replace)."""

    block_y: int
    block_j: int
    block_c: int
    num_warps: int
    block_qi: int
    block_qj: int
    block_qc: int
    q_num_warps: int
    block_ly: int  # backward-to-logits kernel: block_ly x block_lx pixels, block_lc
    block_lx: int  # channels per step
    block_lc: int
    l_num_warps: int
    num_stages: int


def default_aggregate_config(C: int, dtype: torch.dtype, scale: int = 2,
                             stride: int = 2) -> AggregateConfig:
    """Forward (its tile depends on the HR stride t * s): 1 HR row x block_j column blocks x
    16 channels, each thread holding the PH phases x VEC channels of one column block (16
    fp32 accumulators: 4 x 4 at s = 2, 8 x 2 at s = 3), so threads = block_c / VEC x
    block_j: on 8 warps, block_j = 64 (256 HR columns) at s = 2, 32 (192) at s = 3; on 4
    warps (fp32 at s = 2, fp16 / bf16 at s = 3) half that. Narrow images leave lanes idle
    (LR 40 at s = 2: 20 column blocks of 64). 8 or 4 warps: whichever no AOT compilation
    spills on (tests/test_aot.py), as compiled for any shape and as the JIT specialises it.
    Main backward: 1 x 32 queries x 16 channels on 8 warps (2 per thread). Backward to the
    logits: 1 x 32 pixels x 8-channel steps on 4 warps. Larger tiles are faster but spill.
    The spills, register sweeps and timings behind these: profiling/NOTES.md."""
    bc = min(16, triton.next_power_of_2(max(1, C)))
    _, vec = _phase_tile(stride * scale, bc)
    spills_on_8_warps = ((dtype == torch.float32 and stride * scale == 4)
                         or (dtype != torch.float32 and stride * scale == 6))
    warps = 4 if spills_on_8_warps else 8
    block_j = min(64, warps * 32 * vec // bc)  # threads = block_c / vec x block_j
    return AggregateConfig(block_y=1, block_j=block_j, block_c=bc, num_warps=warps, block_qi=1,
                           block_qj=32, block_qc=bc, q_num_warps=8, block_ly=1, block_lx=32,
                           block_lc=min(8, bc), l_num_warps=4, num_stages=1)


def _phase_tile(hr_stride: int, block_c: int) -> tuple[int, int]:
    """(PH, VEC) of the forward kernel: the HR stride rounded up to a power of 2, and the
    channels per thread, so that a thread holds PH x VEC <= 16 tile elements per row (VEC <= 4:
    the channel stride is a multiple of 4; VEC <= block_c)."""
    ph = triton.next_power_of_2(hr_stride)
    return ph, max(1, min(4, 16 // ph, block_c))


# --------------------------------------------------------------------------- kernels
# Every bool combination below is vector & vector: the triton 3.9 interpreter mis-splats a
# scalar int1 into a vector (int32 data) and then rejects it as a mask.

@triton.jit
def _cover_count(xp, count, HSTRIDE: tl.constexpr, HPATCH: tl.constexpr,
                 NSLOT: tl.constexpr):
    """Number of HR patches [HSTRIDE*i, HSTRIDE*i + HPATCH), 0 <= i < count, covering the
    padded HR coordinates xp (vector, xp >= 0), int32."""
    cnt = (xp * 0).to(tl.int32)
    for d in tl.static_range(NSLOT):
        i = xp // HSTRIDE - d
        cnt += ((i >= 0) & (i < count) & (xp - i * HSTRIDE < HPATCH)).to(tl.int32)
    return cnt


@triton.jit
def _cover_count_rel(v, j, count, HSTRIDE: tl.constexpr, HPATCH: tl.constexpr,
                     NSLOT: tl.constexpr):
    """Number of HR patches covering offset v (scalar, 0 <= v < HPATCH) of patches j
    (vector, 0 <= j < count): patch j - d covers it iff v + d*HSTRIDE < HPATCH, patch j + d
    iff v >= d*HSTRIDE. int32."""
    cnt = (j * 0 + 1).to(tl.int32)
    for d in tl.static_range(1, NSLOT):
        before = tl.where(v + d * HSTRIDE < HPATCH, j >= d, False)
        after = tl.where(v >= d * HSTRIDE, j + d < count, False)
        cnt += before.to(tl.int32) + after.to(tl.int32)
    return cnt


@triton.jit
def _pixel_tile(pid, HO, WO, q_top, q_left, BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr):
    """The BLOCK_Y x BLOCK_X HR pixels of tile pid, flattened: Y, X, padded Yp, Xp, valid."""
    nxb = tl.cdiv(WO, BLOCK_X)
    ty = pid // nxb
    p = tl.arange(0, BLOCK_Y * BLOCK_X)
    Y = ty * BLOCK_Y + p // BLOCK_X
    X = (pid - ty * nxb) * BLOCK_X + p % BLOCK_X
    ok = (Y < HO) & (X < WO)
    return Y, X, Y + q_top, X + q_left, ok


@triton.jit
def _son_patch(idx_b, m, ok, r, k, N, n2, DEBUG: tl.constexpr):
    """The rank-r son patch of queries m (used where ok): n_ok = idx in [0, N), use = ok &
    n_ok, nn = the son index where use, else 0 (int32), and its son row and column (a, bb).
    An idx outside [0, N) never drives a load (DEBUG: a device assertion)."""
    n = tl.load(idx_b + m * k + r, mask=ok, other=0)
    n_ok = (n >= 0) & (n < N)
    if DEBUG:
        tl.device_assert(n_ok | (ok == 0), "ignn_triton: idx outside [0, N)")
    use = ok & n_ok
    nn = tl.where(use, n, 0).to(tl.int32)
    a = nn // n2
    return n_ok, use, nn, a, nn - a * n2


@triton.jit
def _neighbour_sum(f_b, idx_b, qm_b, qs_b, km_b, ks_b, r, Yp, Xp, x_ok, c, c_ok,
                   H, W, C, m1, m2, n2, N, k, k_top, k_left,
                   HSTRIDE: tl.constexpr, HPATCH: tl.constexpr, NSLOT: tl.constexpr,
                   BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, DEBUG: tl.constexpr):
    """Sum over the queries covering the HR padded pixels (Yp, Xp) (BLOCK_P,) of the
    AdaPN-normalised rank-r neighbour value: (BLOCK_P, BLOCK_C) fp32, not yet averaged.
    f_b: NHWC F of this batch item; statistics (M | N, C) channel-contiguous; idx (M, k)."""
    acc = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
    ib = Yp // HSTRIDE
    jb = Xp // HSTRIDE
    # a runtime loop over the NSLOT^2 covering-query slots: unrolled, the compiler keeps every
    # slot's gathers in flight at once and spills (profiling/NOTES.md)
    for sl in range(0, NSLOT * NSLOT):
        di = sl // NSLOT
        dj = sl - di * NSLOT
        i = ib - di
        u = Yp - i * HSTRIDE
        j = jb - dj
        v = Xp - j * HSTRIDE
        ok = x_ok & (i >= 0) & (i < m1) & (u < HPATCH) & (j >= 0) & (j < m2) & (v < HPATCH)
        m = tl.where(ok, i * m2 + j, 0)
        n_ok, use, nn, a, bb = _son_patch(idx_b, m, ok, r, k, N, n2, DEBUG)
        row = a * HSTRIDE + u - k_top
        col = bb * HSTRIDE + v - k_left
        f_ok = use & (row >= 0) & (row < H) & (col >= 0) & (col < W)
        umask = use[:, None] & c_ok[None, :]
        f_off = (row * W + col).to(tl.int64) * C  # int64: F may pass 2^31 elements
        f = tl.load(f_b + f_off[:, None] + c[None, :],
                    mask=f_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
        q_off = m[:, None] * C + c[None, :]
        k_off = nn[:, None] * C + c[None, :]
        mq = tl.load(qm_b + q_off, mask=umask, other=0.0)
        sq = tl.load(qs_b + q_off, mask=umask, other=0.0)
        mk = tl.load(km_b + k_off, mask=umask, other=0.0)
        sk = tl.load(ks_b + k_off, mask=umask, other=1.0)
        z = (f - mk) * (sq / sk) + mq
        z = tl.where(n_ok[:, None], z, float("nan"))  # a bad idx poisons, never reads
        acc += tl.where(ok[:, None], z, 0.0)
    return acc


@triton.jit
def _block_aggregate(acc, wgt, f_b, idx_b, qm_b, qs_b, km_b, kr_b, r, Yp0, Yp, ph, jb, c,
                     c_ok, H, W, CS, m1, m2, n2, N, k, k_top, k_left,
                     HSTRIDE: tl.constexpr, HPATCH: tl.constexpr, NSLOT: tl.constexpr,
                     BLOCK_Y: tl.constexpr, VEC: tl.constexpr, DEBUG: tl.constexpr):
    """acc + wgt * (sum over the covering queries of the AdaPN-normalised rank-r neighbour
    value) for the forward's tile: the P pixels (padded HR row Yp, column HSTRIDE*jb + ph;
    Yp, ph (P,)) of each column block jb (BLOCK_J,) x channels c; acc (P, BLOCK_J, BLOCK_C)
    fp32, wgt (P, BLOCK_J). The covering query rows are a scalar range from the tile's first
    row Yp0. The P pixels of a column block share their covering query columns jb - dj, so
    idx and the statistics are loaded once per (query, channel) and broadcast over them; F
    is gathered as runs of channels of the key block's pixels (NHWC, channel stride CS)."""
    # query rows i whose HR rows [HSTRIDE*i, HSTRIDE*i + HPATCH) meet the tile's rows: a
    # runtime loop (unrolled, LLVM hoists every row's gathers together)
    i_lo = tl.maximum(Yp0 + HSTRIDE - HPATCH, 0) // HSTRIDE
    i_hi = tl.minimum((Yp0 + BLOCK_Y - 1) // HSTRIDE, m1 - 1)
    for i in range(i_lo, i_hi + 1):
        u = Yp - i * HSTRIDE  # (P,) row inside query row i's HR patch
        for dj in tl.static_range(NSLOT):
            j = jb - dj
            v = ph + dj * HSTRIDE  # (P,) column inside query column j's HR patch
            # the tile pixels that query column j covers; with one row a compile-time mask
            # (every i of the range covers it): the phases it misses cost nothing
            p_ok = (ph < HSTRIDE) & (v < HPATCH)
            if BLOCK_Y > 1:
                p_ok = p_ok & (u >= 0) & (u < HPATCH)
            j_ok = (j >= 0) & (j < m2)
            m = tl.where(j_ok, i * m2 + j, 0)
            n_ok, use, nn, a, bb = _son_patch(idx_b, m, j_ok, r, k, N, n2, DEBUG)
            # the statistics: (1, BLOCK_J, BLOCK_C), 0 (alpha = beta = 0) for j off the grid;
            # runs of VEC channels per thread, as F's below (the same layout: no conversion)
            umask = use[None, :, None] & c_ok[None, None, :]
            q_off = tl.max_contiguous(m[None, :, None] * CS + c[None, None, :], [1, 1, VEC])
            k_off = tl.max_contiguous(nn[None, :, None] * CS + c[None, None, :], [1, 1, VEC])
            mq = tl.load(qm_b + q_off, mask=umask, other=0.0)
            sq = tl.load(qs_b + q_off, mask=umask, other=0.0)
            mk = tl.load(km_b + k_off, mask=umask, other=0.0)
            rk = tl.load(kr_b + k_off, mask=umask, other=0.0)
            alpha = sq * rk  # Z = F * alpha + beta
            beta = tl.where(n_ok[None, :, None], mq - mk * alpha, float("nan"))  # bad idx
            row0 = a * HSTRIDE - k_top  # (BLOCK_J,) F row / column of the key block's
            col0 = bb * HSTRIDE - k_left  # first pixel
            row = u[:, None] + row0[None, :]
            col = v[:, None] + col0[None, :]
            f_ok = (p_ok[:, None] & use[None, :] & (row >= 0) & (row < H) & (col >= 0)
                    & (col < W))
            # runs of VEC channels per thread for fp32 and 16-bit F alike: the layout of the
            # fp32 statistics (wider 16-bit vectors would cost a layout conversion per slot).
            # The block's first pixel in int64 (F may pass 2^31 elements), the rest in int32
            blk = (row0.to(tl.int64) * W + col0) * CS
            f_off = tl.max_contiguous(blk[None, :, None] + ((u * W + v) * CS)[:, None, None]
                                      + c[None, None, :], [1, 1, VEC])
            f = tl.load(f_b + f_off, mask=f_ok[:, :, None] & c_ok[None, None, :], other=0.0)
            z = f.to(tl.float32) * alpha + beta
            acc += tl.where(p_ok[:, None, None], z * wgt[:, :, None], 0.0)
    return acc


@triton.jit
def _aggregate_fwd_kernel(f_ptr, idx_ptr, qm_ptr, qs_ptr, km_ptr, kr_ptr, logit_ptr, out_ptr,
                          H, W, C, m1, m2, n2, N, k, HO, WO, q_top, q_left, k_top, k_left,
                          HSTRIDE: tl.constexpr, HPATCH: tl.constexpr, NSLOT: tl.constexpr,
                          PH: tl.constexpr, VEC: tl.constexpr, BLOCK_Y: tl.constexpr,
                          BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr,
                          WEIGHTED: tl.constexpr, DEBUG: tl.constexpr):
    """knn_hr (B, k, C, HO, WO) or, WEIGHTED, x1_hr (B, C, HO, WO) in out's dtype.
    f: NHWC (B, H, W, CS), CS = C rounded up to a multiple of 4 (zero padded); idx (B, M, k)
    int64; q mean / std (B, M, CS), k mean and 1 / k std (B, N, CS) fp32; logits
    (B, k, HO, WO). One program = BLOCK_Y HR rows x the HR columns of BLOCK_J HSTRIDE-wide
    column blocks x BLOCK_C channels, a (P, BLOCK_J, BLOCK_C) tile: P = BLOCK_Y * PH pixels
    per column block, PH = HSTRIDE rounded up to a power of 2 (phases >= HSTRIDE unused)."""
    P: tl.constexpr = BLOCK_Y * PH
    njb = tl.cdiv(tl.cdiv(WO + q_left, HSTRIDE), BLOCK_J)
    pid = tl.program_id(0)
    cb = tl.program_id(1)
    b = tl.program_id(2)
    ty = pid // njb
    jb = (pid - ty * njb) * BLOCK_J + tl.arange(0, BLOCK_J)  # padded HR column // HSTRIDE
    p = tl.arange(0, P)
    ph = p % PH  # padded HR column % HSTRIDE
    Y = ty * BLOCK_Y + p // PH  # (P,)
    X = ph[:, None] + (jb * HSTRIDE - q_left)[None, :]  # (P, BLOCK_J)
    x_ok = ((ph < HSTRIDE) & (Y < HO))[:, None] & (X >= 0) & (X < WO)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    CS = tl.cdiv(C, 4) * 4
    cs_ok = c < CS  # loads: whole runs of 4 channels, vectorisable whatever C is
    M = m1 * m2
    b64 = b.to(tl.int64)
    f_b = f_ptr + b64 * H * W * CS
    idx_b = idx_ptr + b64 * M * k
    qm_b = qm_ptr + b64 * M * CS
    qs_b = qs_ptr + b64 * M * CS
    km_b = km_ptr + b64 * N * CS
    kr_b = kr_ptr + b64 * N * CS
    cnt = (_cover_count(Y + q_top, m1, HSTRIDE, HPATCH, NSLOT)[:, None]
           * _cover_count(X + q_left, m2, HSTRIDE, HPATCH, NSLOT))
    inv = 1.0 / tl.maximum(cnt, 1).to(tl.float32)  # every valid HR pixel has cnt >= 1
    HW = HO * WO
    pix = Y[:, None] * WO + X  # (P, BLOCK_J)
    omask = x_ok[:, :, None] & (c < C)[None, None, :]
    Yp0 = ty * BLOCK_Y + q_top
    acc = tl.zeros((P, BLOCK_J, BLOCK_C), tl.float32)
    if WEIGHTED:  # the softmax over ranks per pixel, in fp32: max, then sum of exp
        lg_b = logit_ptr + b64 * k * HW
        HW64 = tl.cast(HW, tl.int64)  # the rank offsets r * HW reach k * HW
        mx = tl.full((P, BLOCK_J), float("-inf"), tl.float32)
        for r in range(0, k):
            mx = tl.maximum(mx, tl.load(lg_b + r * HW64 + pix, mask=x_ok, other=0.0).to(tl.float32))
        den = tl.zeros((P, BLOCK_J), tl.float32)
        for r in range(0, k):
            den += tl.exp(tl.load(lg_b + r * HW64 + pix, mask=x_ok, other=0.0).to(tl.float32) - mx)
        shift = mx + tl.log(den / inv)  # softmax weight / count = exp(logit - shift)
        for r in range(0, k):
            lr = tl.load(lg_b + r * HW64 + pix, mask=x_ok, other=0.0).to(tl.float32)
            acc = _block_aggregate(
                acc, wgt=tl.exp(lr - shift), f_b=f_b, idx_b=idx_b, qm_b=qm_b, qs_b=qs_b,
                km_b=km_b, kr_b=kr_b, r=r, Yp0=Yp0, Yp=Y + q_top, ph=ph, jb=jb, c=c, c_ok=cs_ok,
                H=H, W=W, CS=CS, m1=m1, m2=m2, n2=n2, N=N, k=k, k_top=k_top, k_left=k_left,
                HSTRIDE=HSTRIDE, HPATCH=HPATCH, NSLOT=NSLOT, BLOCK_Y=BLOCK_Y, VEC=VEC,
                DEBUG=DEBUG)
        out = out_ptr + (b64 * C + c)[None, None, :] * HW + pix[:, :, None]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=omask)
    else:
        for r in range(0, k):
            val = _block_aggregate(
                acc, wgt=inv, f_b=f_b, idx_b=idx_b, qm_b=qm_b, qs_b=qs_b, km_b=km_b, kr_b=kr_b,
                r=r, Yp0=Yp0, Yp=Y + q_top, ph=ph, jb=jb, c=c, c_ok=cs_ok, H=H, W=W, CS=CS,
                m1=m1, m2=m2, n2=n2, N=N, k=k, k_top=k_top, k_left=k_left, HSTRIDE=HSTRIDE,
                HPATCH=HPATCH, NSLOT=NSLOT, BLOCK_Y=BLOCK_Y, VEC=VEC, DEBUG=DEBUG)
            out = out_ptr + ((b64 * k + r) * C + c)[None, None, :] * HW + pix[:, :, None]
            tl.store(out, val.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _aggregate_bwd_logits_kernel(f_ptr, idx_ptr, qm_ptr, qs_ptr, km_ptr, ks_ptr, logit_ptr,
                                 gout_ptr, glogit_ptr, w_ptr,
                                 H, W, C, m1, m2, n2, N, k, HO, WO, q_top, q_left, k_top,
                                 k_left,
                                 HSTRIDE: tl.constexpr, HPATCH: tl.constexpr,
                                 NSLOT: tl.constexpr, KPAD: tl.constexpr,
                                 BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr,
                                 BLOCK_C: tl.constexpr, DEBUG: tl.constexpr):
    """x1_hr backward to the logits: g_r = sum_c dx1[c] knn_r[c] (knn_r recomputed, every
    channel inside this program: deterministic), grad_logits = w_r (g_r - sum_r' w_r' g_r')
    in glogit's dtype, and the softmax weights w (B, k, HO, WO) fp32 for the main kernel."""
    BLOCK_P: tl.constexpr = BLOCK_Y * BLOCK_X
    b = tl.program_id(1)
    Y, X, Yp, Xp, x_ok = _pixel_tile(tl.program_id(0), HO, WO, q_top, q_left, BLOCK_Y,
                                     BLOCK_X)
    M = m1 * m2
    b64 = b.to(tl.int64)
    f_b = f_ptr + b64 * H * W * C
    idx_b = idx_ptr + b64 * M * k
    qm_b = qm_ptr + b64 * M * C
    qs_b = qs_ptr + b64 * M * C
    km_b = km_ptr + b64 * N * C
    ks_b = ks_ptr + b64 * N * C
    cnt = (_cover_count(Yp, m1, HSTRIDE, HPATCH, NSLOT)
           * _cover_count(Xp, m2, HSTRIDE, HPATCH, NSLOT))
    inv = 1.0 / tl.maximum(cnt, 1).to(tl.float32)
    HW = HO * WO
    pix = tl.where(x_ok, Y * WO + X, 0)
    rr = tl.arange(0, KPAD)
    G = tl.zeros((KPAD, BLOCK_P), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        omask = x_ok[:, None] & c_ok[None, :]
        d = tl.load(gout_ptr + (b64 * C + c)[None, :] * HW + pix[:, None], mask=omask,
                    other=0.0).to(tl.float32)
        for r in range(0, k):
            val = _neighbour_sum(
                f_b=f_b, idx_b=idx_b, qm_b=qm_b, qs_b=qs_b, km_b=km_b, ks_b=ks_b, r=r, Yp=Yp,
                Xp=Xp, x_ok=x_ok, c=c, c_ok=c_ok, H=H, W=W, C=C, m1=m1, m2=m2, n2=n2, N=N, k=k,
                k_top=k_top, k_left=k_left, HSTRIDE=HSTRIDE, HPATCH=HPATCH, NSLOT=NSLOT,
                BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C, DEBUG=DEBUG)
            g = tl.sum(tl.where(omask, val * d, 0.0), 1) * inv  # (BLOCK_P,)
            G += tl.where(rr[:, None] == r, g[None, :], 0.0)
    r_ok = rr < k
    lmask = r_ok[:, None] & x_ok[None, :]
    loff = (b64 * k + rr)[:, None] * HW + pix[None, :]
    L = tl.load(logit_ptr + loff, mask=lmask, other=0.0).to(tl.float32)
    L = tl.where(r_ok[:, None], L, float("-inf"))
    mx = tl.max(L, 0)
    e = tl.exp(L - mx[None, :])
    w = e / tl.sum(e, 0)[None, :]
    s = tl.sum(w * G, 0)
    grad = w * (G - s[None, :])
    tl.store(glogit_ptr + loff, grad.to(glogit_ptr.dtype.element_ty), mask=lmask)
    tl.store(w_ptr + loff, w, mask=lmask)


@triton.jit
def _aggregate_bwd_kernel(f_ptr, idx_ptr, qm_ptr, qs_ptr, km_ptr, ks_ptr, gout_ptr, w_ptr,
                          gf_ptr, gqm_ptr, gqs_ptr, gkm_ptr, gks_ptr,
                          H, W, C, m1, m2, n2, N, k, HO, WO, q_top, q_left, k_top, k_left,
                          HSTRIDE: tl.constexpr, HPATCH: tl.constexpr, NSLOT: tl.constexpr,
                          BLOCK_QI: tl.constexpr, BLOCK_QJ: tl.constexpr,
                          BLOCK_C: tl.constexpr, WEIGHTED: tl.constexpr,
                          DEBUG: tl.constexpr):
    """Query-centric backward of the aggregation. dZ at HR pixel P of query m, rank r =
    gout[b, r, :, P] / count(P) (knn mode) or w[b, r, P] * gout[b, :, P] / count(P).
    gf (B, H, W, C), gkm / gks (B, N, C): fp32, atomically accumulated.
    gqm / gqs (B, C, M): fp32, stored. One program = BLOCK_QI x BLOCK_QJ queries x BLOCK_C."""
    BLOCK_Q: tl.constexpr = BLOCK_QI * BLOCK_QJ
    pid = tl.program_id(0)
    cb = tl.program_id(1)
    b = tl.program_id(2)
    njb = tl.cdiv(m2, BLOCK_QJ)
    ti = pid // njb
    q = tl.arange(0, BLOCK_Q)
    i = ti * BLOCK_QI + q // BLOCK_QJ
    j = (pid - ti * njb) * BLOCK_QJ + q % BLOCK_QJ
    q_ok = (i < m1) & (j < m2)
    i = tl.where(q_ok, i, 0)
    j = tl.where(q_ok, j, 0)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    qc_ok = q_ok[:, None] & c_ok[None, :]
    M = m1 * m2
    m = i * m2 + j
    b64 = b.to(tl.int64)
    HW = HO * WO
    f_b = f_ptr + b64 * H * W * C
    gf_b = gf_ptr + b64 * H * W * C
    idx_b = idx_ptr + b64 * M * k
    km_b = km_ptr + b64 * N * C
    ks_b = ks_ptr + b64 * N * C
    gkm_b = gkm_ptr + b64 * N * C
    gks_b = gks_ptr + b64 * N * C
    q_off = (b64 * M + m)[:, None] * C + c[None, :]
    sq = tl.load(qs_ptr + q_off, mask=qc_ok, other=0.0)  # mu_q: only its gradient is needed
    dmq = tl.zeros((BLOCK_Q, BLOCK_C), tl.float32)
    dsq = tl.zeros((BLOCK_Q, BLOCK_C), tl.float32)
    X0 = j * HSTRIDE - q_left  # HR column of the first patch column
    Y0 = i * HSTRIDE - q_top
    dx1_b = gout_ptr + (b64 * C + c)[None, :] * HW  # WEIGHTED: dx1 (B, C, HO, WO)
    for r in range(0, k):
        n_ok, use, nn, a, bb = _son_patch(idx_b, m, q_ok, r, k, N, n2, DEBUG)
        umask = use[:, None] & c_ok[None, :]
        k_off = nn[:, None] * C + c[None, :]
        mk = tl.load(km_b + k_off, mask=umask, other=0.0)
        sk = tl.load(ks_b + k_off, mask=umask, other=1.0)
        alpha = sq / sk
        row0 = a * HSTRIDE - k_top  # F row / col of the key block's first pixel
        col0 = bb * HSTRIDE - k_left
        if WEIGHTED:
            g_b = dx1_b
            w_b = w_ptr + (b64 * k + r) * HW
        else:
            g_b = gout_ptr + ((b64 * k + r) * C + c)[None, :] * HW
        gsum = tl.zeros((BLOCK_Q, BLOCK_C), tl.float32)
        gfsum = tl.zeros((BLOCK_Q, BLOCK_C), tl.float32)
        for pos in range(0, HPATCH * HPATCH):  # the query's HR patch, one pixel a step
            u = pos // HPATCH
            v = pos - u * HPATCH
            Y = Y0 + u
            X = X0 + v
            p_ok = use & (Y >= 0) & (Y < HO) & (X >= 0) & (X < WO)
            pm = p_ok[:, None] & c_ok[None, :]
            cnt = (_cover_count_rel(u, i, m1, HSTRIDE, HPATCH, NSLOT)
                   * _cover_count_rel(v, j, m2, HSTRIDE, HPATCH, NSLOT))
            inv = 1.0 / cnt.to(tl.float32)
            pix = tl.where(p_ok, Y * WO + X, 0)
            if WEIGHTED:
                inv = inv * tl.load(w_b + pix, mask=p_ok, other=0.0)
            g = tl.load(g_b + pix[:, None], mask=pm, other=0.0).to(tl.float32) * inv[:, None]
            row = row0 + u
            col = col0 + v
            f_ok = p_ok & (row >= 0) & (row < H) & (col >= 0) & (col < W)
            fm = f_ok[:, None] & c_ok[None, :]
            # the row in int64 (F may pass 2^31 elements), the column in int32
            f_off = (row.to(tl.int64) * (W * C) + col * C)[:, None] + c[None, :]
            f = tl.load(f_b + f_off, mask=fm, other=0.0).to(tl.float32)
            # g is 0 and f is 0 off the masks: no tl.where needed (mu_k NaN poisons anyway)
            gsum += g
            gfsum += g * (f - mk)
            tl.atomic_add(gf_b + f_off, g * alpha, mask=fm, sem="relaxed")
        dmq += gsum
        dsq += gfsum / sk
        tl.atomic_add(gkm_b + k_off, -gsum * alpha, mask=umask, sem="relaxed")
        tl.atomic_add(gks_b + k_off, -gfsum * alpha / sk, mask=umask, sem="relaxed")
    s_off = (b64 * C + c)[None, :] * M + m[:, None]
    tl.store(gqm_ptr + s_off, dmq, mask=qc_ok)
    tl.store(gqs_ptr + s_off, dsq, mask=qc_ok)


# --------------------------------------------------------------------------- launchers

def _prepare(kernel, feat, idx, q_mean, q_std, k_mean, k_std, scale, patch, stride, logits):
    """Checks; geometry; channels-last F and channel-contiguous fp32 statistics.
    The sizes the kernels support: any B; F past 2^31 elements (its offsets are int64); per
    item fewer than 2^31 HR pixels per plane (sH x sW), M * k son indices and M * C query
    statistics (a 33 MP LR map at C = 256), and (p s) * W * C < 2^31 (int32 offsets)."""
    check_tensor("feat", feat, ("B", "C", "H", "W"), contiguous=False)
    B, C, H, W = feat.shape
    geo = graph_geometry(H, W, scale, patch, stride)
    M, N = geo.num_queries, geo.num_keys
    check_tensor("idx", idx, (B, M, "k"), (torch.int64,), contiguous=False)
    for name, t, L in (("q_mean", q_mean, M), ("q_std", q_std, M), ("k_mean", k_mean, N),
                       ("k_std", k_std, N)):
        check_tensor(name, t, (B, C, L), None, contiguous=False)
    k = idx.shape[2]
    cs = triton.cdiv(C, 4) * 4  # the forward's channel stride
    for what, count in (("HR pixels per plane sH * sW", geo.hr_height * geo.hr_width),
                        ("son indices per item M * k", M * k),
                        ("query statistics per item M * C", M * cs),
                        ("(p s) * W * C", geo.hr_patch * W * cs)):
        check_int32(kernel, what, count)
    if logits is not None:
        check_tensor("logits", logits, (B, k, geo.hr_height, geo.hr_width), contiguous=False)
        logits = logits.contiguous()
    if debug() and not idx.is_cuda and idx.numel():
        # device asserts are no-ops under the interpreter: the same check, on the host
        assert int(idx.min()) >= 0 and int(idx.max()) < N, "ignn_triton: idx outside [0, N)"
    f_cl = feat.permute(0, 2, 3, 1).contiguous()  # (B, H, W, C)
    stats = [t.to(torch.float32).transpose(1, 2).contiguous()
             for t in (q_mean, q_std, k_mean, k_std)]  # (B, M|N, C)
    return geo, f_cl, idx.contiguous(), stats, logits


def _geo_args(geo: GraphGeometry, C: int, k: int) -> dict:
    """The kernels' geometry arguments by name: F (H, W, C), the query grid, the son grid's
    width and size, k, the HR map, the query grid's padding in HR, the key blocks' in F."""
    key = geo.key_grid
    return {"H": geo.query_h.size, "W": geo.query_w.size, "C": C, "m1": geo.m1, "m2": geo.m2,
            "n2": geo.n2, "N": geo.num_keys, "k": k, "HO": geo.hr_height, "WO": geo.hr_width,
            "q_top": geo.hr_top, "q_left": geo.hr_left, "k_top": key.pad_top,
            "k_left": key.pad_left}


def _geo_constexprs(geo: GraphGeometry) -> dict:
    return {"HSTRIDE": geo.hr_stride, "HPATCH": geo.hr_patch, "NSLOT": geo.slots}


@on_tensor_device
def patch_aggregate(feat: torch.Tensor, idx: torch.Tensor, q_mean: torch.Tensor,
                    q_std: torch.Tensor, k_mean: torch.Tensor, k_std: torch.Tensor,
                    scale: int, patch: int = 3, stride: int = 2,
                    logits: torch.Tensor | None = None, *,
                    config: AggregateConfig | None = None) -> torch.Tensor:
    """AdaPN aggregation (spec section 6), in feat's dtype, computed in fp32.

    feat (B, C, H, W) fp32/fp16/bf16; idx (B, M, k) int64 son indices; q_mean, q_std
    (B, C, M) and k_mean, k_std (B, C, N) (any float dtype, used as fp32).
    logits None: knn_hr (B, k, C, sH, sW) (reference.graph.aggregate).
    logits (B, k, sH, sW): x1_hr (B, C, sH, sW) = sum_r softmax_r(logits) knn_hr[:, r]
    (reference.graph.weighted_sum), without materialising knn_hr.
    An idx outside [0, N) gives NaN where it is used (IGNN_TRITON_DEBUG=1: an assertion)."""
    geo, f_cl, idx, (qm, qs, km, ks), logits = _prepare(
        "patch_aggregate", feat, idx, q_mean, q_std, k_mean, k_std, scale, patch, stride, logits)
    B, C, H, W = feat.shape
    k = idx.shape[2]
    HO, WO = geo.hr_height, geo.hr_width
    weighted = logits is not None
    shape = (B, C, HO, WO) if weighted else (B, k, C, HO, WO)
    out = torch.empty(shape, device=feat.device, dtype=feat.dtype)
    if out.numel() == 0:
        return out
    if k == 0:  # weighted with no neighbours: the sum of nothing
        return out.zero_()
    cfg = config or default_aggregate_config(C, feat.dtype, scale, stride)
    kr = 1.0 / ks  # the kernel multiplies by 1 / sigma_k
    if C % 4:  # the kernel reads whole runs of 4 channels: zero-pad the channel-last copies
        f_cl, qm, qs, km, kr = [torch.nn.functional.pad(t, (0, -C % 4))
                                for t in (f_cl, qm, qs, km, kr)]
    col_blocks = triton.cdiv(geo.hr_left + WO, geo.hr_stride)
    tiles = triton.cdiv(HO, cfg.block_y) * triton.cdiv(col_blocks, cfg.block_j)
    ph, vec = _phase_tile(geo.hr_stride, cfg.block_c)
    launch(_aggregate_fwd_kernel,
           grid("patch_aggregate", tiles, triton.cdiv(C, cfg.block_c), B),
           f_cl, idx, qm, qs, km, kr, logits if weighted else out, out, **_geo_args(geo, C, k),
           **_geo_constexprs(geo), PH=ph, VEC=vec, BLOCK_Y=cfg.block_y, BLOCK_J=cfg.block_j,
           BLOCK_C=cfg.block_c, WEIGHTED=weighted, DEBUG=debug(),
           **launch_options(cfg.num_warps, cfg.num_stages))
    return out


@on_tensor_device
def patch_aggregate_backward(feat: torch.Tensor, idx: torch.Tensor, q_mean: torch.Tensor,
                             q_std: torch.Tensor, k_mean: torch.Tensor, k_std: torch.Tensor,
                             grad_out: torch.Tensor, scale: int, patch: int = 3,
                             stride: int = 2, logits: torch.Tensor | None = None, *,
                             config: AggregateConfig | None = None):
    """Backward of patch_aggregate with the four statistics as independent inputs.

    grad_out: d loss / d knn_hr (B, k, C, sH, sW), or d loss / d x1_hr (B, C, sH, sW) when
    logits is given. Returns (grad_feat fp32 (B, C, H, W), grad_q_mean, grad_q_std
    fp32 (B, C, M), grad_k_mean, grad_k_std fp32 (B, C, N), grad_logits (logits' dtype,
    (B, k, sH, sW)) or None). grad_feat and the key-statistics gradients are accumulated
    with fp32 atomics: correct to rounding but not bit-deterministic run to run; the others
    are deterministic. Cast grad_feat to feat's dtype after adding the statistics' own
    backward (kernels.patch_stats_backward(..., out=grad_feat)). An idx outside [0, N)
    contributes nothing (IGNN_TRITON_DEBUG=1: an assertion)."""
    geo, f_cl, idx, (qm, qs, km, ks), logits = _prepare(
        "patch_aggregate_backward", feat, idx, q_mean, q_std, k_mean, k_std, scale, patch, stride,
        logits)
    B, C, H, W = feat.shape
    k = idx.shape[2]
    M, N = geo.num_queries, geo.num_keys
    HO, WO = geo.hr_height, geo.hr_width
    weighted = logits is not None
    shape = (B, C, HO, WO) if weighted else (B, k, C, HO, WO)
    check_tensor("grad_out", grad_out, shape, None, contiguous=False)
    grad_out = grad_out.contiguous()
    dev = feat.device
    gf = torch.zeros(B, H, W, C, device=dev, dtype=torch.float32)
    gqm = torch.zeros(B, C, M, device=dev, dtype=torch.float32)
    gqs = torch.zeros_like(gqm)
    gkm = torch.zeros(B, N, C, device=dev, dtype=torch.float32)
    gks = torch.zeros_like(gkm)
    glogits = torch.zeros_like(logits) if weighted else None
    if B * C * H * W == 0 or k == 0:
        return (gf.permute(0, 3, 1, 2).contiguous(), gqm, gqs,
                gkm.transpose(1, 2).contiguous(), gks.transpose(1, 2).contiguous(), glogits)
    cfg = config or default_aggregate_config(C, feat.dtype, scale, stride)
    args = _geo_args(geo, C, k)
    consts = _geo_constexprs(geo)
    if weighted:
        w = torch.empty(B, k, HO, WO, device=dev, dtype=torch.float32)
        tiles = _pixel_tiles(HO, WO, cfg.block_ly, cfg.block_lx)
        launch(_aggregate_bwd_logits_kernel, grid("patch_aggregate_backward", tiles, B),
               f_cl, idx, qm, qs, km, ks, logits, grad_out, glogits, w, **args, **consts,
               KPAD=triton.next_power_of_2(k), BLOCK_Y=cfg.block_ly, BLOCK_X=cfg.block_lx,
               BLOCK_C=cfg.block_lc, DEBUG=debug(),
               **launch_options(cfg.l_num_warps, cfg.num_stages))
    else:
        w = qm  # unused
    tiles = triton.cdiv(geo.m1, cfg.block_qi) * triton.cdiv(geo.m2, cfg.block_qj)
    launch(_aggregate_bwd_kernel,
           grid("patch_aggregate_backward", tiles, triton.cdiv(C, cfg.block_qc), B),
           f_cl, idx, qm, qs, km, ks, grad_out, w, gf, gqm, gqs, gkm, gks, **args, **consts,
           BLOCK_QI=cfg.block_qi, BLOCK_QJ=cfg.block_qj, BLOCK_C=cfg.block_qc, WEIGHTED=weighted,
           DEBUG=debug(), **launch_options(cfg.q_num_warps, cfg.num_stages))
    return (gf.permute(0, 3, 1, 2).contiguous(), gqm, gqs, gkm.transpose(1, 2).contiguous(),
            gks.transpose(1, 2).contiguous(), glogits)


def _pixel_tiles(HO: int, WO: int, block_y: int, block_x: int) -> int:
    return triton.cdiv(HO, block_y) * triton.cdiv(WO, block_x)


# --------------------------------------------------------------------------- AOT specs

# Default configs for the model: C = 256 (paper; 64 for small models uses the same tiles),
# k = 5, s = 2 (x2 and x4 models) and s = 3 (x3), every dtype (the launchers' p = 3, t = 2).
DEFAULT_CONFIGS = [
    {"dtype": dt, "C": 256, "k": 5, "scale": s, "config": default_aggregate_config(256, dt, s)}
    for s in (2, 3) for dt in SUPPORTED
]


def aot_specs(configs=None):
    """(name, kernel, signature, constexprs, options) of every kernel the launchers run with
    the default configs (DEBUG off), as they launch them forward and backward, knn_hr and
    x1_hr, at a typical shape (LR 128 x 128, 192 x 192 for s = 3, B = 1; recorded on meta
    tensors); consumed by kernels.aot and tests/test_aot.py."""
    specs = []
    for c in configs or DEFAULT_CONFIGS:
        ty, s, C, k, dtype = TL_TYPES[c["dtype"]], c["scale"], c["C"], c["k"], c["dtype"]
        lr = 128 if s == 2 else 192
        geo = graph_geometry(lr, lr, s)
        feat = _meta(1, C, lr, lr, dtype=dtype)
        idx = _meta(1, geo.num_queries, k, dtype=torch.int64)
        stats = [_meta(1, C, n) for n in (geo.num_queries,) * 2 + (geo.num_keys,) * 2]
        launches = {}
        for mode, logits in (("knn", None), ("x1", _meta(1, k, s * lr, s * lr, dtype=dtype))):
            with record_launches() as launches[mode]:
                out = patch_aggregate(feat, idx, *stats, s, logits=logits, config=c["config"])
                patch_aggregate_backward(feat, idx, *stats, out, s, logits=logits,
                                         config=c["config"])
            specs += [launch_spec(f"aggregate_fwd_{mode}_s{s}[{ty}]", launches[mode],
                                  _aggregate_fwd_kernel),
                      launch_spec(f"aggregate_bwd_{mode}_s{s}[{ty}]", launches[mode],
                                  _aggregate_bwd_kernel)]
        specs.append(launch_spec(f"aggregate_bwd_logits_s{s}[{ty}]", launches["x1"],
                                 _aggregate_bwd_logits_kernel))
    return specs


def _meta(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")
