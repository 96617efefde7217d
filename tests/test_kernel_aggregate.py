"""Fused Triton AdaPN statistics and aggregation kernels vs the float64 reference.

Runs on the GPU when there is one, else under the Triton interpreter on CPU (conftest sets
TRITON_INTERPRET=1). Under the interpreter every launch pays ~0.1 ms per tensor op per
program, so the default tests pin one-tile-per-plane configs (few programs); one test
runs small multi-tile configs to exercise tile edges and channel tails, and a few run the
forward as the launcher does on a GPU (one HR row per program: compile-time phase masks) in
small tiles, on small planes. Each default config of the AOT table (every dtype, s = 2 and
3, and the statistics') runs once as the launchers pick it.

Contract checked (float64 reference computed from the same, already rounded, inputs):
* statistics: mean and sqrt(unbiased var + 1e-5) of reference.graph.query_stats / key_stats
  to fp32 rounding (|err| <= 2e-5 |ref| + 2e-6 max|ref|); their backward equal to torch
  autograd of the reference; the variance is an exact two-pass (data offset by 1e3 with a
  1e-2 spread keep 1e-3 relative accuracy where E[x^2] - E[x]^2 in fp32 loses it all).
* aggregation: knn_hr == reference.graph.aggregate semantics and x1_hr == weighted_sum of it,
  with the four statistics taken as independent inputs (a float64 helper below), to the
  rounding of the output dtype; and end to end (our statistics then our aggregation) ==
  reference.graph.aggregate(feat). Backward: grad feat, grad of each statistic and grad
  logits each against torch autograd of that helper in float64 (fp32 accumulation with
  atomics: |err| <= 1e-4 |ref| + 2e-5 max|ref|).
* constant patches give sigma = sqrt(1e-5) and no NaN; NaN / inf in F propagate exactly
  where the reference's do, other batch items stay exact; an idx outside [0, N) gives NaN
  (and, with IGNN_TRITON_DEBUG=1, an assertion) and never a crash.
"""
import importlib
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import kernel_device  # noqa: E402
from ignn_triton import kernels  # noqa: E402
from ignn_triton.geometry import graph_geometry  # noqa: E402
from ignn_triton.reference import graph as ref  # noqa: E402

ps = importlib.import_module("ignn_triton.kernels.patch_stats")
pa = importlib.import_module("ignn_triton.kernels.patch_aggregate")
DEVICE = kernel_device()
GPU = DEVICE.type == "cuda"

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (rtol, atol as a fraction of max|ref|): outputs rounded to the dtype, computed in fp32
OUT_TOL = {torch.float32: (2e-5, 2e-6), torch.float16: (2e-3, 1e-3),
           torch.bfloat16: (1.6e-2, 8e-3)}
GRAD_TOL = (1e-4, 2e-5)  # fp32 gradients (atomics: summation order varies)

# Interpreter: one tile covers a whole (small) HR plane / query grid / stats plane.
BIG = pa.AggregateConfig(block_y=64, block_j=16, block_c=8, num_warps=4, block_qi=8,
                         block_qj=8, block_qc=8, q_num_warps=4, block_ly=64, block_lx=64,
                         block_lc=8, l_num_warps=4, num_stages=1)
STATS_BIG = ps.StatsConfig(block_g=64, block_p=256, num_warps=4)
# Multi-tile: partial pixel / query / channel tiles everywhere.
SMALL = pa.AggregateConfig(block_y=2, block_j=2, block_c=4, num_warps=4, block_qi=2,
                           block_qj=4, block_qc=4, q_num_warps=4, block_ly=2, block_lx=16,
                           block_lc=4, l_num_warps=4, num_stages=1)
STATS_SMALL = ps.StatsConfig(block_g=8, block_p=16, num_warps=4)
# The forward as the launcher runs it (one HR row per program: compile-time phase masks), in
# small tiles: several rows, column blocks (a partial one at the right edge) and channel
# blocks (a partial one) per plane.
ROWS = pa.AggregateConfig(block_y=1, block_j=4, block_c=4, num_warps=4, block_qi=1, block_qj=32,
                          block_qc=16, q_num_warps=8, block_ly=1, block_lx=32, block_lc=8,
                          l_num_warps=4, num_stages=1)
AGG_CFG = None if GPU else BIG  # None = the launcher's defaults
STATS_CFG = None if GPU else STATS_BIG

