"""Patch grids, paddings and search windows of the graph aggregation (spec sections 2-3).

The one place these numbers are computed for the fast paths: the Triton launchers and the
memory-efficient torch ops both read a `GraphGeometry`. `reference/` computes its own.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Grid1d:
    """Patches of length `patch`, stride `stride` along one zero-padded dimension."""

    size: int  # unpadded length of the map
    patch: int
    stride: int
    pad_before: int
    pad_after: int
    count: int  # number of patches

    @property
    def padded(self) -> int:
        """Length of the zero-padded map."""
        return self.pad_before + self.size + self.pad_after


def grid_1d(size: int, patch: int = 3, stride: int = 2) -> Grid1d:
    """padv = (-(size - patch)) mod stride, split floor/ceil before/after (spec section 2)."""
    if size < patch:
        raise ValueError(f"a map of length {size} is shorter than the patch size {patch}")
    padv = (-(size - patch)) % stride
    before = padv // 2
    count = (size + padv - patch) // stride + 1
    return Grid1d(size, patch, stride, before, padv - before, count)


@dataclass(frozen=True)
class GraphGeometry:
    """Everything about the query grid (LR), the son grid (LR / s) and the window."""

    scale: int  # s
    patch: int  # p
    stride: int  # t
    query_h: Grid1d  # rows of the LR map, m1 = query_h.count
    query_w: Grid1d
    son_h: Grid1d  # rows of the son map, n1 = son_h.count
    son_w: Grid1d
    window_h: int  # wh = min(window, n1)
    window_w: int  # ww = min(window, n2)

    @property
    def m1(self) -> int:
        return self.query_h.count

    @property
    def m2(self) -> int:
        return self.query_w.count

    @property
    def n1(self) -> int:
        return self.son_h.count

    @property
    def n2(self) -> int:
        return self.son_w.count

    @property
    def num_queries(self) -> int:  # M
        return self.m1 * self.m2

    @property
    def num_keys(self) -> int:  # N
        return self.n1 * self.n2

    @property
    def num_candidates(self) -> int:
        return self.window_h * self.window_w

    @property
    def hr_patch(self) -> int:  # side of a key block in F and of a query's HR patch
        return self.patch * self.scale

    @property
    def hr_stride(self) -> int:
        return self.stride * self.scale


def graph_geometry(height: int, width: int, scale: int, patch: int = 3, stride: int = 2,
                   window: int = 30) -> GraphGeometry:
    """Geometry for an LR map of (height, width) whose son map is (height / s, width / s)."""
    if scale < 1:
        raise ValueError(f"scale must be a positive integer; got {scale}")
    if height % scale or width % scale:
        raise ValueError(f"the LR map ({height}, {width}) must be divisible by the scale {scale}")
    if window < 1:
        raise ValueError(f"window must be >= 1; got {window}")
    son_h = grid_1d(height // scale, patch, stride)
    son_w = grid_1d(width // scale, patch, stride)
    return GraphGeometry(scale, patch, stride, grid_1d(height, patch, stride),
                         grid_1d(width, patch, stride), son_h, son_w,
                         min(window, son_h.count), min(window, son_w.count))


def window_start(query: int, scale: int, window: int, son_count: int) -> int:
    """First son-grid row (or column) of the window of query row (or column) `query`."""
    return min(max(query // scale - window // 2, 0), son_count - window)
