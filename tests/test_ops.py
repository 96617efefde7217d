"""The torch (CPU) path of ignn_triton.ops against reference/, in float64; and where the two
paths must agree beyond the reference: out-of-range indices, deterministic mode."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import ignn_triton.reference as R
from ignn_triton import kernels, ops, torch_backend
from ignn_triton.geometry import graph_geometry

CUDA = torch.cuda.is_available()


@st.composite
def graph_case(draw):
    s = draw(st.sampled_from([2, 3]))
    # LR sizes: multiples of s whose son map is at least 3 wide, odd grids included
    H = s * draw(st.integers(3, 9))
    W = s * draw(st.integers(3, 9))
    window = draw(st.integers(1, 6))
    geo = graph_geometry(H, W, s, window=window)
    k = draw(st.integers(1, min(8, geo.num_candidates)))
    B = draw(st.integers(1, 2))
    E = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2 ** 16))
    return B, E, H, W, s, window, k, seed


def _inputs(B, E, H, W, s, seed, C=None):
    g = torch.Generator().manual_seed(seed)
    ye = torch.randn(B, E, H, W, generator=g, dtype=torch.float64)
    xe = torch.randn(B, E, H // s, W // s, generator=g, dtype=torch.float64)
    feat = torch.randn(B, C or E + 2, H, W, generator=g, dtype=torch.float64)
    return ye, xe, feat


@settings(max_examples=40, deadline=None)
@given(graph_case())
def test_patch_knn_and_edges_match_reference(case):
    B, E, H, W, s, window, k, seed = case
    ye, xe, _ = _inputs(B, E, H, W, s, seed)
    dist, idx = ops.patch_knn(ye, xe, k, s, window)
    ref_dist, ref_idx = R.patch_knn(ye, xe, k, s, window)
    assert dist.dtype == torch.float32 and idx.dtype == torch.int64
    torch.testing.assert_close(dist.double(), ref_dist, rtol=1e-6, atol=1e-6)
    assert torch.equal(idx, ref_idx)  # float64 distances: no near-ties on random data
    diff = ops.edge_features(ye, xe, idx, s)
    torch.testing.assert_close(diff, R.edge_features(ye, xe, idx), rtol=1e-12, atol=1e-12)
    d_hr = R.fold_edges(diff, (H, W), s)
    torch.testing.assert_close(ops.fold_edges(diff, (H, W), s), d_hr, rtol=1e-12, atol=1e-12)
    # the LR edge maps the model uses: the spec's avg_pool(D_hr, s)
    d_lr = F.avg_pool2d(d_hr.flatten(0, 1), s).view(B, k, E, H, W)
    torch.testing.assert_close(ops.edge_maps(diff, (H, W)), d_lr, rtol=1e-12, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(graph_case(), st.integers(1, 7))
def test_stats_and_aggregate_match_reference(case, C):
    B, E, H, W, s, window, k, seed = case
    ye, xe, feat = _inputs(B, E, H, W, s, seed, C)
    _, idx = R.patch_knn(ye, xe, k, s, window)
    query, key = ops.query_stats(feat), ops.key_stats(feat, s)
    for got, want in zip(query + key, R.query_stats(feat) + R.key_stats(feat, s)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    knn = ops.patch_aggregate(feat, idx, query, key, s)
    torch.testing.assert_close(knn, R.aggregate(feat, idx, s), rtol=1e-10, atol=1e-10)
    out = torch.full_like(knn, float("nan"))  # every element must be written
    assert ops.patch_aggregate(feat, idx, query, key, s, out=out) is out
    assert torch.equal(out, knn)
    logits = torch.randn(B, k, s * H, s * W, dtype=torch.float64)
    torch.testing.assert_close(ops.patch_aggregate(feat, idx, query, key, s, logits=logits),
                               R.weighted_sum(R.aggregate(feat, idx, s), logits))


def test_aggregate_into_out_refuses_what_it_cannot_write():
    B, C, H, W, s, k = 1, 3, 12, 10, 2, 3
    ye, xe, feat = _inputs(B, 2, H, W, s, 5, C)
    _, idx = R.patch_knn(ye, xe, k, s, 4)
    query, key = ops.query_stats(feat), ops.key_stats(feat, s)
    good = torch.empty(B, k, C, s * H, s * W, dtype=torch.float64)
    wrong_shape, wrong_dtype = good[:, :1], good.float()
    wrong_layout = good.transpose(3, 4).contiguous().transpose(3, 4)
    for out in (wrong_shape, wrong_dtype, wrong_layout):
        with pytest.raises(ValueError, match="out must be a contiguous"):
            ops.patch_aggregate(feat, idx, query, key, s, out=out)
    logits = torch.zeros(B, k, s * H, s * W, dtype=torch.float64)
    with pytest.raises(ValueError, match="cannot be given with logits"):
        ops.patch_aggregate(feat, idx, query, key, s, logits=logits, out=good)
    f = feat.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="records no gradient"):
        ops.patch_aggregate(f, idx, ops.query_stats(f), ops.key_stats(f, s), s, out=good)
    with torch.no_grad():
        assert ops.patch_aggregate(f, idx, query, key, s, out=good) is good


def test_aggregate_gradients_match_reference():
    B, C, H, W, s, k = 1, 3, 12, 10, 2, 3
    ye, xe, feat = _inputs(B, 2, H, W, s, 11, C)
    _, idx = R.patch_knn(ye, xe, k, s, 3)
    logits = torch.randn(B, k, s * H, s * W, dtype=torch.float64)

    def ours(f, lg):
        return ops.patch_aggregate(f, idx, ops.query_stats(f), ops.key_stats(f, s), s, logits=lg)

    f1 = feat.clone().requires_grad_()
    l1 = logits.clone().requires_grad_()
    f2 = feat.clone().requires_grad_()
    l2 = logits.clone().requires_grad_()
    upstream = torch.randn(B, C, s * H, s * W, dtype=torch.float64)
    (ours(f1, l1) * upstream).sum().backward()
    (R.weighted_sum(R.aggregate(f2, idx, s), l2) * upstream).sum().backward()
    torch.testing.assert_close(f1.grad, f2.grad)
    torch.testing.assert_close(l1.grad, l2.grad)
    assert torch.autograd.gradcheck(ours, (f1.detach().requires_grad_(), l1.detach().requires_grad_()))


@pytest.mark.parametrize("s, gather_rows", [(2, 1), (2, 2), (3, 2)])
def test_aggregate_chunks_match_reference(monkeypatch, s, gather_rows):
    """The CPU aggregation and its backward in channel chunks (5 channels as 2 + 2 + 1) and
    query-row chunks (one or two rows, an odd number of rows: a short last chunk), both
    outputs, B = 2: values and gradients (through the statistics too) vs the reference."""
    B, C, H, W, k = 2, 5, 9 * s, 5 * s, 3
    ye, xe, feat = _inputs(B, 2, H, W, s, 3, C)
    _, idx = R.patch_knn(ye, xe, k, s, 3)
    geo = graph_geometry(H, W, s)
    assert geo.m1 % 2 == 1
    q = -(-geo.hr_patch // geo.hr_stride) - 1
    hr_area = (geo.m1 + q) * (geo.m2 + q) * geo.hr_stride ** 2
    monkeypatch.setattr(torch_backend, "CHUNK_ELEMENTS", 2 * max(geo.num_keys * geo.hr_patch ** 2, hr_area))
    monkeypatch.setattr(torch_backend, "GATHER_ELEMENTS", gather_rows * geo.m2 * 2 * geo.hr_patch ** 2)
    assert torch_backend.cpu_chunks(geo, C) == (2, gather_rows)
    logits = torch.randn(B, k, s * H, s * W, dtype=torch.float64)
    for lg in (None, logits):  # knn_hr (B, k, C, sH, sW), then x1_hr (B, C, sH, sW)
        f1, f2 = feat.clone().requires_grad_(), feat.clone().requires_grad_()
        l1, l2 = (None, None) if lg is None else (lg.clone().requires_grad_(),
                                                  lg.clone().requires_grad_())
        got = ops.patch_aggregate(f1, idx, ops.query_stats(f1), ops.key_stats(f1, s), s,
                                  logits=l1)
        want = R.aggregate(f2, idx, s)
        want = want if lg is None else R.weighted_sum(want, l2)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        upstream = torch.randn_like(want)
        (got * upstream).sum().backward()
        (want * upstream).sum().backward()
        torch.testing.assert_close(f1.grad, f2.grad, rtol=1e-10, atol=1e-10)
        if lg is not None:
            torch.testing.assert_close(l1.grad, l2.grad, rtol=1e-10, atol=1e-10)


def test_knn_tiles_give_the_untiled_result(monkeypatch):
    ye, xe, _ = _inputs(1, 3, 30, 26, 2, 5)
    whole = ops.patch_knn(ye, xe, 4, 2, 4)
    monkeypatch.setattr(torch_backend, "KNN_TILE", 1)  # one query per tile
    tiled = ops.patch_knn(ye, xe, 4, 2, 4)
    assert torch.equal(whole[1], tiled[1])
    torch.testing.assert_close(whole[0], tiled[0], rtol=1e-6, atol=1e-6)  # matmul blocking
    _, idx = whole
    torch.testing.assert_close(ops.edge_features(ye, xe, idx, 2), R.edge_features(ye, xe, idx),
                               rtol=1e-12, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 12), st.integers(1, 40), st.integers(0, 2 ** 16),
       st.sampled_from(["ties", "nan", "inf", "mixed"]))
def test_k_smallest_is_a_stable_sort(k, length, seed, kind):
    """The two top-k selections of the CPU k-NN choose and order what a stable sort does:
    ties to the smaller position, NaN last, rows with fewer than k numbers included."""
    k = min(k, length)
    g = torch.Generator().manual_seed(seed)
    d = torch.randint(0, 4, (7, length), generator=g).double()  # many ties
    mask = torch.rand(7, length, generator=g) < 0.3
    if kind in ("nan", "mixed"):
        d[mask] = float("nan")
    if kind in ("inf", "mixed"):
        d[torch.rand(7, length, generator=g) < 0.2] = float("inf")
    d[0] = float("nan")  # a row without numbers
    values, pos = torch_backend.k_smallest(d, k)
    want_values, want_pos = torch.sort(d, dim=-1, stable=True)
    assert torch.equal(pos, want_pos[:, :k])
    torch.testing.assert_close(values, want_values[:, :k].float(), equal_nan=True)


def test_nan_embedding_ranks_last_and_stays_in_window():
    ye, xe, _ = _inputs(1, 2, 16, 16, 2, 3)
    xe[0, 0, 2, 3] = float("nan")  # poisons every son patch that covers it
    dist, idx = ops.patch_knn(ye, xe, 9, 2, 3)
    mask = R.window_mask(8, 8, 4, 4, 2, 3)  # (M, N)
    assert torch.all(mask.gather(1, idx[0]))
    nan = torch.isnan(dist[0])
    # NaN distances come after every number in each row
    for row_nan, row in zip(nan, dist[0]):
        first = int(row_nan.float().argmax()) if row_nan.any() else 9
        assert not row_nan[:first].any() and row_nan[first:].all()
        assert torch.all(row[:first][1:] >= row[:first][:-1])
    assert nan.any()


@pytest.mark.parametrize("bad, match", [
    (lambda ye, xe: (ye.long(), xe.long()), "float32"),
    (lambda ye, xe: (ye, xe[:, :1]), "son embedding"),
    (lambda ye, xe: (ye, xe[:1]), "son embedding"),
    (lambda ye, xe: (ye[0], xe), r"\(B, E, h, w\)"),
    (lambda ye, xe: (ye, xe.float()), "share dtype"),
])
def test_bad_embeddings_are_refused(bad, match):
    ye, xe, _ = _inputs(2, 3, 12, 12, 2, 0)
    with pytest.raises(ValueError, match=match):
        ops.patch_knn(*bad(ye, xe), 3, 2, 30)


def test_k_larger_than_the_window_is_refused():
    ye, xe, _ = _inputs(1, 3, 12, 12, 2, 0)
    with pytest.raises(ValueError, match=r"k must be in \[1, wh\*ww\] = \[1, 4\]"):
        ops.patch_knn(ye, xe, 5, 2, 2)


def _kernel_path(monkeypatch):
    """Where the Triton kernels run behind ops: CUDA with a GPU; else CPU tensors through the
    CUDA dispatch, the kernels under the interpreter (conftest sets TRITON_INTERPRET=1)."""
    if CUDA:
        return torch.device("cuda")
    monkeypatch.setattr(ops, "_use_triton", lambda *tensors: kernels.HAS_TRITON and all(
        t.dtype != torch.float64 for t in tensors if t.is_floating_point()))
    return torch.device("cpu")


def _bad_idx_case():
    ye, xe, feat = (t.float() for t in _inputs(1, 3, 12, 10, 2, 0, C=4))
    geo = graph_geometry(12, 10, 2)
    idx = torch.randint(0, geo.num_keys, (1, geo.num_queries, 2),
                        generator=torch.Generator().manual_seed(1))
    idx[0, 0, 0] = geo.num_keys  # first query, rank 0
    idx[0, 7, 1] = -1
    idx[0, -1, 0] = geo.num_keys + 100  # last query
    logits = torch.randn(1, 2, 24, 20, generator=torch.Generator().manual_seed(2))
    return ye, xe, feat, idx, logits, geo


def _ops_results(ye, xe, feat, idx, logits, device):
    """edge features; knn_hr and x1_hr with the gradients of a random loss (feat, logits)."""
    ye, xe, idx, logits = (t.to(device) for t in (ye, xe, idx, logits))
    out = {"diff": ops.edge_features(ye, xe, idx, 2)}
    for name, lg in (("knn", None), ("x1", logits)):
        f = feat.to(device).requires_grad_()
        lg = None if lg is None else lg.clone().requires_grad_()
        y = ops.patch_aggregate(f, idx, ops.query_stats(f), ops.key_stats(f, 2), 2, logits=lg)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(device)
        torch.nan_to_num(y * g).sum().backward()
        out[name], out[name + " grad feat"] = y, f.grad
        if lg is not None:
            out["x1 grad logits"] = lg.grad
    return {k: v.detach().cpu() for k, v in out.items()}


def test_out_of_range_indices_give_nan_on_both_paths(monkeypatch):
    """An idx entry outside [0, N) (unchecked: checking would synchronise with the GPU) gives
    NaN exactly where it is used, on the torch path and through the kernels alike: its edge
    features (every channel), the HR pixels of its query's patch in its rank's knn_hr plane
    and in x1_hr; no contribution to the gradient of F; NaN in the logits' gradient at
    those pixels. Elsewhere both paths agree with each other."""
    ye, xe, feat, idx, logits, geo = _bad_idx_case()
    torch_path = _ops_results(ye, xe, feat, idx, logits, "cpu")
    device = _kernel_path(monkeypatch)
    kernel_path = _ops_results(ye, xe, feat, idx, logits, device)
    bad = (idx < 0) | (idx >= geo.num_keys)  # (B, M, k)
    cols = bad.permute(0, 2, 1)[:, :, None, :].double().expand(1, 2, 36, geo.num_queries)
    nan_hr = R.fold_hr(cols, (12, 10), 2) > 0  # (B, k, sH, sW)
    want_nan = {"diff": bad[..., None].expand(-1, -1, -1, 3),
                "knn": nan_hr[:, :, None].expand(-1, -1, 4, -1, -1),
                "x1": nan_hr.any(1, keepdim=True).expand(-1, 4, -1, -1),
                "x1 grad logits": nan_hr.any(1, keepdim=True).expand(-1, 2, -1, -1)}
    for name, got in torch_path.items():
        nan = want_nan.get(name, torch.zeros_like(got, dtype=torch.bool))
        for path, value in (("torch", got), ("kernels", kernel_path[name])):
            assert torch.equal(torch.isnan(value), nan), f"{name}, {path} path: NaN pattern"
        torch.testing.assert_close(kernel_path[name], got, rtol=1e-4, atol=1e-4, equal_nan=True,
                                   msg=name)
    with pytest.raises(ValueError, match="int64"):
        ops.edge_features(ye, xe, idx.int(), 2)


def test_deterministic_algorithms_take_the_torch_backward(monkeypatch):
    """The kernels' aggregation backward adds with fp32 atomics (the order varies run to run).
    Under torch.use_deterministic_algorithms(True) the torch implementation runs instead:
    the same gradients to rounding, bit-identical from run to run; off, the kernel runs."""
    device = _kernel_path(monkeypatch)
    calls = []
    for owner, name in ((kernels, "patch_aggregate_backward"), (torch_backend, "aggregate_backward")):
        def spy(*args, _fn=getattr(owner, name), _name=name, **kwargs):
            calls.append(_name)
            return _fn(*args, **kwargs)
        monkeypatch.setattr(owner, name, spy)
    _, _, feat, idx, logits, geo = _bad_idx_case()
    idx = idx.clamp(0, geo.num_keys - 1).to(device)
    logits = logits.to(device)

    def gradients():
        f = feat.to(device).requires_grad_()
        lg = logits.clone().requires_grad_()
        y = ops.patch_aggregate(f, idx, ops.query_stats(f), ops.key_stats(f, 2), 2, logits=lg)
        (y * torch.linspace(-1, 1, y.numel(), device=device).view(y.shape)).sum().backward()
        return f.grad, lg.grad

    kernel_grads = gradients()
    assert calls == ["patch_aggregate_backward"]
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = gradients(), gradients()
    finally:
        torch.use_deterministic_algorithms(previous)
    assert calls[1:] == ["aggregate_backward"] * 2
    for a, b, k in zip(first, second, kernel_grads):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, k, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("s, H, W", [(2, 18, 10), (3, 21, 27), (2, 8, 14)])
def test_fold_edges_cpu_equals_the_cuda_formulation(s, H, W):
    """Constant patches fold with strided broadcast adds on the CPU and with a transposed
    box convolution on CUDA: the same map (both run here, on CPU tensors)."""
    geo = graph_geometry(H, W, s)
    values = torch.randn(2, 5, geo.m1, geo.m2, dtype=torch.float64)
    torch.testing.assert_close(torch_backend.fold_constant(values, geo),
                               torch_backend.fold_constant_conv(values, geo), rtol=1e-12, atol=1e-12)