# No shrinking: every example costs seconds under the interpreter; the failing example is
# printed as generated.
NO_SHRINK = [Phase.explicit, Phase.reuse, Phase.generate]
SETTINGS = settings(max_examples=10, deadline=None, derandomize=True, phases=NO_SHRINK,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --------------------------------------------------------------------------- helpers

def close(got: torch.Tensor, want: torch.Tensor, tol, what: str = "", scale=None) -> None:
    """|got - want| <= rtol |want| + atol * scale elementwise (scale: max|want| unless
    given), NaN where want is NaN."""
    rtol, atol = tol
    got = got.detach().double().cpu()
    want = want.detach().double().cpu()
    assert got.shape == want.shape, (what, got.shape, want.shape)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan), f"{what}: NaN pattern differs"
    fin = torch.isfinite(want)
    assert torch.equal(torch.isinf(got) & ~nan, torch.isinf(want)), f"{what}: inf pattern differs"
    if not fin.any():
        return
    g, w = got[fin], want[fin]
    scale = w.abs().max().item() if scale is None else scale
    err = (g - w).abs()
    bound = rtol * w.abs() + atol * max(scale, 1e-30)
    worst = (err - bound).argmax()
    assert bool((err <= bound).all()), (f"{what}: max err {err.max().item():.3e} "
                                        f"(at {worst.item()}: got {g[worst].item():.6e}, "
                                        f"want {w[worst].item():.6e}, scale {scale:.3e})")


def ref_knn(feat, idx, qm, qs, km, ks, scale, patch=3, stride=2):
    """reference.graph.aggregate with the four statistics as independent inputs (float64)."""
    B, C, H, W = feat.shape
    k = idx.shape[-1]
    blocks = ref.key_blocks(feat, scale, patch, stride)  # (B, C, P, N)
    M = qm.shape[-1]
    P = blocks.shape[2]
    gathered = torch.gather(blocks, 3, idx.reshape(B, 1, 1, M * k).expand(B, C, P, M * k))
    gathered = gathered.view(B, C, P, M, k)
    n = idx.reshape(B, 1, M * k).expand(B, C, M * k)
    mk = torch.gather(km, 2, n).view(B, C, 1, M, k)
    sk = torch.gather(ks, 2, n).view(B, C, 1, M, k)
    z = (gathered - mk) / sk * qs[:, :, None, :, None] + qm[:, :, None, :, None]
    cols = z.permute(0, 4, 1, 2, 3).reshape(B * k, C, P, M)
    return ref.fold_hr(cols, (H, W), scale, patch, stride).view(B, k, C, H * scale, W * scale)


def make_case(seed, B, C, h, w, s, k, dtype, idx_range=None):
    """feat (rounded to dtype), its float64 copy, float64 reference statistics, idx, logits."""
    gen = torch.Generator().manual_seed(seed)
    H, W = h * s, w * s
    feat = torch.randn(B, C, H, W, generator=gen).to(dtype)
    f64 = feat.double()
    geo = graph_geometry(H, W, s)
    idx = torch.randint(0, idx_range or geo.num_keys, (B, geo.num_queries, k), generator=gen)
    logits = (2 * torch.randn(B, k, H * s, W * s, generator=gen)).to(dtype)
    qm, qs = ref.query_stats(f64)
    km, ks = ref.key_stats(f64, s)
    return feat, f64, (qm, qs, km, ks), idx, logits


def dev(*ts):
    return [t.to(DEVICE) for t in ts]


def stats32(stats):
    return dev(*[t.float() for t in stats])


shapes = dict(B=st.integers(1, 2), C=st.sampled_from([3, 5, 6, 7, 12]),
              h=st.integers(3, 6), w=st.integers(3, 6), s=st.sampled_from([2, 3]),
              dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2 ** 16))


# --------------------------------------------------------------------------- statistics

@SETTINGS
@given(**shapes)
def test_patch_stats_forward(B, C, h, w, s, dtype, seed):
    feat, f64, (qm, qs, km, ks), _, _ = make_case(seed, B, C, h, w, s, 1, dtype)
    H, W = feat.shape[-2:]
    (fd,) = dev(feat)
    m, sd = ps.patch_stats(fd, *ps.query_grid_args(H, W), config=STATS_CFG)
    assert m.dtype == sd.dtype == torch.float32 and m.shape == qm.shape
    close(m, qm, (2e-5, 2e-6), "query mean")
    close(sd, qs, (2e-5, 2e-6), "query std")
    m, sd = ps.patch_stats(fd, *ps.key_grid_args(H, W, s), config=STATS_CFG)
    close(m, km, (2e-5, 2e-6), "key mean")
    close(sd, ks, (2e-5, 2e-6), "key std")


