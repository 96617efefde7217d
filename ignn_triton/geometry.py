"""Patch grids, paddings, HR offsets and search windows of the graph aggregation (spec
sections 2-3 and 6), and the AdaPN epsilon.

The one place these numbers are computed for the fast paths: the Triton launchers, their AOT
specs and the memory-efficient torch ops all read a `GraphGeometry` (Triton keeps its own
in-kernel window start). `reference/` computes its own.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch

EPS = 1e-5  # AdaPN: added to the unbiased variance of a patch (spec section 6)


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


class PatchGrid(NamedTuple):
    """A 2-D grid of patches, in the order the patch-statistics launchers and the torch path
    take it: patch g = (i, j) covers rows [stride*i - pad_top, stride*i - pad_top + patch)
    of the map (zeros outside it), columns likewise."""

    patch: int
    stride: int
    pad_top: int
    pad_left: int
    grid_h: int
    grid_w: int

    @property
    def slots(self) -> int:
        """The most patches that cover one pixel along an axis: ceil(patch / stride)."""
        return -(-self.patch // self.stride)


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

    @property
    def query_grid(self) -> PatchGrid:
        """The p x p query patches (stride t) of the LR map."""
        return PatchGrid(self.patch, self.stride, self.query_h.pad_before,
                         self.query_w.pad_before, self.m1, self.m2)

    @property
    def son_grid(self) -> PatchGrid:
        """The p x p son patches (stride t) of the son map."""
        return PatchGrid(self.patch, self.stride, self.son_h.pad_before, self.son_w.pad_before,
                         self.n1, self.n2)

    @property
    def key_grid(self) -> PatchGrid:
        """The key blocks of F, one per son patch: (p*s)^2 blocks at stride t*s over F padded
        by s x the son grid's padding (spec section 6)."""
        s = self.scale
        return PatchGrid(self.hr_patch, self.hr_stride, s * self.son_h.pad_before,
                         s * self.son_w.pad_before, self.n1, self.n2)

    @property
    def slots(self) -> int:
        """The most query patches covering an LR pixel along an axis, and HR patches an HR
        pixel: ceil(p / t) = ceil(ps / ts)."""
        return self.query_grid.slots

    @property
    def hr_height(self) -> int:  # sH
        return self.scale * self.query_h.size

    @property
    def hr_width(self) -> int:  # sW
        return self.scale * self.query_w.size

    @property
    def hr_top(self) -> int:
        """Rows of padding above the HR map in the padded HR grid of the query patches."""
        return self.scale * self.query_h.pad_before

    @property
    def hr_left(self) -> int:
        return self.scale * self.query_w.pad_before

    def window_start(self, axis: int, query: int) -> int:
        """First son row (axis 0) or column (axis 1) of the window of query row / column
        `query`."""
        if axis == 0:
            return window_start(query, self.scale, self.window_h, self.n1)
        return window_start(query, self.scale, self.window_w, self.n2)


def graph_geometry(height: int, width: int, scale: int, patch: int = 3, stride: int = 2,
                   window: int = 30) -> GraphGeometry:
    """Geometry for an LR map of (height, width) whose son map is (height / s, width / s).
    Cached: asking again for the same numbers is free (and gives the same object). Traced by
    torch.compile, or given symbolic sizes, it is built each time."""
    args = (height, width, scale, patch, stride, window)
    if torch.compiler.is_compiling() or not all(isinstance(a, int) for a in args):
        return _graph_geometry(*args)
    return _cached_geometry(*args)


def _graph_geometry(height: int, width: int, scale: int, patch: int, stride: int,
                    window: int) -> GraphGeometry:
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


_cached_geometry = functools.lru_cache(maxsize=1024)(_graph_geometry)


def window_start(query: int, scale: int, window: int, son_count: int) -> int:
    """First son-grid row (or column) of the window of query row (or column) `query`."""
    return min(max(query // scale - window // 2, 0), son_count - window)


def even_step(total: int, most: int) -> int:
    """The step that cuts `total` into the fewest pieces of at most `most`, of nearly equal
    size (the last smaller by less than their number): channel chunks and row bands of the
    CPU paths, so that no piece is a thin remainder."""
    return -(-total // -(-total // most))


def estimate_starts(starts: range) -> list[int]:
    """The first, a middle and the last of a loop's tile or band starts: what a memory
    estimate (fake tensors) replays, since every tile or band allocates like one of them."""
    return sorted({starts[0], starts[len(starts) // 2], starts[-1]})
