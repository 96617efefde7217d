"""MATLAB-compatible bicubic imresize against an independent scalar implementation."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ignn_triton.imresize import imresize


# ---------------------------------------------------------------------------------------------
# Scalar reference: MATLAB's imresize written out with Python floats and loops.


def cubic(x: float) -> float:
    ax = abs(x)
    if ax <= 1:
        return 1.5 * ax**3 - 2.5 * ax**2 + 1
    if ax <= 2:
        return -0.5 * ax**3 + 2.5 * ax**2 - 4 * ax + 2
    return 0.0


def out_length(n: int, scale: float) -> int:
    return math.ceil(n * scale - 1e-9)


def resize_line(values: list[float], scale: float, out_len: int) -> list[float]:
    """MATLAB's imresize along one dimension, one output sample at a time."""
    n = len(values)
    aux = list(range(1, n + 1)) + list(range(n, 0, -1))  # symmetric padding, 1-based
    if scale < 1:
        kernel_width = 4 / scale
        h = lambda d: scale * cubic(scale * d)  # noqa: E731
    else:
        kernel_width = 4
        h = cubic
    taps = math.ceil(kernel_width) + 2
    result = []
    for i in range(1, out_len + 1):
        u = i / scale + 0.5 * (1 - 1 / scale)
        left = math.floor(u - kernel_width / 2)
        js = [left + p for p in range(taps)]
        ws = [h(u - j) for j in js]
        total = sum(ws)
        result.append(sum(w / total * values[aux[(j - 1) % (2 * n)] - 1] for w, j in zip(ws, js)))
    return result


def resize_image(img: list[list[float]], scale_h: float, scale_w: float, out_h: int, out_w: int):
    """Separable scalar resize of one (H, W) image, smaller scale first, rows on a tie."""

    def rows(im):
        cols = [resize_line([r[c] for r in im], scale_h, out_h) for c in range(len(im[0]))]
        return [[cols[c][r] for c in range(len(cols))] for r in range(out_h)]

    def cols(im):
        return [resize_line(r, scale_w, out_w) for r in im]

    return rows(cols(img)) if scale_w < scale_h else cols(rows(img))


