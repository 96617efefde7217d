"""GraphGeometry: the derived numbers that the launchers, their AOT specs and the torch path
read (patch grids, HR offsets, slots, window starts), checked against the spec's relations
written out here, and its cache."""
import warnings

import pytest
import torch

from ignn_triton.geometry import EPS, graph_geometry, window_start


@pytest.mark.parametrize("H, W, s", [(8, 10, 2), (9, 12, 3), (13, 7, 1), (24, 36, 4)])
def test_derived_numbers(H, W, s):
    geo = graph_geometry(H, W, s)
    qh, qw, sh, sw = geo.query_h, geo.query_w, geo.son_h, geo.son_w
    assert geo.query_grid == (3, 2, qh.pad_before, qw.pad_before, geo.m1, geo.m2)
    assert geo.son_grid == (3, 2, sh.pad_before, sw.pad_before, geo.n1, geo.n2)
    key = geo.key_grid
    assert key == (3 * s, 2 * s, s * sh.pad_before, s * sw.pad_before, geo.n1, geo.n2)
    # the key blocks tile F padded by s x the son padding: s x the padded son map
    assert (key.grid_h - 1) * key.stride + key.patch == s * sh.padded
    assert (key.grid_w - 1) * key.stride + key.patch == s * sw.padded
    assert (geo.hr_height, geo.hr_width) == (s * H, s * W)
    assert (geo.hr_top, geo.hr_left) == (s * qh.pad_before, s * qw.pad_before)
    assert geo.slots == geo.query_grid.slots == key.slots == 2  # ceil(3 / 2)
    for i in range(geo.m1):
        assert geo.window_start(0, i) == window_start(i, s, geo.window_h, geo.n1)
    for j in range(geo.m2):
        assert geo.window_start(1, j) == window_start(j, s, geo.window_w, geo.n2)
    assert EPS == 1e-5


def test_cached_and_traceable():
    """The same numbers give the same object, however they are passed; under torch.compile
    the geometry is built without the cache (Dynamo would warn about an lru_cache)."""
    geo = graph_geometry(16, 20, 2)
    assert graph_geometry(16, 20, 2, 3, 2, 30) is geo
    assert graph_geometry(16, 20, scale=2, window=30) is geo

    def queries(x):
        return x * graph_geometry(x.shape[2], x.shape[3], 2).num_queries

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = torch.compile(queries, fullgraph=True)(torch.ones(1, 1, 16, 20))
    assert torch.equal(got, torch.full((1, 1, 16, 20), float(geo.num_queries)))
    assert not [w for w in caught if "lru_cache" in str(w.message)]