@SETTINGS
@given(**shapes, which=st.sampled_from(["query", "key"]), accumulate=st.booleans())
def test_patch_stats_backward(B, C, h, w, s, dtype, seed, which, accumulate):
    feat, f64, _, _, _ = make_case(seed, B, C, h, w, s, 1, dtype)
    H, W = feat.shape[-2:]
    f64.requires_grad_(True)
    mean, std = ref.query_stats(f64) if which == "query" else ref.key_stats(f64, s)
    gen = torch.Generator().manual_seed(seed + 1)
    gm, gs = torch.randn(mean.shape, generator=gen), torch.randn(std.shape, generator=gen)
    (want,) = torch.autograd.grad((mean, std), f64, (gm.double(), gs.double()))
    args = ps.query_grid_args(H, W) if which == "query" else ps.key_grid_args(H, W, s)
    fd, gmd, gsd = dev(feat, gm, gs)
    m32, s32 = dev(mean.detach().float(), std.detach().float())
    prior = torch.randn(feat.shape, generator=gen)
    out = prior.clone().to(DEVICE) if accumulate else None
    got = ps.patch_stats_backward(fd, m32, s32, gmd, gsd, *args, out=out, config=STATS_CFG)
    assert got.dtype == torch.float32 and got.shape == feat.shape
    if accumulate:
        assert got is out
        want = want + prior.double()
    close(got, want, GRAD_TOL, f"{which} stats grad")
    # a None gradient is a zero gradient
    got_m = ps.patch_stats_backward(fd, m32, s32, gmd, None, *args, config=STATS_CFG)
    (want_m,) = torch.autograd.grad(mean, f64, gm.double(), retain_graph=False)
    close(got_m, want_m, GRAD_TOL, f"{which} stats grad (mean only)")


def test_patch_stats_two_pass_precision():
    """Large offset, small spread: the two-pass fp32 variance keeps ~1e-4 relative accuracy;
    the one-pass E[x^2] - E[x]^2 in fp32 (shown for contrast) is off by orders of magnitude."""
    gen = torch.Generator().manual_seed(0)
    feat = (1000.0 + 0.01 * torch.randn(1, 4, 12, 12, generator=gen)).float()
    want_m, want_s = ref.query_stats(feat.double())
    m, sd = ps.patch_stats(feat.to(DEVICE), *ps.query_grid_args(12, 12), config=STATS_CFG)
    interior = want_m > 900  # patches without zero padding: spread ~1e-2, sigma >> sqrt(eps)
    rel = ((sd.double().cpu() - want_s).abs() / want_s)[interior]
    assert rel.max().item() < 1e-3, rel.max().item()
    cols = torch.nn.functional.unfold(feat, 3, stride=2).view(1, 4, 9, -1)  # 12 = 2*5+2 ... +pad
    naive_var = ((cols * cols).mean(2) - cols.mean(2) ** 2) * 9 / 8
    naive_s = torch.sqrt(naive_var.clamp_min(0) + 1e-5).double()
    want_inner = ref._stats(torch.nn.functional.unfold(feat.double(), 3, stride=2)
                            .view(1, 4, 9, -1))[1]
    naive_rel = ((naive_s - want_inner).abs() / want_inner).max().item()
    assert naive_rel > 1e-2, naive_rel


def test_patch_stats_deterministic():
    feat, _, _, _, _ = make_case(3, 2, 5, 4, 5, 2, 1, torch.float32)
    fd = feat.to(DEVICE)
    args = ps.key_grid_args(8, 10, 2)
    m, sd = ps.patch_stats(fd, *args, config=STATS_CFG)
    gm, gs = torch.randn_like(m), torch.randn_like(sd)
    a = ps.patch_stats_backward(fd, m, sd, gm, gs, *args, config=STATS_CFG)
    b = ps.patch_stats_backward(fd, m, sd, gm, gs, *args, config=STATS_CFG)
    assert torch.equal(a, b)
    m2, _ = ps.patch_stats(fd, *args, config=STATS_CFG)
    assert torch.equal(m, m2)


# --------------------------------------------------------------------------- aggregation

@SETTINGS
@given(**shapes, k=st.integers(1, 8))
def test_patch_aggregate_forward(B, C, h, w, s, dtype, seed, k):
    feat, f64, stats, idx, logits = make_case(seed, B, C, h, w, s, k, dtype)
    want = ref_knn(f64, idx, *[t.float().double() for t in stats], s)
    fd, idd, ld = dev(feat, idx, logits)
    st32 = stats32(stats)
    got = pa.patch_aggregate(fd, idd, *st32, s, config=AGG_CFG)
    assert got.dtype == dtype and got.shape == want.shape
    close(got, want, OUT_TOL[dtype], "knn_hr")
    x1 = pa.patch_aggregate(fd, idd, *st32, s, logits=ld, config=AGG_CFG)
    assert x1.dtype == dtype and x1.shape == (B, C, h * s * s, w * s * s)
    close(x1, ref.weighted_sum(want, logits.double()), OUT_TOL[dtype], "x1_hr")


@settings(max_examples=6, deadline=None, derandomize=True, phases=NO_SHRINK,
          suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 2), C=st.sampled_from([3, 7]), h=st.integers(3, 5),
       w=st.integers(3, 5), s=st.sampled_from([2, 3]), seed=st.integers(0, 2 ** 16),
       k=st.integers(1, 5))