def reference(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Scalar reference applied to every (H, W) image of x (B, C, H, W)."""
    b, c, h, w = x.shape
    oh, ow = out_length(h, scale), out_length(w, scale)
    out = torch.empty(b, c, oh, ow, dtype=torch.float64)
    for bi in range(b):
        for ci in range(c):
            out[bi, ci] = torch.tensor(
                resize_image(x[bi, ci].tolist(), scale, scale, oh, ow), dtype=torch.float64
            )
    return out


def assert_exact(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float64 rounding."""
    torch.testing.assert_close(actual, expected, atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------------------------
# 1. Hand-computed values on 1-D signals.


@pytest.mark.parametrize(
    ("length", "scale", "expected_len"), [(8, 1 / 2, 4), (9, 1 / 3, 3), (4, 2.0, 8), (5, 3.0, 15)]
)
def test_1d_signal_matches_scalar_formula(length, scale, expected_len):
    signal = [math.sin(1.7 * k) + 0.1 * k * k for k in range(length)]
    expected = torch.tensor(resize_line(signal, scale, expected_len), dtype=torch.float64)
    line = torch.tensor(signal, dtype=torch.float64)

    # The singleton dimension is resized too (to ceil(scale) copies, all equal by mirroring).
    copies = math.ceil(scale)
    along_w = imresize(line.view(1, 1, 1, length), scale)  # (1, 1, copies, out)
    along_h = imresize(line.view(1, 1, length, 1), scale)  # (1, 1, out, copies)

    assert along_w.shape == (1, 1, copies, expected_len)
    assert along_h.shape == (1, 1, expected_len, copies)
    assert_exact(along_w[0, 0], expected.expand(copies, -1))
    assert_exact(along_h[0, 0].T, expected.expand(copies, -1))


# Kernel values used below: f(0.25) = 0.8671875, f(0.75) = 0.2265625,
# f(1.25) = -0.0703125, f(1.75) = -0.0234375 (they sum to 1).


def test_ramp_upscale_x2_literal():
    # x[j] = j for j = 1..8, scale 2: u = i / 2 + 0.25.
    # Keys' kernel reproduces linear functions, so wherever the 4 taps j in (u - 2, u + 2) stay
    # inside 1..8 (i = 4..13) the output is u itself: 2.25, 2.75, ..., 6.75.
    # At i = 1, u = 0.75, taps j = -1, 0, 1, 2 with weights f(1.75), f(0.75), f(0.25), f(1.25);
    # mirroring maps j = -1 -> 2 and j = 0 -> 1, so the output is
    # -0.0234375 * 2 + 0.2265625 * 1 + 0.8671875 * 1 - 0.0703125 * 2 = 0.90625.
    ramp = torch.arange(1, 9, dtype=torch.float64).view(1, 1, 1, 8)
    out = imresize(ramp, 2.0)[0, 0, 0]  # (16,)
    assert out.shape == (16,)
    interior = torch.tensor([2.25 + 0.5 * k for k in range(10)], dtype=torch.float64)
    assert_exact(out[3:13], interior)
    assert out[0].item() == pytest.approx(0.90625, abs=1e-12)
    # By symmetry the last sample mirrors the first: 9 - 0.90625.
    assert out[15].item() == pytest.approx(8.09375, abs=1e-12)


def test_ramp_downscale_half_literal():
    # x[j] = j for j = 1..16, scale 1/2: u = 2 i - 0.5, h(d) = f(d / 2) / 2, support |d| < 4.
    # Taps sit at d = +-0.5, +-1.5, +-2.5, +-3.5, symmetric about u, so away from the edges
    # (i = 3..6) the output is u: 5.5, 7.5, 9.5, 11.5.
    # At i = 1, u = 1.5: taps j = -2..5 with normalised weights f(|1.5 - j| / 2) / 2; mirroring
    # maps j = -2, -1, 0 -> 3, 2, 1, so the output is
    # (f(1.75) * (3 + 5) + f(1.25) * (2 + 4) + f(0.75) * (1 + 3) + f(0.25) * (1 + 2)) / 2
    # = (-0.1875 - 0.421875 + 0.90625 + 2.6015625) / 2 = 1.44921875.
    ramp = torch.arange(1, 17, dtype=torch.float64).view(1, 1, 16, 1)
    out = imresize(ramp, 0.5).flatten()  # (8,)
    assert out.shape == (8,)
    assert_exact(out[2:6], torch.tensor([5.5, 7.5, 9.5, 11.5], dtype=torch.float64))
    assert out[0].item() == pytest.approx(1.44921875, abs=1e-12)
    assert out[7].item() == pytest.approx(17 - 1.44921875, abs=1e-12)


def test_identity_at_scale_one():
    x = torch.rand(2, 3, 5, 7, dtype=torch.float64)
    assert_exact(imresize(x, 1.0), x)


def test_output_length_forgives_float_error():
    x = torch.rand(1, 1, 9, 30, dtype=torch.float64)
    assert imresize(x, 1 / 3).shape == (1, 1, 3, 10)
    assert imresize(x, 0.1).shape == (1, 1, 1, 3)


# ---------------------------------------------------------------------------------------------
# 2. Random images against the scalar reference.

SCALES = [1 / 2, 1 / 3, 1 / 4, 2.0, 3.0]


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 2),
    c=st.integers(1, 2),
    h=st.integers(1, 10),
    w=st.integers(1, 10),
    scale=st.sampled_from(SCALES),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_images_match_scalar_reference(b, c, h, w, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, h, w, dtype=torch.float64, generator=gen)
    out = imresize(x, scale)
    assert out.shape == (b, c, math.ceil(h * scale - 1e-9), math.ceil(w * scale - 1e-9))
    assert out.dtype == torch.float64
    assert_exact(out, reference(x, scale))


@pytest.mark.parametrize(
    ("size", "scales"), [((3, 12), (3 / 6, 12 / 4)), ((12, 2), (12 / 6, 2 / 4))]
)
def test_size_argument_uses_per_dimension_scales(size, scales):
    x = torch.randn(1, 1, 6, 4, dtype=torch.float64)
    out = imresize(x, size=size)
    expected = resize_image(x[0, 0].tolist(), scales[0], scales[1], *size)
    assert out.shape == (1, 1, *size)
    assert_exact(out[0, 0], torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("scale", SCALES)
def test_interior_matches_torch_antialiased_bicubic(scale):
    # torch's antialiased bicubic uses the same kernel and sample positions but clamps at the
    # border instead of mirroring: compare only outputs whose support stays inside the image.
    n = 40
    x = torch.rand(1, 1, n, n, dtype=torch.float64)
    ours = imresize(x, scale)
    theirs = F.interpolate(
        x, scale_factor=scale, mode="bicubic", antialias=True, align_corners=False
    )
    radius = 2 / min(scale, 1.0)  # kernel support in input samples
    centres = [(i + 0.5) / scale - 0.5 for i in range(ours.shape[-1])]  # 0-based input coords
    inside = [i for i, c in enumerate(centres) if radius <= c <= n - 1 - radius]
    assert len(inside) >= 4
    idx = torch.tensor(inside)
    assert_exact(ours[..., idx, :][..., idx], theirs[..., idx, :][..., idx])


# ---------------------------------------------------------------------------------------------
# 3. Constants, dtypes, ranks, batch independence.


@pytest.mark.parametrize("scale", SCALES)
def test_constant_image_stays_constant(scale):
    x = torch.full((2, 3, 7, 5), 0.37, dtype=torch.float64)
    out = imresize(x, scale)
    assert_exact(out, torch.full_like(out, 0.37))


@pytest.mark.parametrize(
    ("dtype", "atol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)]
)
@pytest.mark.parametrize("scale", [1 / 3, 2.0])
def test_low_precision_dtypes(dtype, atol, scale):
    x = torch.rand(2, 3, 9, 8, dtype=torch.float64)
    expected = imresize(x, scale)
    out = imresize(x.to(dtype), scale)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, atol=atol, rtol=0)


@pytest.mark.parametrize("scale", [1 / 4, 3.0])
def test_batch_independence(scale):
    x = torch.randn(3, 2, 8, 11, dtype=torch.float64)
    batched = imresize(x, scale)
    for k in range(3):
        assert_exact(batched[k : k + 1], imresize(x[k : k + 1], scale))


def test_lower_ranks_keep_their_rank():
    x = torch.randn(2, 6, 9, dtype=torch.float64)
    full = imresize(x[None], 1 / 3)  # (1, 2, 2, 3)
    chw = imresize(x, 1 / 3)
    hw = imresize(x[0], 1 / 3)
    assert chw.shape == (2, 2, 3) and hw.shape == (2, 3)
    assert_exact(chw, full[0])
    assert_exact(hw, full[0, 0])


def test_non_contiguous_input():
    x = torch.randn(1, 2, 10, 12, dtype=torch.float64)
    xt = x.transpose(-1, -2)  # (1, 2, 12, 10), non-contiguous
    assert_exact(imresize(xt, 0.5), imresize(xt.contiguous(), 0.5))


# ---------------------------------------------------------------------------------------------
# 4. Bad inputs.


@pytest.mark.parametrize(
    ("x", "kwargs", "match"),
    [
        (torch.ones(1, 1, 4, 4, dtype=torch.int64), {"scale": 2.0}, "float tensor.*torch.int64"),
        (torch.ones(1, 1, 4, 4, dtype=torch.uint8), {"scale": 2.0}, "float tensor"),
        ([[1.0, 2.0]], {"scale": 2.0}, "float tensor"),
        (torch.ones(4), {"scale": 2.0}, "shape"),
        (torch.ones(1, 1, 1, 4, 4), {"scale": 2.0}, "shape"),
        (torch.ones(1, 1, 0, 4), {"scale": 2.0}, "empty"),
        (torch.ones(0, 1, 4, 4), {"scale": 2.0}, "empty"),
        (torch.ones(1, 1, 4, 4), {"scale": 0.0}, "positive"),
        (torch.ones(1, 1, 4, 4), {"scale": -2.0}, "positive"),
        (torch.ones(1, 1, 4, 4), {"scale": float("inf")}, "positive"),
        (torch.ones(1, 1, 4, 4), {"scale": float("nan")}, "positive"),
        (torch.ones(1, 1, 4, 4), {}, "exactly one"),
        (torch.ones(1, 1, 4, 4), {"scale": 2.0, "size": (8, 8)}, "exactly one"),
        (torch.ones(1, 1, 4, 4), {"size": (8,)}, "two positive ints"),
        (torch.ones(1, 1, 4, 4), {"size": (8, 0)}, "two positive ints"),
        (torch.ones(1, 1, 4, 4), {"size": (8.0, 8)}, "two positive ints"),
    ],
)
def test_bad_inputs_raise(x, kwargs, match):
    with pytest.raises(ValueError, match=match):
        imresize(x, **kwargs)
