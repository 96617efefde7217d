"""PSNR / SSIM on Y against a hand computation and scikit-image."""
import math

import numpy as np
import pytest
import skimage.data
import torch
from skimage.metrics import structural_similarity

from ignn_triton.imresize import imresize
from ignn_triton.metrics import luma, psnr_y, ssim_y


def _tensor(array):
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None].float() / 255


def _pairs():
    rng = np.random.default_rng(0)
    astro = skimage.data.astronaut()[100:196, 150:250]
    cam = np.repeat(skimage.data.camera()[200:290, 220:300, None], 3, axis=2)
    for img in (astro, cam):
        t = _tensor(img)
        yield img, imresize(imresize(t, 1 / 2), 2).clamp(0, 1)  # bicubic down-up
        noisy = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).round().astype(np.uint8)
        yield img, noisy


@pytest.mark.parametrize("border", [0, 2, 4])
def test_ssim_matches_scikit_image(border):
    values = []
    for a, b in _pairs():
        ours = ssim_y(a, b, border)
        ya, yb = luma(a, border), luma(b, border)
        ref = structural_similarity(ya, yb, gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False, data_range=255)
        assert abs(ours - ref) < 1e-6
        values.append(ours)
    assert all(0.3 < v < 0.999 for v in values)  # real degradations, not trivial cases
    assert ssim_y(a, a, border) == pytest.approx(1.0, abs=1e-12)


def test_luma_and_psnr_by_hand():
    a = np.zeros((6, 5, 3), np.uint8)
    a[..., 0], a[..., 1], a[..., 2] = 255, 128, 0
    expected_y = 16 + 65.481 + 128.553 * 128 / 255
    assert np.allclose(luma(a), expected_y)
    b = a.copy()
    b[2, 2] = (0, 0, 0)  # one pixel changes by expected_y - 16 in Y
    mse = (expected_y - 16) ** 2 / 30
    assert psnr_y(a, b, 0) == pytest.approx(10 * math.log10(255 ** 2 / mse), abs=1e-9)
    mse_cropped = (expected_y - 16) ** 2 / (4 * 3)  # border 1: 4x3 pixels left
    assert psnr_y(a, b, 1) == pytest.approx(10 * math.log10(255 ** 2 / mse_cropped), abs=1e-9)
    assert psnr_y(a, a, 0) == float("inf")


def test_tensor_and_array_inputs_agree_and_are_quantised():
    img = skimage.data.astronaut()[:40, :48]
    t = _tensor(img) + 0.4 / 255  # rounds back to the same 8-bit values
    assert psnr_y(t, img, 0) == float("inf")
    noisy = np.clip(img.astype(int) + 3, 0, 255).astype(np.uint8)
    assert psnr_y(t, noisy, 2) == pytest.approx(psnr_y(img, noisy, 2), abs=1e-12)
    assert ssim_y(t[0], _tensor(noisy), 2) == pytest.approx(ssim_y(img, noisy, 2), abs=1e-12)


def test_bad_inputs():
    a = np.zeros((12, 12, 3), np.uint8)
    with pytest.raises(ValueError, match="differ in size"):
        psnr_y(a, np.zeros((12, 13, 3), np.uint8), 0)
    with pytest.raises(ValueError, match="nothing left"):
        psnr_y(a, a, 6)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim_y(a, a, 1)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        psnr_y(np.zeros((12, 12), np.uint8), a, 0)
