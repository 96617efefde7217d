"""Fused Triton patch k-NN and edge-feature kernels vs the float64 reference.

Runs on the GPU when there is one, else under the Triton interpreter on CPU (conftest sets
TRITON_INTERPRET=1), with small pinned tile configs so the interpreter stays fast.

Contract checked (float64 reference from the same, already rounded, inputs):
* dist: |dist - ref| <= RTOL * |ref| + FLOOR * (|q|^2 + |k|^2). The kernel forms
  dist = |q|^2 + |k|^2 - 2 q.k in fp32 (as the reference formula does), so its absolute
  rounding error scales with the norms, not with the distance: that is the floor.
  fp32 inputs: RTOL 1e-4, FLOOR 1e-5. fp16 / bf16 inputs: products are exact in fp32 but
  tensor cores may accumulate with less care: RTOL 1e-3, FLOOR 1e-4.
* idx: valid, distinct, inside the query's window; every chosen neighbour's reference distance
  is within tolerance of the reference k-th distance; the kernel's dist equals the reference
  distance of the index it returns; the index set equals the reference's unless the
  reference's k-th and (k+1)-th distances are closer than the tolerance.
* Integer-valued data make every distance exact in fp32 and create many exact ties: there
  dist and idx must equal the reference exactly (ties to the smaller n).
* NaN: a NaN distance ranks after every number (+inf too), stays NaN, ties among NaNs go to
  the smaller n, and idx stays in the window.
* diff: within rounding of the output dtype of reference.edge_features(ye, xe, kernel idx).

bf16: tl.dot on bf16 operands returns garbage under the triton 3.9 interpreter (loads, stores
and fp16/fp32 dots are right), so bf16 matching numerics are tested on a GPU only; under the
interpreter the bf16 k-NN is checked for structure, bf16 edge features (no dot) fully, and
tests/test_aot.py compiles the bf16 kernels for sm_80 / sm_90.
"""
import dataclasses
import importlib
import os

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")
hypothesis = pytest.importorskip("hypothesis")
import triton.language as tl  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import kernel_device  # noqa: E402
from ignn_triton import kernels  # noqa: E402
from ignn_triton.geometry import graph_geometry  # noqa: E402
from ignn_triton.reference import graph as ref  # noqa: E402

pk = importlib.import_module("ignn_triton.kernels.patch_knn")
DEVICE = kernel_device()
GPU = DEVICE.type == "cuda"
INTERPRET = bool(os.environ.get("TRITON_INTERPRET"))

# Small tiles keep the interpreter fast and exercise several query blocks, candidate tiles
# and channel chunks per position even on tiny maps.
SMALL = pk.KnnConfig(block_qr=2, block_qc=8, block_n=16, block_e=16, num_warps=4, num_stages=1,
                     fp32_precision="ieee")
SPLIT = dataclasses.replace(SMALL, splits=3)  # each query block's tiles scanned by 3 programs
EDGE_SMALL = pk.EdgeConfig(block_q=16, block_e=16, num_warps=4)
KNN_CONFIGS = [SMALL, SPLIT] + ([None] if GPU else [])  # None = the launcher's defaults


def _config_id(c):
    return "default" if c is None else "split" if c.splits else "small"

TOL = {torch.float32: (1e-4, 1e-5), torch.float16: (1e-3, 1e-4), torch.bfloat16: (1e-3, 1e-4)}
DIFF_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 1e-3),
            torch.bfloat16: (1e-2, 1e-2)}  # (rtol, atol): fp32 sum, rounded to the dtype

