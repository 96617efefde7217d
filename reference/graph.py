"""Naive graph aggregation of IGNN, written straight from the spec: the tests' oracle.

Everything here unfolds patches, builds full distance matrices and gathered tensors, and
folds them back with F.fold. It is slow and memory-hungry on purpose: it is meant to be
obviously right, and it works in float64. It depends on nothing else in this repository.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-5  # added to the unbiased variance in AdaPN


def _padding(size: int, patch: int, stride: int) -> tuple[int, int, int]:
    """(before, after, count) of spec section 2, computed here independently."""
    padv = (-(size - patch)) % stride
    before = padv // 2
    return before, padv - before, (size + padv - patch) // stride + 1


def _pad_map(x: torch.Tensor, patch: int, stride: int, factor: int = 1,
             grid_hw: tuple[int, int] | None = None) -> torch.Tensor:
    """Zero-pad x (B, C, h, w) like the patch grid of a (h, w) map -- or of `grid_hw` --
    with every padding multiplied by `factor`."""
    gh, gw = grid_hw if grid_hw is not None else x.shape[-2:]
    top, bottom, _ = _padding(gh, patch, stride)
    left, right, _ = _padding(gw, patch, stride)
    return F.pad(x, (left * factor, right * factor, top * factor, bottom * factor))


def _unfold(x: torch.Tensor, patch: int, stride: int) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, patch * patch, L) patches of the already padded map."""
    B, C = x.shape[:2]
    return F.unfold(x, patch, stride=stride).view(B, C, patch * patch, -1)


