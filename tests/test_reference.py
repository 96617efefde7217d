"""Self-checks of reference/: properties that follow from the spec, not from the code."""
import torch
import torch.nn.functional as F

import ignn_triton.reference as R


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_window_covering_the_son_grid_is_global_search():
    ye, xe = _randn(2, 3, 14, 10, seed=1), _randn(2, 3, 7, 5, seed=2)
    dist, idx = R.patch_knn(ye, xe, k=4, scale=2, window=1000)
    # independent brute force: explicit differences of zero-padded 3x3 patches
    q = F.unfold(F.pad(ye, (0, 1, 0, 1)), 3, stride=2)  # (B, 27, M)  10, 14 even -> pad 1
    key = F.unfold(F.pad(xe, (0, 0, 0, 0)), 3, stride=2)  # 7, 5 odd -> no pad
    full = ((q[:, :, :, None] - key[:, :, None, :]) ** 2).sum(1)  # (B, M, N)
    expected = torch.sort(full, dim=-1, stable=True)
    torch.testing.assert_close(dist, expected.values[..., :4])
    assert torch.equal(idx, expected.indices[..., :4])


def test_window_restricts_candidates():
    ye, xe = _randn(1, 2, 24, 24, seed=3), _randn(1, 2, 12, 12, seed=4)
    _, idx = R.patch_knn(ye, xe, k=4, scale=2, window=2)
    # son grid 6x6 (12 even -> pad 1 -> 6 patches); query (i, j) window rows [ci, ci+2)
    for m in range(idx.shape[1]):
        i, j = divmod(m, 12)
        ci, cj = min(max(i // 2 - 1, 0), 4), min(max(j // 2 - 1, 0), 4)
        rows, cols = idx[0, m] // 6, idx[0, m] % 6
        assert ((rows >= ci) & (rows < ci + 2) & (cols >= cj) & (cols < cj + 2)).all()
        assert len(set(idx[0, m].tolist())) == 4


def test_ties_go_to_the_smaller_index():
    ye = torch.zeros(1, 1, 6, 6, dtype=torch.float64)
    xe = torch.zeros(1, 1, 3, 3, dtype=torch.float64)  # every distance is 0
    _, idx = R.patch_knn(ye, xe, k=1, scale=2, window=30)
    assert (idx == 0).all()


def test_adapn_gives_the_query_statistics():
    # stride == patch: HR blocks do not overlap, so knn_hr shows each Z block unfolded
    feat = _randn(1, 4, 18, 18, seed=5) * 3 + 1
    s, p, t = 2, 3, 3
    idx = torch.randint(0, 9, (1, 36, 2), generator=torch.Generator().manual_seed(6))
    knn = R.aggregate(feat, idx, s, p, t)  # (1, 2, 4, 36, 36)
    mu_q, sigma_q = R.query_stats(feat, p, t)  # (1, 4, 36)
    mu_k, sigma_k = R.key_stats(feat, s, p, t)  # (1, 4, 9)
    blocks = F.unfold(knn[0], 6, stride=6).view(2, 4, 36, 36)  # (k, C, 36 values, M)
    torch.testing.assert_close(blocks.mean(2), mu_q[0].expand(2, -1, -1))
    var_k = sigma_k ** 2 - R.graph.EPS  # the key block's own unbiased variance
    shrink = torch.sqrt(var_k / (var_k + R.graph.EPS))[0][:, idx[0].T]  # (C, k, M)
    torch.testing.assert_close(blocks.std(2), (sigma_q[0][:, None] * shrink).transpose(0, 1))


def test_fold_of_a_constant_is_that_constant():
    diff = torch.full((2, 20, 3, 4), 2.5, dtype=torch.float64)  # M = 4 x 5 queries
    d_hr = R.fold_edges(diff, (8, 10), scale=3)
    assert d_hr.shape == (2, 3, 4, 24, 30)
    torch.testing.assert_close(d_hr, torch.full_like(d_hr, 2.5))


def test_edge_features_of_a_patch_with_itself_are_zero():
    xe = _randn(1, 3, 7, 7, seed=7)
    dist, idx = R.patch_knn(xe, xe, k=2, scale=1, window=30)
    assert torch.equal(idx[..., 0], torch.arange(9)[None])  # every patch finds itself
    assert torch.all(dist[..., 0].abs() < 1e-9) and torch.all(dist[..., 1] > 1e-3)
    diff = R.edge_features(xe, xe, idx)  # (1, 9, 2, 3)
    assert torch.all(diff[:, :, 0] < 1e-12) and torch.all(diff[:, :, 1] > 0)


def test_weighted_sum_is_a_convex_combination():
    knn = _randn(1, 3, 2, 4, 4, seed=8)
    logits = _randn(1, 3, 4, 4, seed=9)
    out = R.weighted_sum(knn, logits)
    assert torch.all(out <= knn.max(1).values + 1e-12) and torch.all(out >= knn.min(1).values - 1e-12)
    same = R.weighted_sum(knn, torch.zeros_like(logits))
    torch.testing.assert_close(same, knn.mean(1))


def test_nan_distances_rank_last_but_never_leave_the_window():
    ye, xe = _randn(1, 1, 16, 16, seed=10), _randn(1, 1, 8, 8, seed=11)
    xe[..., :3, :3] = float("nan")  # every candidate of the top-left queries is NaN
    dist, idx = R.patch_knn(ye, xe, k=4, scale=2, window=2)
    inside = R.window_mask(8, 8, 4, 4, 2, 2)
    assert torch.all(inside.gather(1, idx[0]))
    assert torch.isnan(dist[0, 0]).all()  # query (0, 0): all four candidates poisoned
    finite = ~torch.isnan(dist)
    assert torch.all(finite[..., :-1] >= finite[..., 1:])  # numbers before NaN
