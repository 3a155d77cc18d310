"""Paired fidelity: PSNR / SSIM / feature distance against the same seeds' unaccelerated images."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from diffaccel.evals import EvalInputError, FeatureExtractor, paired_fidelity
from diffaccel.evals.paired import psnr_per_image, ssim_kernel_size, ssim_per_image


class FlatPixels(FeatureExtractor):
    """A real (parameter-free) extractor: the flattened 8x8 grey pixels, so distances can be computed by hand."""

    name = "flat-pixels"
    num_features = 64
    native_size = 8
    channels = 1

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def _constant(value: int, n: int = 2, side: int = 16) -> torch.Tensor:
    return torch.full((n, 1, side, side), value, dtype=torch.uint8)


def test_identical_images_are_json_safe():
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (3, 3, 16, 16), generator=g, dtype=torch.uint8)
    r = paired_fidelity(imgs, imgs.clone(), extractor=None)
    assert math.isinf(r.psnr) and r.identical == 3 and r.n == 3
    # SSIM of identical images is 1; float64 over a 16x16 window sum rounds at ~1e-15
    assert r.ssim == pytest.approx(1.0, abs=1e-12)
    d = r.as_dict()
    assert d["psnr"] is None and d["psnr_min"] is None
    json.dumps(d, allow_nan=False)  # strict JSON: no Infinity / NaN tokens
    assert r["ssim"] == r.ssim


def test_psnr_known_value_and_identical_pairs_left_out_of_the_mean():
    a = torch.cat([_constant(100, 1), _constant(50, 1)])
    b = torch.cat([_constant(110, 1), _constant(50, 1)])  # pair 0: MSE 100, pair 1: identical
    r = paired_fidelity(a, b, extractor=None)
    expected = 10 * math.log10(255**2 / 100)  # 28.1308 dB
    assert r.psnr == pytest.approx(expected, abs=1e-9) and r.psnr_min == pytest.approx(expected, abs=1e-9)
    assert r.identical == 1
    per = psnr_per_image(a, b)
    assert per[0].item() == pytest.approx(expected, abs=1e-9) and math.isinf(per[1].item())


def test_ssim_known_value_on_constant_images():
    # constant images have zero variance, so SSIM reduces to the luminance term (2 mu_a mu_b + C1) /
    # (mu_a^2 + mu_b^2 + C1) with C1 = (0.01 * 255)^2 (Wang et al. 2004, eq. 13), whatever the window
    c1 = (0.01 * 255) ** 2
    expected = (2 * 100 * 110 + c1) / (100**2 + 110**2 + c1)
    values, k = ssim_per_image(_constant(100), _constant(110))
    assert k == 11
    # float64 Gaussian-window sums of constants: error ~1e-12 relative
    assert torch.allclose(values, torch.full_like(values, expected), atol=1e-9)


def test_ssim_drops_with_structure_loss():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (2, 1, 32, 32), generator=g, dtype=torch.uint8)
    noisy = (x.int() + torch.randint(-40, 41, x.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    slight = (x.int() + torch.randint(-4, 5, x.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    r_noisy, r_slight = paired_fidelity(noisy, x, extractor=None), paired_fidelity(slight, x, extractor=None)
    assert r_noisy.ssim < r_slight.ssim < 1.0
    assert r_noisy.psnr < r_slight.psnr


def test_small_images_shrink_the_ssim_window():
    assert ssim_kernel_size(8, 8) == 7 and ssim_kernel_size(32, 32) == 11 and ssim_kernel_size(10, 12) == 9
    r = paired_fidelity(_constant(10, side=8), _constant(12, side=8), extractor=None)
    assert r.ssim_kernel == 7 and 0 < r.ssim < 1


def test_feature_distance_known_value():
    a, b = _constant(3, 2, side=8), _constant(4, 2, side=8)
    # features are the 64 pixels: |f_a - f_b| = sqrt(64 * 1^2) = 8, RMS norm of f_b = sqrt(64 * 16) = 32
    r = paired_fidelity(a, b, extractor=FlatPixels(resize="clean"))
    assert r.feature_dist == pytest.approx(8 / 32, abs=1e-12) and r.extractor == "flat-pixels"


def test_accepts_pipeline_output_forms_and_digits_extractor():
    g = torch.Generator().manual_seed(2)
    u8 = torch.randint(0, 256, (2, 1, 32, 32), generator=g, dtype=torch.uint8)
    nhwc = u8.permute(0, 2, 3, 1).numpy().astype(np.float32) / 255.0  # diffusers' output_type="np"
    r = paired_fidelity(nhwc, u8)  # default extractor: the zoo's digits-features
    assert r.identical == 2 and r.feature_dist == 0.0 and r.extractor == "domain:digits-features"


def test_bad_input_is_refused_clearly():
    with pytest.raises(EvalInputError, match="same images"):
        paired_fidelity(_constant(1, 2), _constant(1, 3), extractor=None)
    with pytest.raises(EvalInputError, match="reference"):
        paired_fidelity(_constant(1, 2), "not images", extractor=None)