def window_mask(m1: int, m2: int, n1: int, n2: int, scale: int, window: int,
                device=None) -> torch.Tensor:
    """(M, N) bool: True where son patch n lies in the window of query m (spec section 3)."""
    wh, ww = min(window, n1), min(window, n2)
    ci = (torch.arange(m1, device=device) // scale - wh // 2).clamp(0, n1 - wh)  # (m1,)
    cj = (torch.arange(m2, device=device) // scale - ww // 2).clamp(0, n2 - ww)  # (m2,)
    a = torch.arange(n1, device=device)
    b = torch.arange(n2, device=device)
    rows = (a[None] >= ci[:, None]) & (a[None] < ci[:, None] + wh)  # (m1, n1)
    cols = (b[None] >= cj[:, None]) & (b[None] < cj[:, None] + ww)  # (m2, n2)
    return (rows[:, None, :, None] & cols[None, :, None, :]).reshape(m1 * m2, n1 * n2)


def patch_knn(ye: torch.Tensor, xe: torch.Tensor, k: int, scale: int, window: int = 30,
              patch: int = 3, stride: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """k nearest son patches of every query patch inside its window.

    ye (B, E, H, W) LR embedding, xe (B, E, H/s, W/s) son embedding.
    Returns dist (B, M, k) in ye's dtype, ascending, and idx (B, M, k) int64 flat son
    indices; ties go to the smaller index (stable sorts keep the index order); a NaN
    distance ranks after every number, but only in-window candidates are ever chosen.
    """
    B, E, H, W = ye.shape
    q = _unfold(_pad_map(ye, patch, stride), patch, stride).flatten(1, 2)  # (B, E*p*p, M)
    key = _unfold(_pad_map(xe, patch, stride), patch, stride).flatten(1, 2)  # (B, E*p*p, N)
    d = ((q * q).sum(1)[:, :, None] + (key * key).sum(1)[:, None, :]
         - 2 * q.transpose(1, 2) @ key)  # (B, M, N)
    m1, m2 = _padding(H, patch, stride)[2], _padding(W, patch, stride)[2]
    n1, n2 = _padding(xe.shape[2], patch, stride)[2], _padding(xe.shape[3], patch, stride)[2]
    inside = window_mask(m1, m2, n1, n2, scale, window, ye.device)  # (M, N)
    # ascending distance (NaN last), then in-window candidates first: two stable sorts
    _, order = torch.sort(d, dim=-1, stable=True)
    outside = (~inside).expand_as(d).gather(-1, order).to(torch.uint8)
    _, first_inside = torch.sort(outside, dim=-1, stable=True)
    idx = order.gather(-1, first_inside)[..., :k]
    return d.gather(-1, idx), idx.contiguous()


def edge_features(ye: torch.Tensor, xe: torch.Tensor, idx: torch.Tensor, patch: int = 3,
                  stride: int = 2) -> torch.Tensor:
    """diff (B, M, k, E): per channel, the sum over the patch positions of
    |query patch - neighbour patch| (spec section 4)."""
    q = _unfold(_pad_map(ye, patch, stride), patch, stride)  # (B, E, p*p, M)
    key = _unfold(_pad_map(xe, patch, stride), patch, stride)  # (B, E, p*p, N)
    B, E, P, M = q.shape
    k = idx.shape[-1]
    flat = idx.reshape(B, 1, 1, M * k).expand(B, E, P, M * k)
    neighbours = torch.gather(key, 3, flat).view(B, E, P, M, k)
    diff = (q[..., None] - neighbours).abs().sum(2)  # (B, E, M, k)
    return diff.permute(0, 2, 3, 1).contiguous()


def fold_hr(cols: torch.Tensor, lr_hw: tuple[int, int], scale: int, patch: int = 3,
            stride: int = 2) -> torch.Tensor:
    """Fold per-query HR blocks (B, D, (p*s)^2, M) onto the HR grid with overlap averaging
    and crop the padding: (B, D, sH, sW). Query m's block sits at HR padded rows
    [t*s*i, t*s*i + p*s); HR padding = LR padding x s (spec section 4)."""
    H, W = lr_hw
    top, bottom, _ = _padding(H, patch, stride)
    left, right, _ = _padding(W, patch, stride)
    out_hw = (scale * (H + top + bottom), scale * (W + left + right))
    B, D = cols.shape[:2]
    ps, ts = patch * scale, stride * scale
    total = F.fold(cols.flatten(1, 2), out_hw, ps, stride=ts)
    count = F.fold(torch.ones_like(cols[:1, :1]).flatten(1, 2), out_hw, ps, stride=ts)
    out = total / count
    return out[..., scale * top: scale * (top + H), scale * left: scale * (left + W)]


def fold_edges(diff: torch.Tensor, lr_hw: tuple[int, int], scale: int, patch: int = 3,
               stride: int = 2) -> torch.Tensor:
    """D_hr (B, k, E, sH, sW): each query's diff spread over its HR patch, overlap averaged."""
    B, M, k, E = diff.shape
    ps = patch * scale
    cols = diff.permute(0, 2, 3, 1).reshape(B, k * E, 1, M).expand(B, k * E, ps * ps, M)
    H, W = lr_hw
    return fold_hr(cols, lr_hw, scale, patch, stride).view(B, k, E, H * scale, W * scale)


def _stats(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """blocks (B, C, P, L) -> mean, sqrt(unbiased var + EPS), each (B, C, L)."""
    mean = blocks.mean(2)
    var = ((blocks - mean[:, :, None]) ** 2).sum(2) / (blocks.shape[2] - 1)
    return mean, torch.sqrt(var + EPS)


def query_stats(feat: torch.Tensor, patch: int = 3, stride: int = 2):
    """AdaPN statistics of the query patches of F (B, C, H, W): mean, std (B, C, M)."""
    return _stats(_unfold(_pad_map(feat, patch, stride), patch, stride))


def key_blocks(feat: torch.Tensor, scale: int, patch: int = 3, stride: int = 2) -> torch.Tensor:
    """The (p*s)x(p*s) block of F under every son patch: (B, C, (p*s)^2, N). F is padded by
    s x the son grid's padding (spec section 6)."""
    H, W = feat.shape[-2:]
    padded = _pad_map(feat, patch, stride, factor=scale, grid_hw=(H // scale, W // scale))
    return _unfold(padded, patch * scale, stride * scale)


def key_stats(feat: torch.Tensor, scale: int, patch: int = 3, stride: int = 2):
    """AdaPN statistics of the key blocks of F: mean, std (B, C, N)."""
    return _stats(key_blocks(feat, scale, patch, stride))


def aggregate(feat: torch.Tensor, idx: torch.Tensor, scale: int, patch: int = 3,
              stride: int = 2) -> torch.Tensor:
    """knn_hr (B, k, C, sH, sW): gather every neighbour's key block, AdaPN-normalise it to
    the query's statistics, fold with overlap averaging (spec section 6)."""
    B, C, H, W = feat.shape
    k = idx.shape[-1]
    blocks = key_blocks(feat, scale, patch, stride)  # (B, C, P, N)
    mu_k, sigma_k = _stats(blocks)
    mu_q, sigma_q = query_stats(feat, patch, stride)  # (B, C, M)
    M = mu_q.shape[-1]
    P = blocks.shape[2]
    flat = idx.reshape(B, 1, 1, M * k).expand(B, C, P, M * k)
    gathered = torch.gather(blocks, 3, flat).view(B, C, P, M, k)  # (B, C, P, M, k)
    n = idx.reshape(B, 1, M * k).expand(B, C, M * k)
    mu_kn = torch.gather(mu_k, 2, n).view(B, C, 1, M, k)
    sigma_kn = torch.gather(sigma_k, 2, n).view(B, C, 1, M, k)
    z = (gathered - mu_kn) / sigma_kn * sigma_q[:, :, None, :, None] + mu_q[:, :, None, :, None]
    cols = z.permute(0, 4, 1, 2, 3).reshape(B * k, C, P, M)
    return fold_hr(cols, (H, W), scale, patch, stride).view(B, k, C, H * scale, W * scale)


def weighted_sum(knn: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """sum_r softmax_r(logits) * knn[:, r]: knn (B, k, C, h, w), logits (B, k, h, w)."""
    return (torch.softmax(logits, dim=1)[:, :, None] * knn).sum(1)


def graph_aggregation(feat: torch.Tensor, ye: torch.Tensor, xe: torch.Tensor, scale: int, k: int,
                      window: int, weightnet_lr, weightnet_hr, den, patch: int = 3,
                      stride: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole GA block (spec sections 3-6) the naive way: (x1_lr, x1_hr).

    weightnet_lr / weightnet_hr map (B*k, E, h, w) edge maps to (B*k, 1, h, w) logits and
    den maps (B*k, C, sH, sW) to (B*k, C, H, W): the block's ECNs and DEN, passed in.
    """
    B, C, H, W = feat.shape
    _, idx = patch_knn(ye.detach(), xe.detach(), k, scale, window, patch, stride)
    d_hr = fold_edges(edge_features(ye.detach(), xe.detach(), idx, patch, stride), (H, W),
                      scale, patch, stride).to(feat.dtype)  # (B, k, E, sH, sW)
    d_lr = F.avg_pool2d(d_hr.flatten(0, 1), scale)  # (B*k, E, H, W)
    logits_hr = weightnet_hr(d_hr.flatten(0, 1)).view(B, k, scale * H, scale * W)
    logits_lr = weightnet_lr(d_lr).view(B, k, H, W)
    knn = aggregate(feat, idx, scale, patch, stride)  # (B, k, C, sH, sW)
    down = den(knn.flatten(0, 1)).view(B, k, C, H, W)
    return weighted_sum(down, logits_lr), weighted_sum(knn, logits_hr)