def test_end_to_end_matches_reference(B, C, h, w, s, seed, k):
    """Our statistics fed to our aggregation == reference.graph.aggregate(feat) (fp32)."""
    feat, f64, _, idx, _ = make_case(seed, B, C, h, w, s, k, torch.float32)
    H, W = feat.shape[-2:]
    fd, idd = dev(feat, idx)
    q = ps.patch_stats(fd, *ps.query_grid_args(H, W), config=STATS_CFG)
    kk = ps.patch_stats(fd, *ps.key_grid_args(H, W, s), config=STATS_CFG)
    got = pa.patch_aggregate(fd, idd, *q, *kk, s, config=AGG_CFG)
    close(got, ref.aggregate(f64, idx, s), (5e-5, 5e-6), "knn_hr end to end")


def _check_backward(B, C, h, w, s, dtype, seed, k, weighted, config):
    feat, f64, stats, idx, logits = make_case(seed, B, C, h, w, s, k, dtype)
    leaves = [f64.clone().requires_grad_(True)] + [t.float().double().requires_grad_(True)
                                                 for t in stats]
    knn = ref_knn(leaves[0], idx, *leaves[1:], s)
    gen = torch.Generator().manual_seed(seed + 7)
    if weighted:
        l64 = logits.double().requires_grad_(True)
        out = ref.weighted_sum(knn, l64)
        leaves.append(l64)
    else:
        out = knn
    grad_out = torch.randn(out.shape, generator=gen).to(dtype)
    want = torch.autograd.grad(out, leaves, grad_out.double())
    fd, idd, gd, ld = dev(feat, idx, grad_out, logits)
    got = pa.patch_aggregate_backward(fd, idd, *stats32(stats), gd, s,
                                      logits=ld if weighted else None, config=config)
    names = ["grad_feat", "grad_q_mean", "grad_q_std", "grad_k_mean", "grad_k_std"]
    for name, g, wnt in zip(names, got[:5], want[:5]):
        assert g.dtype == torch.float32, name
        close(g, wnt, GRAD_TOL, name)
    if weighted:
        assert got[5].dtype == dtype
        # dL_r = w_r (g_r - sum w g) cancels (to 0 when every rank has the same neighbour):
        # the error scales with the terms w_r g_r, not with the result
        with torch.no_grad():
            g_r = (grad_out.double()[:, None] * knn).sum(2)
            terms = (torch.softmax(logits.double(), 1) * g_r).abs().max().item()
        close(got[5], want[5], OUT_TOL[dtype] if dtype != torch.float32 else GRAD_TOL,
              "grad_logits", scale=max(terms, want[5].abs().max().item()))
    else:
        assert got[5] is None


# The interpreter's cost of the backward grows with B * k * (3s)^2: keep that product small.
bwd_shapes = dict(B=st.integers(1, 2), C=st.sampled_from([3, 5, 7]), h=st.integers(3, 5),
                  w=st.integers(3, 5), s=st.sampled_from([2, 3]),
                  dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2 ** 16),
                  k=st.integers(1, 8))


def _cheap(B, s, k):
    return B * k * 9 * s * s <= 400