SETTINGS = settings(max_examples=16, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --------------------------------------------------------------------------- helpers

def _norms(x64: torch.Tensor, grid_h, grid_w) -> torch.Tensor:
    """(B, L) squared norms of the patch vectors of x (for the tolerance floor only)."""
    padded = F.pad(x64, (grid_w.pad_before, grid_w.pad_after, grid_h.pad_before, grid_h.pad_after))
    return F.unfold(padded * padded, 3, stride=2).sum(1)


def _make(B, E, H, W, s, dtype, kind, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "int":  # small integers: exact fp32/fp16 arithmetic, many exact ties
        ye = torch.randint(-2, 3, (B, E, H, W), generator=g).to(dtype)
        xe = torch.randint(-2, 3, (B, E, H // s, W // s), generator=g).to(dtype)
    else:
        ye = torch.randn(B, E, H, W, generator=g).to(dtype)
        xe = torch.randn(B, E, H // s, W // s, generator=g).to(dtype)
    return ye, xe


def _in_window_oracle(ye, xe, k, s, window):
    """float64 oracle over each query's own in-window candidates only.

    For finite inputs it equals reference.patch_knn (asserted in test_oracle_is_reference).
    It exists for NaN inputs: the reference masks out-of-window candidates with +inf
    *before* sorting, so where a query's in-window distances are NaN it ranks out-of-window
    +inf entries first and returns out-of-window indices. The kernels (and the CPU path of
    ignn_triton.ops) rank only in-window candidates: NaN after every number, ties among
    NaNs to the smaller n, idx always in the window.
    Returns (dist (B, M, k), idx (B, M, k), full (B, M, N) in-window distances, NaN/inf
    kept, +inf outside the window, geometry)."""
    geo = graph_geometry(ye.shape[2], ye.shape[3], s, 3, 2, window)
    q = F.unfold(F.pad(ye.double(), (geo.query_w.pad_before, geo.query_w.pad_after,
                                     geo.query_h.pad_before, geo.query_h.pad_after)), 3, stride=2)
    key = F.unfold(F.pad(xe.double(), (geo.son_w.pad_before, geo.son_w.pad_after,
                                       geo.son_h.pad_before, geo.son_h.pad_after)), 3, stride=2)
    d = ((q * q).sum(1)[:, :, None] + (key * key).sum(1)[:, None, :]
         - 2 * q.transpose(1, 2) @ key)  # (B, M, N), the reference's formula
    inside = ref.window_mask(geo.m1, geo.m2, geo.n1, geo.n2, s, window)  # (M, N)
    cand = inside.nonzero()[:, 1].view(geo.num_queries, geo.num_candidates)  # ascending n
    cand = cand.expand(ye.shape[0], -1, -1)
    dc, order = torch.sort(torch.gather(d, 2, cand), dim=-1, stable=True)  # NaN last
    full = torch.where(inside, d, torch.inf)
    return dc[..., :k], torch.gather(cand, 2, order[..., :k]), full, dc, geo


def check_knn(ye, xe, k, s, window, dist, idx, exact=False):
    """The contract of the module docstring; returns the number of checked queries."""
    dist, idx = dist.cpu(), idx.cpu()
    B = ye.shape[0]
    rd, ri, full, sorted_all, geo = _in_window_oracle(ye, xe, k, s, window)
    M = geo.num_queries
    assert dist.shape == (B, M, k) and dist.dtype == torch.float32
    assert idx.shape == (B, M, k) and idx.dtype == torch.int64
    inside = ref.window_mask(geo.m1, geo.m2, geo.n1, geo.n2, s, window)  # (M, N)
    assert int(idx.min()) >= 0 and int(idx.max()) < geo.num_keys
    assert bool(torch.gather(inside.expand(B, -1, -1), 2, idx).all()), "idx outside its window"
    assert bool((idx.sort(-1).values.diff(dim=-1) > 0).all()), "repeated idx"
    if exact:
        assert torch.equal(idx, ri), "exact data: idx must equal the reference (ties to smaller n)"
        assert torch.equal(dist.double(), rd), "exact data: dist must equal the reference"
        return B * M
    rtol, floor = TOL[ye.dtype]
    qn = _norms(ye.double(), geo.query_h, geo.query_w)  # (B, M)
    kn = _norms(xe.double(), geo.son_h, geo.son_w)  # (B, N)
    picked = torch.gather(full, 2, idx)  # reference distance of the kernel's choices
    knp = torch.gather(kn[:, None].expand(-1, M, -1), 2, idx)
    nan_k, nan_r = torch.isnan(dist), torch.isnan(rd)
    assert torch.equal(nan_k, nan_r), "NaN ranks differ from the reference"
    assert torch.equal(nan_k, torch.isnan(picked)), "a NaN distance for a finite pair"
    tol = torch.nan_to_num(rtol * picked.abs() + floor * (qn[..., None] + knp), nan=0.0)
    finite = ~nan_k
    err = (dist.double() - picked).abs()
    assert bool((err[finite] <= tol[finite]).all()), f"dist error {err[finite].max():.3g}"
    # chosen neighbours are among the k nearest, up to the tolerance
    kth = torch.where(nan_r, -torch.inf, rd).max(-1, keepdim=True).values  # last finite
    assert bool((picked[finite] <= (kth + tol)[finite]).all()), "a far neighbour was chosen"
    # ascending, and NaN after every number
    d = torch.where(nan_k, torch.inf, dist.double())
    assert bool((d[..., 1:] >= d[..., :-1] - tol[..., 1:]).all()), "dist not ascending"
    # the index set, except where the k-th and (k+1)-th reference distances nearly tie
    same = (idx.sort(-1).values == ri.sort(-1).values).all(-1)  # (B, M)
    if k < geo.num_candidates:
        nxt = sorted_all[..., k]  # (k+1)-th in-window distance
        gap = (nxt - rd[..., -1]).abs()
        ambiguous = (gap <= 2 * tol.max(-1).values) | torch.isnan(gap)
    else:
        ambiguous = torch.zeros_like(same)
    assert bool((same | ambiguous).all()), "index set differs from the reference"
    # NaN ranks: ties among NaNs go to the smaller n, exactly as the reference
    assert torch.equal(idx[nan_k], ri[nan_r])
    return B * M


def check_diff(ye, xe, idx, diff):
    assert diff.dtype == ye.dtype and diff.shape == (*idx.shape, ye.shape[1])
    want = ref.edge_features(ye.double(), xe.double(), idx.cpu())
    rtol, atol = DIFF_TOL[ye.dtype]
    torch.testing.assert_close(diff.cpu().double(), want, rtol=rtol, atol=atol, equal_nan=True)


@st.composite
def knn_cases(draw, dtypes=(torch.float32, torch.float16)):
    s = draw(st.sampled_from([2, 3]))
    hs, ws = draw(st.integers(3, 12)), draw(st.integers(3, 12))  # son map (H/s, W/s)
    window = draw(st.sampled_from([2, 3, 4, 5, 6, 30]))
    geo = graph_geometry(s * hs, s * ws, s, 3, 2, window)
    k = draw(st.integers(1, min(8, geo.num_candidates)))
    return dict(B=draw(st.integers(1, 2)), E=draw(st.integers(1, 20)), H=s * hs, W=s * ws, s=s,
                window=window, k=k, dtype=draw(st.sampled_from(dtypes)),
                kind=draw(st.sampled_from(["normal", "normal", "int"])),
                seed=draw(st.integers(0, 2 ** 31 - 1)))


def _run(case, config):
    ye, xe = _make(case["B"], case["E"], case["H"], case["W"], case["s"], case["dtype"],
                   case["kind"], case["seed"])
    dist, idx = pk.patch_knn(ye.to(DEVICE), xe.to(DEVICE), case["k"], case["s"], case["window"],
                             config=config)
    return ye, xe, dist, idx


# --------------------------------------------------------------------------- k-NN

@SETTINGS
@given(case=knn_cases())
def test_oracle_is_reference(case):
    """On finite inputs the in-window oracle of these tests is reference.patch_knn."""
    ye, xe = _make(case["B"], case["E"], case["H"], case["W"], case["s"], case["dtype"],
                   case["kind"], case["seed"])
    args = (case["k"], case["s"], case["window"])
    rd, ri = ref.patch_knn(ye.double(), xe.double(), *args)
    od, oi = _in_window_oracle(ye, xe, *args)[:2]
    assert torch.equal(od, rd) and torch.equal(oi, ri)


def test_exports():
    assert kernels.HAS_TRITON
    assert kernels.patch_knn is pk.patch_knn and kernels.edge_features is pk.edge_features
    assert {c["dtype"] for c in pk.DEFAULT_CONFIGS} == {torch.float32, torch.float16,
                                                         torch.bfloat16}


@pytest.mark.parametrize("config", KNN_CONFIGS, ids=_config_id)
@SETTINGS
@given(case=knn_cases())
def test_patch_knn_matches_reference(case, config):
    ye, xe, dist, idx = _run(case, config)
    n = check_knn(ye, xe, case["k"], case["s"], case["window"], dist, idx,
                  exact=case["kind"] == "int")
    assert n == case["B"] * dist.shape[1]
    diff = pk.edge_features(ye.to(DEVICE), xe.to(DEVICE), idx, config=EDGE_SMALL)
    check_diff(ye, xe, idx, diff)


def test_patch_knn_fixed_cases():
    """Hand-picked shapes: E = 1, k = 1 and k = wh*ww, odd sizes, both scales, a window
    smaller than the son grid in one dimension only, and several query blocks."""
    for (B, E, H, W, s, window, k, dtype, kind) in [
        (1, 1, 12, 14, 2, 3, 1, torch.float32, "normal"),
        (2, 5, 15, 21, 3, 4, 6, torch.float16, "normal"),  # k = wh * ww = 2 * 3
        (1, 3, 18, 12, 3, 30, 6, torch.float32, "int"),
        (1, 17, 20, 30, 2, 5, 4, torch.float32, "normal"),
        (1, 2, 12, 12, 2, 2, 4, torch.float32, "int"),  # k = wh * ww: all candidates
    ]:
        ye, xe = _make(B, E, H, W, s, dtype, kind, seed=E * 101 + H)
        dist, idx = pk.patch_knn(ye.to(DEVICE), xe.to(DEVICE), k, s, window, config=SMALL)
        check_knn(ye, xe, k, s, window, dist, idx, exact=kind == "int")


def test_ties_go_to_smaller_index():
    """All son patches equal (xe = 0): every in-window candidate ties, so idx is the first k
    in-window indices in ascending order, and dist = |q|^2 exactly."""
    B, E, H, W, s, window, k = 1, 4, 16, 20, 2, 3, 5
    ye = torch.randn(B, E, H, W)
    xe = torch.zeros(B, E, H // s, W // s)
    dist, idx = pk.patch_knn(ye.to(DEVICE), xe.to(DEVICE), k, s, window, config=SMALL)
    geo = graph_geometry(H, W, s, 3, 2, window)
    inside = ref.window_mask(geo.m1, geo.m2, geo.n1, geo.n2, s, window)
    first = torch.stack([row.nonzero()[:k, 0] for row in inside])  # (M, k)
    assert torch.equal(idx[0].cpu(), first)
    qn = _norms(ye.double(), geo.query_h, geo.query_w)[0].float()
    torch.testing.assert_close(dist[0].cpu(), qn[:, None].expand(-1, k), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("window", [13, 14, 29])
def test_union_wider_than_tile(window):
    """Son grid 3 x 40: away from the borders a block's union of windows is ww + 3 = 16, 17, 32
    son columns wide against SMALL's 16-candidate tiles (the default config at w = 30: 33
    columns, 32-candidate tiles; hypothesis draws son grids of at most 12 columns), so tiles
    start mid-row and wrap onto the next union row. Integer data: exact ties, also with the
    threshold of a set filled by earlier tiles. A NaN pixel in ye: all distances of the
    queries over it are NaN, in every tile."""
    B, E, H, W, s, k = 1, 3, 12, 160, 2, 5
    ye, xe = _make(B, E, H, W, s, torch.float32, "int", seed=window)
    dist, idx = pk.patch_knn(ye.to(DEVICE), xe.to(DEVICE), k, s, window, config=SMALL)
    check_knn(ye, xe, k, s, window, dist, idx, exact=True)
    ye, xe = _make(B, E, H, W, s, torch.float32, "normal", seed=window)
    ye[0, 1, 5, 80] = float("nan")
    dist, idx = pk.patch_knn(ye.to(DEVICE), xe.to(DEVICE), k, s, window, config=SMALL)
    check_knn(ye, xe, k, s, window, dist, idx)
    assert bool(torch.isnan(dist).all(-1).any()) and not bool(torch.isnan(dist).all())


@pytest.mark.parametrize("window, kind, splits", [(13, "int", 2), (29, "int", 16),
                                                  (6, "normal", 5)])
def test_split_scan_equals_whole_scan(window, kind, splits):
    """Programs that each scan a share of a query block's tiles, merged, give exactly the one
    program scan's dist and idx: the same per-candidate arithmetic, and keys that order ties
    across shares by n. Integer data (many exact ties, thresholds tied across shares), NaN
    queries and candidates, and more shares than a block has tiles (empty shares: 16)."""
    B, E, H, W, s, k = 1, 3, 12, 64, 2, 5
    ye, xe = _make(B, E, H, W, s, torch.float32, kind, seed=window)
    if kind == "normal":
        ye[0, 1, 5, 40] = float("nan")
        xe[0, 2, 3, 10] = float("nan")
    args = (ye.to(DEVICE), xe.to(DEVICE), k, s, window)
    whole = pk.patch_knn(*args, config=SMALL)
    split = pk.patch_knn(*args, config=dataclasses.replace(SMALL, splits=splits))
    torch.testing.assert_close(split[0], whole[0], rtol=0, atol=0, equal_nan=True)
    assert torch.equal(split[1], whole[1])
    check_knn(ye, xe, k, s, window, *split, exact=kind == "int")


def _special(ye, xe):
    """NaN in a query pixel and in a son pixel, +inf in another son pixel."""
    ye[0, 1, 5, 6] = float("nan")
    xe[0, 2, 3, 4] = float("nan")
    xe[0, 0, 9, 2] = float("inf")
    return ye, xe


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_default_knn_configs(dtype):
    """The table's default configs of each dtype (k-NN fp32: tf32x3 on 8 x 8 queries x
    32-channel steps; fp16: 64-channel steps; edge features) as the launchers pick them,
    E = 64, on normal data (against the reference) and with NaN and +inf (their ranks as
    the in-window oracle's: after every number, NaN after +inf, ties to the smaller n).
    bf16 has the fp16 config (asserted): under the interpreter its tl.dot is broken, on a
    GPU test_bf16_numerics_gpu runs it."""
    B, E, H, W, s, window, k = 1, 64, 32, 36, 2, 5, 5
    table = {c["dtype"]: c["knn"] for c in pk.DEFAULT_CONFIGS}
    assert pk.default_knn_config(E, k, dtype) == table[dtype]
    assert table[torch.bfloat16] == table[torch.float16]
    assert table[torch.float32].fp32_precision == "tf32x3"
    ye, xe = _make(B, E, H, W, s, dtype, "normal", seed=5)
    dist, idx = pk.patch_knn(ye.to(DEVICE), xe.to(DEVICE), k, s, window)
    check_knn(ye, xe, k, s, window, dist, idx)
    edge = {c["dtype"]: c["edge"] for c in pk.DEFAULT_CONFIGS}[dtype]
    assert pk.default_edge_config(E, dtype) == edge
    check_diff(ye, xe, idx, pk.edge_features(ye.to(DEVICE), xe.to(DEVICE), idx))
    ye, xe = _special(ye, xe)
    window, k = 3, 9  # every candidate: the ranks of NaN and +inf show
    dist, idx = pk.patch_knn(ye.to(DEVICE), xe.to(DEVICE), k, s, window)
    rd, ri = _in_window_oracle(ye, xe, k, s, window)[:2]
    dist, idx = dist.cpu(), idx.cpu()
    nan, inf = torch.isnan(rd), torch.isinf(rd)
    assert nan.any() and inf.any()
    assert torch.equal(torch.isnan(dist), nan) and torch.equal(torch.isinf(dist), inf)
    assert torch.equal(idx[nan | inf], ri[nan | inf])


def test_default_split_scan(monkeypatch):
    """The launcher's own split: on an H100's 132 SMs (4 programs each) a 64 x 64 LR map
    with a 16 x 16 window (16 query blocks, 8 candidate tiles) gets 2 programs per block and
    the merge kernel; with the table's fp32 config (E = 20) it must give exactly the
    one-program scan's dist and idx, NaN and +inf included."""
    B, E, H, W, s, window, k = 1, 20, 64, 64, 2, 16, 5
    monkeypatch.setattr(pk, "_slots", lambda device, dtype: (132, 4))
    cfg = pk.default_knn_config(E, k, torch.float32)
    assert cfg == pk.DEFAULT_CONFIGS[0]["knn"] and cfg.splits is None
    geo = graph_geometry(H, W, s, 3, 2, window)
    assert pk.launch_splits(geo, cfg, B, DEVICE, torch.float32) == 2
    ye, xe = _special(*_make(B, E, H, W, s, torch.float32, "normal", seed=6))
    args = (ye.to(DEVICE), xe.to(DEVICE), k, s, window)
    split = pk.patch_knn(*args)
    whole = pk.patch_knn(*args, config=dataclasses.replace(cfg, splits=1))
    torch.testing.assert_close(split[0], whole[0], rtol=0, atol=0, equal_nan=True)
    assert torch.equal(split[1], whole[1])
    rd, ri = _in_window_oracle(ye, xe, k, s, window)[:2]
    special = torch.isnan(rd) | torch.isinf(rd)
    assert special.any() and torch.equal(split[1].cpu()[special], ri[special])


def test_auto_splits():
    """The launcher's split count at the bench's shapes on an H100 (132 SMs; resident
    programs per SM from patch_knn.CTAS_PER_SM: 4 for fp16 / bf16, 3 for fp32)."""
    cfg = pk.default_knn_config(64, 5, torch.bfloat16)

    def splits(lr_h, lr_w, B, dtype):
        geo = graph_geometry(lr_h, lr_w, 2, 3, 2, 30)
        programs = -(-geo.m1 // cfg.block_qr) * -(-geo.m2 // cfg.block_qc) * B
        per_sm = pk.CTAS_PER_SM[(dtype == torch.float32, 9)]
        return pk.auto_splits(programs, pk._tiles(geo, cfg), 132, per_sm)

    assert pk._tiles(graph_geometry(256, 256, 2, 3, 2, 30), cfg) == 35  # 33 x 33 union
    assert splits(128, 128, 1, torch.bfloat16) == 7  # 64 blocks, 31 tiles: 448 programs (85%)
    assert splits(256, 256, 1, torch.bfloat16) == 2  # 256 blocks
    assert splits(256, 256, 1, torch.float32) == 3  # 256 blocks, 396 slots
    assert splits(270, 480, 1, torch.bfloat16) == 1  # 510 blocks: a wave already
    assert splits(40, 40, 16, torch.bfloat16) == 1  # whole son grid: 4 tiles
    assert pk.auto_splits(10, 100, 0, 0) == 1  # no GPU
    assert pk.auto_splits(1, 1000, 132, 4) == 16  # capped


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_nan_semantics(dtype):
    """A NaN in ye poisons every candidate of the queries over it; a NaN in xe poisons one
    candidate column. NaN distances rank last, stay NaN, tie to the smaller n, idx in window."""
    B, E, H, W, s, window, k = 2, 3, 16, 18, 2, 3, 9  # k = wh * ww: NaN ranks show
    ye, xe = _make(B, E, H, W, s, dtype, "normal", seed=7)
    ye[0, 1, 5, 6] = float("nan")
    xe[0, 2, 3, 4] = float("nan")
    xe[1, 0, 0, 0] = float("nan")
    dist, idx = pk.patch_knn(ye.to(DEVICE), xe.to(DEVICE), k, s, window, config=SMALL)
    check_knn(ye, xe, k, s, window, dist, idx)
    nan = torch.isnan(dist.cpu())
    assert bool(nan[0].all(-1).any()), "the NaN query rows must be all-NaN"
    assert bool((nan[0].any(-1) & ~nan[0].all(-1)).any()), "some rows must rank NaN last"
    assert bool(nan[1].any()) and not bool(nan[1].all(-1).any())
    # the CPU (torch) path of ignn_triton.ops ranks NaN the same way
    ops = pytest.importorskip("ignn_triton.ops")
    cd, ci = ops.patch_knn(ye, xe, k, s, window)
    assert torch.equal(torch.isnan(cd), nan)
    assert torch.equal(ci[nan], idx.cpu()[nan])
    # everything NaN: idx = the first k in-window indices in ascending order, dist all NaN
    dist, idx = pk.patch_knn(torch.full_like(ye, float("nan")).to(DEVICE), xe.to(DEVICE), k, s,
                             window, config=SMALL)
    geo = graph_geometry(H, W, s, 3, 2, window)
    inside = ref.window_mask(geo.m1, geo.m2, geo.n1, geo.n2, s, window)
    first = torch.stack([row.nonzero()[:k, 0] for row in inside])  # (M, k)
    assert bool(torch.isnan(dist).all())
    assert torch.equal(idx.cpu(), first.expand(B, -1, -1))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_inf_ranks_before_nan():
    """+inf distances (an inf in xe) rank after every finite one and before NaN ones."""
    B, E, H, W, s, window, k = 1, 2, 12, 12, 2, 30, 9
    ye, xe = _make(B, E, H, W, s, torch.float32, "normal", seed=3)
    xe[0, 0, 0, 0] = float("inf")  # son patch 0: |k|^2 = inf, q.k = +-inf or NaN
    dist, idx = pk.patch_knn(ye.to(DEVICE), xe.to(DEVICE), k, s, window, config=SMALL)
    rd, ri = _in_window_oracle(ye, xe, k, s, window)[:2]
    dist, idx = dist.cpu(), idx.cpu()
    assert torch.equal(torch.isnan(dist), torch.isnan(rd))
    assert torch.equal(torch.isinf(dist), torch.isinf(rd))
    assert bool(torch.isinf(dist).any())
    # NaN / inf entries are the last ones, and they pick the same candidates as the reference
    special = torch.isnan(rd) | torch.isinf(rd)
    assert torch.equal(idx[special], ri[special])


# --------------------------------------------------------------------------- building blocks

@triton.jit
def _key_probe(d_ptr, thr_ptr, key_ptr, thr_d_ptr, keep_ptr, BLOCK: tl.constexpr):
    """key[i] = _key(d[i], i), thr_d[j] = _key_distance(thr[j]), and keep[i, j] = the k-NN
    kernel's pre-test ~(d >= thr_d) of candidate d[i] against the threshold key thr[j]."""
    r = tl.arange(0, BLOCK)
    d = tl.load(d_ptr + r)
    thr_d = pk._key_distance(tl.load(thr_ptr + r))
    tl.store(key_ptr + r, pk._key(d, r))
    tl.store(thr_d_ptr + r, thr_d)
    keep = ~(d[:, None] >= thr_d[None, :])
    tl.store(keep_ptr + r[:, None] * BLOCK + r[None, :], keep.to(tl.int8))


def test_key_order_and_pretest():
    """The k-NN kernel's int64 keys order by (d, n) with NaN after +inf (any sign or payload);
    _key_distance inverts _key bit for bit, and gives NaN for INT64_MAX (an empty slot); the fp32
    pre-test keeps every candidate whose key is below the threshold key, given what the
    kernel guarantees: the candidate's n is larger than the threshold key's (ascending scan),
    and d is not -0.0. Negative distances, denormals, infinities, ties in d, NaN candidates
    and NaN thresholds."""
    nan = float("nan")
    d = torch.tensor([-float("inf"), -3e38, -1.5, -1e-40, -0.0, 0.0, 1e-45, 1e-40, 1.0, 1.0,
                      1.0000001, 2.5, 3e38, float("inf"), nan, -nan])  # ascending key order
    n = d.numel()
    assert int(d[15].view(torch.int32)) < 0, "-nan must carry the sign bit"

    def probe(thr):
        key = torch.empty(n, dtype=torch.int64, device=DEVICE)
        thr_d = torch.empty(n, dtype=torch.float32, device=DEVICE)
        keep = torch.empty(n, n, dtype=torch.int8, device=DEVICE)
        _key_probe[(1,)](d.to(DEVICE), thr.to(DEVICE), key, thr_d, keep, BLOCK=n)
        return key.cpu(), thr_d.cpu(), keep.cpu().bool()

    key, thr_d, keep = probe(torch.full((n,), 2 ** 63 - 1))  # empty slots
    assert bool(torch.isnan(thr_d).all()) and bool(keep.all())
    assert bool((key[1:] > key[:-1]).all()), "keys not in (d, n) order"
    thr = key - torch.arange(n)  # threshold keys of the same distances with n = 0: every
    thr[3] = 2 ** 63 - 1  # candidate comes later in the scan; thr[3] is an empty slot
    _, thr_d, keep = probe(thr)
    real = ~torch.isnan(d)
    real[3] = False
    assert torch.equal(thr_d[real].view(torch.int32), d[real].view(torch.int32))
    assert bool(torch.isnan(thr_d[~real]).all())
    not_minus_zero = (d != 0) | ~d.signbit()
    below = (key[:, None] < thr[None, :]) & not_minus_zero[:, None]  # (candidate, threshold)
    assert bool(below.sum() > 100) and bool(keep[below].all()), \
        "the pre-test drops a candidate below the threshold"
    assert not bool(keep[12, 8]) and not bool(keep[13, 12]), "the pre-test keeps everything"
    assert not bool(keep[9, 8]), "a tie with the threshold (larger n) must not pass"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_padded_channels_last_and_norms(dtype):
    """The packing kernel writes the zero-padded channels-last copy exactly (pads and extra
    channels zero, odd sizes, EP not a power of two); the norm kernel sums squares in fp32."""
    from ignn_triton.geometry import grid_1d

    for (B, E, h, w, ep) in [(2, 5, 7, 9, 16), (1, 20, 6, 5, 32), (1, 70, 4, 7, 80)]:
        x = torch.randn(B, E, h, w).to(dtype)
        gh, gw = grid_1d(h), grid_1d(w)
        got = pk._padded_channels_last(x.to(DEVICE), gh, gw, ep).cpu()
        want = x.new_zeros(B, gh.pad_before + h + gh.pad_after,
                           gw.pad_before + w + gw.pad_after, ep)
        want[:, gh.pad_before: gh.pad_before + h, gw.pad_before: gw.pad_before + w, :E] = \
            x.permute(0, 2, 3, 1)
        assert torch.equal(got, want)
        geo = graph_geometry(h, w, 1)
        norms = pk._sqnorms(got.to(DEVICE), gh.count, gw.count, geo, 16).cpu()
        torch.testing.assert_close(norms.double(), _norms(x.double(), gh, gw), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- edge features

@SETTINGS
@given(B=st.integers(1, 2), E=st.integers(1, 20), hs=st.integers(3, 9), ws=st.integers(3, 9),
       s=st.sampled_from([2, 3]), k=st.integers(1, 6),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       seed=st.integers(0, 2 ** 31 - 1))
def test_edge_features_random_idx(B, E, hs, ws, s, k, dtype, seed):
    """Any valid idx (not only k-NN output), all dtypes: edge features have no tl.dot, so bf16
    is checked under the interpreter too."""
    ye, xe = _make(B, E, s * hs, s * ws, s, dtype, "normal", seed)
    geo = graph_geometry(s * hs, s * ws, s)
    g = torch.Generator().manual_seed(seed + 1)
    idx = torch.randint(0, geo.num_keys, (B, geo.num_queries, k), generator=g)
    for cfg in (EDGE_SMALL, None):
        diff = pk.edge_features(ye.to(DEVICE), xe.to(DEVICE), idx.to(DEVICE), config=cfg)
        check_diff(ye, xe, idx, diff)


def test_edge_features_nan():
    ye, xe = _make(1, 3, 12, 12, 2, torch.float32, "normal", seed=5)
    ye[0, 1, 4, 4] = float("nan")
    geo = graph_geometry(12, 12, 2)
    idx = torch.randint(0, geo.num_keys, (1, geo.num_queries, 3))
    diff = pk.edge_features(ye.to(DEVICE), xe.to(DEVICE), idx.to(DEVICE), config=EDGE_SMALL).cpu()
    check_diff(ye, xe, idx, diff)
    assert bool(torch.isnan(diff[..., 1]).any()) and not bool(torch.isnan(diff[..., 0]).any())


# --------------------------------------------------------------------------- bf16

def test_bf16_structure_everywhere():
    """What can be checked for the bf16 k-NN under the interpreter (its tl.dot is broken
    there): it runs, shapes and dtypes are right, idx valid, distinct and in the window.
    On a GPU the same call is checked for numbers by test_bf16_numerics_gpu."""
    B, E, H, W, s, window, k = 1, 6, 18, 16, 2, 4, 5
    ye, xe = _make(B, E, H, W, s, torch.bfloat16, "normal", seed=11)
    dist, idx = pk.patch_knn(ye.to(DEVICE), xe.to(DEVICE), k, s, window, config=SMALL)
    geo = graph_geometry(H, W, s, 3, 2, window)
    assert dist.shape == idx.shape == (B, geo.num_queries, k)
    assert dist.dtype == torch.float32 and idx.dtype == torch.int64
    inside = ref.window_mask(geo.m1, geo.m2, geo.n1, geo.n2, s, window)
    idx = idx.cpu()
    assert bool(torch.gather(inside.expand(B, -1, -1), 2, idx).all())
    assert bool((idx.sort(-1).values.diff(dim=-1) > 0).all())


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="GPU only: tl.dot on bf16 operands returns garbage under the triton "
                           "interpreter (TRITON_INTERPRET=1), so bf16 k-NN numerics need a GPU")
@pytest.mark.parametrize("config", KNN_CONFIGS, ids=_config_id)
@SETTINGS
@given(case=knn_cases(dtypes=(torch.bfloat16,)))
def test_bf16_numerics_gpu(case, config):
    ye, xe, dist, idx = _run(case, config)
    check_knn(ye, xe, case["k"], case["s"], case["window"], dist, idx, exact=case["kind"] == "int")
    check_diff(ye, xe, idx, pk.edge_features(ye.to(DEVICE), xe.to(DEVICE), idx))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU only: the spec's full-size shapes")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_default_config_full_size_gpu(dtype):
    """The spec's E = 64, k = 5, w = 30 on a 160x128 LR map: son grid 40x32, so the 30x30
    windows move with the query; the launcher's default configs."""
    B, E, H, W, s, window, k = 1, 64, 160, 128, 2, 30, 5
    ye, xe = _make(B, E, H, W, s, dtype, "normal", seed=1)
    dist, idx = pk.patch_knn(ye.to(DEVICE), xe.to(DEVICE), k, s, window)
    check_knn(ye, xe, k, s, window, dist, idx)
    check_diff(ye, xe, idx, pk.edge_features(ye.to(DEVICE), xe.to(DEVICE), idx))