@pytest.mark.parametrize("weighted", [False, True], ids=["knn", "x1"])
@settings(max_examples=8, deadline=None, derandomize=True, phases=NO_SHRINK,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(**bwd_shapes)
def test_patch_aggregate_backward(weighted, B, C, h, w, s, dtype, seed, k):
    hypothesis.assume(_cheap(B, s, k))
    _check_backward(B, C, h, w, s, dtype, seed, k, weighted, AGG_CFG)


@pytest.mark.parametrize("s", [2, 3])
def test_small_tiles(s):
    """Partial pixel, query and channel tiles (C = 5 over blocks of 4, 4 x 16 pixel tiles,
    2 x 4 query tiles, 8-patch / 16-pixel statistics tiles): forward both modes, the key
    statistics and their backward, and (s = 2) the backward of both modes."""
    B, C, h, w, k = 1, 5, 3, 4, 2
    feat, f64, stats, idx, logits = make_case(11 + s, B, C, h, w, s, k, torch.float32)
    want = ref_knn(f64, idx, *[t.float().double() for t in stats], s)
    fd, idd, ld = dev(feat, idx, logits)
    st32 = stats32(stats)
    close(pa.patch_aggregate(fd, idd, *st32, s, config=SMALL), want, OUT_TOL[torch.float32],
          "knn small tiles")
    close(pa.patch_aggregate(fd, idd, *st32, s, logits=ld, config=SMALL),
          ref.weighted_sum(want, logits.double()), OUT_TOL[torch.float32], "x1 small tiles")
    H, W = feat.shape[-2:]
    args = ps.key_grid_args(H, W, s)
    m, sd = ps.patch_stats(fd, *args, config=STATS_SMALL)
    close(m, stats[2], (2e-5, 2e-6), "key mean small tiles")
    close(sd, stats[3], (2e-5, 2e-6), "key std small tiles")
    f_leaf = f64.clone().requires_grad_(True)
    gm, gs = torch.randn_like(m), torch.randn_like(sd)
    (want_g,) = torch.autograd.grad(ref.key_stats(f_leaf, s), f_leaf, (gm.double().cpu(),
                                                                       gs.double().cpu()))
    close(ps.patch_stats_backward(fd, m, sd, gm, gs, *args, config=STATS_SMALL), want_g,
          GRAD_TOL, "key stats grad small tiles")
    if s == 2:  # the backward with many programs is slow under the interpreter: one scale
        _check_backward(1, C, h, w, s, torch.float32, 5, 1, True, SMALL)
        _check_backward(1, C, h, w, s, torch.float32, 6, 1, False, SMALL)


@pytest.mark.parametrize("s, dtype", [(2, torch.float32), (3, torch.float32),
                                      (2, torch.bfloat16)], ids=["s2-fp32", "s3-fp32", "s2-bf16"])
def test_forward_one_row_per_program(s, dtype):
    """block_y = 1 (the default): rows covered by one and by two query rows, phases
    >= 2s masked (s = 3: 8 phases for a stride of 6), odd H and W (s = 3: 9 x 9), 5 column
    blocks in 2 programs (the second one partial), C = 6 (channel-last copies padded to 8;
    2 channel programs); knn_hr and x1_hr."""
    B, C, h, w, k = 1, 6, 3, 5 if s == 2 else 3, 2
    feat, f64, stats, idx, logits = make_case(20 + s, B, C, h, w, s, k, dtype)
    want = ref_knn(f64, idx, *[t.float().double() for t in stats], s)
    fd, idd, ld = dev(feat, idx, logits)
    st32 = stats32(stats)
    close(pa.patch_aggregate(fd, idd, *st32, s, config=ROWS), want, OUT_TOL[dtype],
          "knn one row per program")
    close(pa.patch_aggregate(fd, idd, *st32, s, logits=ld, config=ROWS),
          ref.weighted_sum(want, logits.double()), OUT_TOL[dtype], "x1 one row per program")


@pytest.mark.parametrize("patch, stride, H, W", [(5, 2, 10, 12), (4, 3, 8, 10)],
                         ids=["p5-t2", "p4-t3"])
def test_forward_other_patch_and_stride(patch, stride, H, W):
    """Other geometries, one row per program: 3 covering query rows and columns (p = 5,
    t = 2), top / left padding (p = 4, t = 3: HR padding 2 before); s = 2, both modes."""
    s, k = 2, 2
    gen = torch.Generator().manual_seed(patch)
    feat = torch.randn(1, 4, H, W, generator=gen)
    geo = graph_geometry(H, W, s, patch, stride)
    idx = torch.randint(0, geo.num_keys, (1, geo.num_queries, k), generator=gen)
    logits = 2 * torch.randn(1, k, H * s, W * s, generator=gen)
    f64 = feat.double()
    stats = (*ref.query_stats(f64, patch, stride), *ref.key_stats(f64, s, patch, stride))
    want = ref_knn(f64, idx, *[t.float().double() for t in stats], s, patch, stride)
    fd, idd, ld = dev(feat, idx, logits)
    st32 = stats32(stats)
    close(pa.patch_aggregate(fd, idd, *st32, s, patch, stride, config=ROWS), want,
          OUT_TOL[torch.float32], "knn other geometry")
    close(pa.patch_aggregate(fd, idd, *st32, s, patch, stride, logits=ld, config=ROWS),
          ref.weighted_sum(want, logits.double()), OUT_TOL[torch.float32], "x1 other geometry")


@pytest.mark.parametrize("config", [ROWS, BIG], ids=["rows", "block"])
@pytest.mark.parametrize("s", [2, 3])
def test_bad_idx_poisons_exactly_its_pixels(s, config):
    """An idx outside [0, N) makes NaN exactly the HR pixels of its query's patch in its
    rank's knn_hr plane (every channel), and in x1_hr wherever any rank is NaN; every other
    output equals the reference (with the bad entries replaced by a valid index)."""
    B, C, h, w, k = 1, 5, 3, 4 if s == 2 else 3, 2
    feat, f64, stats, idx, logits = make_case(30 + s, B, C, h, w, s, k, torch.float32)
    geo = graph_geometry(h * s, w * s, s)
    bad = idx.clone()
    bad[0, 0, 0] = geo.num_keys  # first query, rank 0
    bad[0, geo.m2 + 1, 1] = -1  # second query row, rank 1
    bad[0, -1, 0] = geo.num_keys + 7  # last query (bottom right), rank 0
    is_bad = (bad < 0) | (bad >= geo.num_keys)  # (B, M, k)
    cols = is_bad.permute(0, 2, 1)[:, :, None, :].double().expand(B, k, (3 * s) ** 2, -1)
    nan_knn = ref.fold_hr(cols, (h * s, w * s), s) > 0  # (B, k, sH, sW)
    nan_knn = nan_knn[:, :, None].expand(B, k, C, h * s * s, w * s * s)
    want = ref_knn(f64, torch.where(is_bad, 0, bad), *[t.float().double() for t in stats], s)
    fd, bd, ld = dev(feat, bad, logits)
    st32 = stats32(stats)
    knn = pa.patch_aggregate(fd, bd, *st32, s, config=config).cpu()
    close(knn, torch.where(nan_knn, float("nan"), want), OUT_TOL[torch.float32],
          "knn with bad idx")
    x1 = pa.patch_aggregate(fd, bd, *st32, s, logits=ld, config=config).cpu()
    want_x1 = ref.weighted_sum(want, logits.double())
    close(x1, torch.where(nan_knn.any(1), float("nan"), want_x1), OUT_TOL[torch.float32],
          "x1 with bad idx")


def _config_id(c):
    return f"{c['dtype']}-s{c['scale']}".replace("torch.", "")


@pytest.mark.parametrize("c", pa.DEFAULT_CONFIGS, ids=_config_id)
def test_default_aggregate_configs(c):
    """Each default config (the AOT-compiled tiles, for every dtype and s = 2, 3) as the
    launchers pick it (config=None), on a shape it serves (C >= 16), forward (C = 18: two
    channel blocks, the second partial) and backward (C = 16, k = 1: the interpreter's
    time), both modes."""
    dtype, s, C = c["dtype"], c["scale"], 18
    assert pa.default_aggregate_config(C, dtype, s) == c["config"]
    feat, f64, stats, idx, logits = make_case(40 + s, 1, C, 3, 4, s, 2, dtype)
    want = ref_knn(f64, idx, *[t.float().double() for t in stats], s)
    fd, idd, ld = dev(feat, idx, logits)
    st32 = stats32(stats)
    close(pa.patch_aggregate(fd, idd, *st32, s), want, OUT_TOL[dtype], "knn default config")
    close(pa.patch_aggregate(fd, idd, *st32, s, logits=ld),
          ref.weighted_sum(want, logits.double()), OUT_TOL[dtype], "x1 default config")
    for weighted in (False, True):
        _check_backward(1, 16, 3, 4, s, dtype, 40 + s, 1, weighted, None)


@pytest.mark.parametrize("c", ps.DEFAULT_CONFIGS,
                         ids=lambda c: f"{c['dtype']}-p{c['patch']}".replace("torch.", ""))
def test_default_stats_configs(c):
    """Each default statistics config (query patches, key blocks at s = 2 and 3; every
    dtype) as the launchers pick it, forward and backward, against the reference."""
    dtype, s = c["dtype"], max(1, c["patch"] // 3)
    assert ps.default_stats_config(c["patch"]) == c["config"]
    feat, f64, _, _, _ = make_case(50 + c["patch"], 2, 3, 4, 5, max(s, 2), 1, dtype)
    H, W = feat.shape[-2:]
    args = ps.query_grid_args(H, W) if s == 1 else ps.key_grid_args(H, W, s)
    assert args[:2] == (c["patch"], c["stride"])
    leaf = f64.clone().requires_grad_(True)
    mean, std = ref.query_stats(leaf) if s == 1 else ref.key_stats(leaf, s)
    (fd,) = dev(feat)
    m, sd = ps.patch_stats(fd, *args)
    close(m, mean, (2e-5, 2e-6), "mean default config")
    close(sd, std, (2e-5, 2e-6), "std default config")
    gm, gs = torch.randn_like(m), torch.randn_like(sd)
    (want,) = torch.autograd.grad((mean, std), leaf, (gm.double().cpu(), gs.double().cpu()))
    close(ps.patch_stats_backward(fd, m, sd, gm, gs, *args), want, GRAD_TOL,
          "stats grad default config")


def test_aggregate_forward_deterministic():
    feat, _, stats, idx, logits = make_case(2, 1, 5, 3, 3, 3, 4, torch.float32)
    fd, idd, ld = dev(feat, idx, logits)
    st32 = stats32(stats)
    a = pa.patch_aggregate(fd, idd, *st32, 3, logits=ld, config=AGG_CFG)
    b = pa.patch_aggregate(fd, idd, *st32, 3, logits=ld, config=AGG_CFG)
    assert torch.equal(a, b)


# --------------------------------------------------------------------------- edge cases

def test_constant_patches_sigma_floor():
    """F constant with no zero padding anywhere (H = W = 9, s = 3: query and son grids need
    none): every patch is constant, sigma = sqrt(1e-5) exactly to fp32, nothing is NaN."""
    s, k = 3, 3
    feat = torch.full((1, 4, 9, 9), 0.7)
    geo = graph_geometry(9, 9, s)
    idx = torch.randint(0, geo.num_keys, (1, geo.num_queries, k),
                        generator=torch.Generator().manual_seed(0))
    fd, idd = dev(feat, idx)
    floor = torch.tensor(1e-5).sqrt().item()
    for args in (ps.query_grid_args(9, 9), ps.key_grid_args(9, 9, s)):
        m, sd = ps.patch_stats(fd, *args, config=STATS_CFG)
        assert torch.allclose(m.cpu(), torch.full_like(m.cpu(), 0.7), rtol=1e-6, atol=0)
        assert torch.allclose(sd.cpu(), torch.full_like(sd.cpu(), floor), rtol=1e-6, atol=0)
    q = ps.patch_stats(fd, *ps.query_grid_args(9, 9), config=STATS_CFG)
    kk = ps.patch_stats(fd, *ps.key_grid_args(9, 9, s), config=STATS_CFG)
    knn = pa.patch_aggregate(fd, idd, *q, *kk, s, config=AGG_CFG)
    assert torch.allclose(knn.cpu(), torch.full_like(knn.cpu(), 0.7), rtol=1e-6, atol=0)
    grads = pa.patch_aggregate_backward(fd, idd, *q, *kk, torch.ones_like(knn), s,
                                        config=AGG_CFG)
    for g in grads[:5]:
        assert torch.isfinite(g).all()
    gq = ps.patch_stats_backward(fd, *q, grads[1], grads[2], *ps.query_grid_args(9, 9),
                                 config=STATS_CFG)
    assert torch.isfinite(gq).all()
    # zero F (padding included): sigma floor too, knn exactly 0
    z = torch.zeros(1, 4, 8, 8, device=DEVICE)
    m, sd = ps.patch_stats(z, *ps.key_grid_args(8, 8, 2), config=STATS_CFG)
    assert torch.equal(m.cpu(), torch.zeros_like(m.cpu()))
    assert torch.allclose(sd.cpu(), torch.full_like(sd.cpu(), floor), rtol=1e-6, atol=0)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, under the interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_nan_inf_propagate(dtype):
    """NaN and inf in F: statistics and both aggregation modes are NaN / inf exactly where
    the reference's are, batch item 1 (clean) stays exact, the backward runs and batch item
    1 of every gradient matches the clean computation."""
    s, k = 2, 3
    feat, f64, _, idx, logits = make_case(4, 2, 3, 4, 5, s, k, dtype)
    feat[0, 1, 2, 3] = float("nan")
    feat[0, 2, 5, 7] = float("inf")
    f64 = feat.double()
    H, W = feat.shape[-2:]
    stats = (*ref.query_stats(f64), *ref.key_stats(f64, s))
    fd, idd, ld = dev(feat, idx, logits)
    for args, (wm, ws) in ((ps.query_grid_args(H, W), stats[:2]),
                           (ps.key_grid_args(H, W, s), stats[2:])):
        m, sd = ps.patch_stats(fd, *args, config=STATS_CFG)
        close(m, wm, (2e-5, 2e-6), "mean with NaN/inf")
        close(sd, ws, (2e-5, 2e-6), "std with NaN/inf")
    st32 = stats32(stats)
    want = ref_knn(f64, idx, *[t.float().double() for t in stats], s)
    knn = pa.patch_aggregate(fd, idd, *st32, s, config=AGG_CFG)
    close(knn, want, OUT_TOL[dtype], "knn with NaN/inf")
    assert torch.isnan(knn[0].float()).any()
    x1 = pa.patch_aggregate(fd, idd, *st32, s, logits=ld, config=AGG_CFG)
    close(x1, ref.weighted_sum(want, logits.double()), OUT_TOL[dtype], "x1 with NaN/inf")
    # backward: no crash; the clean batch item equals the clean-only computation
    gen = torch.Generator().manual_seed(9)
    g = torch.randn(x1.shape, generator=gen).to(dtype).to(DEVICE)
    got = pa.patch_aggregate_backward(fd, idd, *st32, g, s, logits=ld, config=AGG_CFG)
    ref1 = pa.patch_aggregate_backward(fd[1:], idd[1:], *[t[1:] for t in st32], g[1:], s,
                                       logits=ld[1:], config=AGG_CFG)
    for a, b in zip(got, ref1):
        assert torch.isfinite(b).all()
        close(a[1:], b, GRAD_TOL, "clean batch item gradient")
    assert torch.isnan(got[0][0]).any()  # grad feat of the NaN item is poisoned, not dropped


def test_out_of_range_idx_is_nan_not_a_crash(monkeypatch):
    s, k = 2, 2
    feat, f64, stats, idx, logits = make_case(8, 1, 3, 3, 3, s, k, torch.float32)
    geo = graph_geometry(6, 6, s)
    bad = idx.clone()
    bad[0, 0, 0] = geo.num_keys + 1000
    bad[0, -1, 1] = -5
    fd, bd, ld = dev(feat, bad, logits)
    st32 = stats32(stats)
    monkeypatch.delenv("IGNN_TRITON_DEBUG", raising=False)
    knn = pa.patch_aggregate(fd, bd, *st32, s, config=AGG_CFG).cpu()
    assert torch.isnan(knn[0, 0]).any() and torch.isnan(knn[0, 1]).any()
    assert not torch.isnan(knn[0, 0, :, -1, -1]).any()  # far from query 0: untouched
    want = ref_knn(f64, idx, *[t.float().double() for t in stats], s)  # good ranks agree
    ok = ~torch.isnan(knn)
    assert torch.allclose(knn[ok].double(), want[ok], rtol=1e-5, atol=1e-5)
    grads = pa.patch_aggregate_backward(fd, bd, *st32, torch.ones_like(knn).to(DEVICE), s,
                                        config=AGG_CFG)
    assert all(torch.isfinite(g).all() for g in grads[:5])  # bad pairs contribute nothing
    if not GPU:
        monkeypatch.setenv("IGNN_TRITON_DEBUG", "1")
        with pytest.raises(AssertionError, match="idx outside"):
            pa.patch_aggregate(fd, bd, *st32, s, config=AGG_CFG)
        with pytest.raises(AssertionError, match="idx outside"):
            pa.patch_aggregate_backward(fd, bd, *st32, torch.ones_like(knn), s, config=AGG_CFG)


@pytest.mark.skipif(not GPU, reason="tl.device_assert fires on CUDA only")
def test_debug_device_assert_trips_on_cuda():
    """IGNN_TRITON_DEBUG=1: the DEBUG kernel variant's tl.device_assert stops the kernel
    (a CUDA device-side assert poisons the context, hence a child process)."""
    code = (
        "import torch\n"
        "import importlib\n"
        "pa = importlib.import_module('ignn_triton.kernels.patch_aggregate')\n"
        "f = torch.randn(1, 3, 6, 6, device='cuda')\n"
        "idx = torch.zeros(1, 9, 2, dtype=torch.int64, device='cuda'); idx[0, 4, 1] = 99\n"
        "q = torch.ones(1, 3, 9, device='cuda'); kk = torch.ones(1, 3, 4, device='cuda')\n"
        "out = pa.patch_aggregate(f, idx, q, q, kk, kk, 2)\n"
        "torch.cuda.synchronize()\n"
        "print('NO ASSERT', torch.isnan(out).any().item())\n")
    env = dict(os.environ, IGNN_TRITON_DEBUG="1")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode != 0, run.stdout + run.stderr
    assert "NO ASSERT" not in run.stdout
    assert "idx outside" in run.stderr or "assert" in run.stderr.lower(), run.stderr[-2000:]


def test_empty_and_bad_shapes():
    feat, _, stats, idx, logits = make_case(0, 1, 3, 3, 3, 2, 2, torch.float32)
    fd, idd, ld = dev(feat, idx, logits)
    st32 = stats32(stats)
    empty = pa.patch_aggregate(fd, idd[:, :, :0], *st32, 2, config=AGG_CFG)
    assert empty.shape == (1, 0, 3, 12, 12)
    zero = pa.patch_aggregate(fd, idd[:, :, :0], *st32, 2, logits=ld[:, :0], config=AGG_CFG)
    assert zero.shape == (1, 3, 12, 12) and torch.equal(zero.cpu(), torch.zeros(1, 3, 12, 12))
    with pytest.raises(AssertionError, match="idx must be int64"):
        pa.patch_aggregate(fd, idd.int(), *st32, 2, config=AGG_CFG)
    with pytest.raises(AssertionError, match="logits must be"):
        pa.patch_aggregate(fd, idd, *st32, 2, logits=ld[:, :, :-1], config=AGG_CFG)


def test_exports():
    for name in ("patch_stats", "patch_stats_backward", "query_grid_args", "key_grid_args",
                 "StatsConfig", "patch_aggregate", "patch_aggregate_backward",
                 "AggregateConfig"):
        assert getattr(kernels, name) is not None and name in kernels.__all__
    names = [spec[0] for spec in pa.aot_specs()] + [spec[0] for spec in ps.aot_specs()]
    assert len(names) == len(set(names)) and len(names) == 30 + 18
