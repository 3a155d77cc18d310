"""FID / KID / IS / CLIP score on the zoo digits."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from diffaccel.core import pil_to_tensor, tensor_to_pil, to_uint8
from diffaccel.evals import (
    DigitsExtractor,
    clip_score,
    features_from_folder,
    features_from_images,
    fid_from_stats,
    inception_score,
    kid,
    reference_images,
)
from diffaccel.evals.errors import EvalInputError
from diffaccel.zoo import caption, entry_path, load, load_split
from PIL import Image
from tolerances import roundoff_atol


@pytest.fixture(scope="module")
def ext() -> DigitsExtractor:
    return DigitsExtractor()


@pytest.fixture(scope="module")
def test_split() -> torch.Tensor:
    return reference_images("test")[:150]  # n > d = 128 keeps the covariance full-rank; small keeps the test fast


@pytest.fixture(scope="module")
def test_feats(ext, test_split):
    return features_from_images(ext, test_split, with_logits=True)


def test_digits_extractor_is_the_zoo_classifier(ext, test_split):
    model = load("digits-features")
    torch.testing.assert_close(ext(test_split[:16]), model(test_split[:16]), rtol=0, atol=0)
    assert ext.describe() == {"extractor": "domain:digits-features", "extractor_sha256": ext.sha256, "dims": 128,
                              "resize": "clean"}
    assert len(ext.sha256) == 64


def test_fid_of_a_set_with_itself_is_zero(test_feats):
    f = test_feats.reference()
    assert abs(fid_from_stats(f, f)) < 1e-8 * (np.trace(f.sigma) + 1)


def test_fid_increases_monotonically_with_gaussian_noise(ext):
    clean01 = (load_split("test").images[:100] + 1) / 2
    ref = features_from_images(ext, to_uint8(clean01), keep_features=False).reference()
    noise = torch.randn(clean01.shape, generator=torch.Generator().manual_seed(0))
    values = [0.0]
    for sigma in (0.02, 0.05, 0.1, 0.2):
        noisy = to_uint8((clean01 + sigma * noise).clamp(0, 1))
        values.append(fid_from_stats(features_from_images(ext, noisy, keep_features=False).reference(), ref))
    assert all(b > a for a, b in zip(values, values[1:], strict=False)), values


def test_fid_agrees_with_torchmetrics_using_our_extractor(ext, test_split, test_feats):
    from torchmetrics.image.fid import FrechetInceptionDistance

    train = reference_images("train")[:150]
    tm = FrechetInceptionDistance(feature=ext)
    tm.update(test_split, real=True)
    tm.update(train, real=False)
    ours = fid_from_stats(features_from_images(ext, train).reference(), test_feats.reference())
    assert ours == pytest.approx(float(tm.compute()), rel=1e-6)


class _PassThrough(torch.nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.num_features = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_kid_matches_torchmetrics_on_the_same_features():
    from torchmetrics.image.kid import KernelInceptionDistance

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(120, 16)), rng.normal(size=(120, 16)) * 1.1 + 0.2
    tm = KernelInceptionDistance(feature=_PassThrough(16), subsets=2, subset_size=120)
    tm.update(torch.from_numpy(a), real=True)
    tm.update(torch.from_numpy(b), real=False)
    tm_mean, tm_std = tm.compute()
    ours = kid(b, a, subsets=2, subset_size=120)  # full-size subsets: torchmetrics' random permutation is irrelevant
    assert ours.mean == pytest.approx(float(tm_mean), rel=1e-9)
    assert ours.std == pytest.approx(float(tm_std), abs=1e-12)


def test_kid_properties():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(300, 8))
    same = kid(a, a.copy(), subsets=10, subset_size=100, seed=3)
    shifted = kid(a, rng.normal(size=(300, 8)) + 0.5, subsets=10, subset_size=100, seed=3)
    # identical sets: ~0, slightly negative (independent subsets share points, inflating the cross term)
    assert abs(same.mean) < 0.1 * shifted.mean and shifted.mean > 0
    assert kid(a, a + 0.5, subsets=5, subset_size=50, seed=7) == kid(a, a + 0.5, subsets=5, subset_size=50, seed=7)
    with pytest.warns(UserWarning, match="lowered from 1000 to 300"):
        assert kid(a, a + 0.5, subsets=2).subset_size == 300
    with pytest.raises(EvalInputError, match="at least 2"):
        kid(a[:1], a, subsets=1)


def test_inception_score_closed_forms():
    assert inception_score(np.zeros((100, 10)), splits=10)[0] == pytest.approx(1.0, abs=1e-12)
    k = 8
    one_hot = np.full((800, k), -1e4)
    one_hot[np.arange(800), np.arange(800) % k] = 0.0  # each class equally often
    mean, std = inception_score(one_hot, splits=1)
    assert mean == pytest.approx(k, rel=1e-6) and std == 0.0


def test_classifier_score_separates_digits_from_noise(ext, test_feats):
    real, _ = inception_score(test_feats.logits, splits=1)
    noise = torch.randint(0, 256, (150, 1, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    fake, _ = inception_score(features_from_images(ext, noise, with_logits=True).logits, splits=1)
    assert 5.0 < real <= 10.0 and fake < 2.0  # 10 balanced, recognisable classes vs one-class noise


def test_png_round_trip_reproduces_in_memory_features(ext, tmp_path):
    floats = torch.rand(6, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    u8 = to_uint8(floats)
    assert to_uint8(torch.tensor([0.999]))[0] == 255  # round, not truncate
    for i, im in enumerate(tensor_to_pil(u8, value_range=(0, 255))):
        im.save(tmp_path / f"{i}.png")
    from_files = features_from_folder(ext, tmp_path, batch_size=4)
    in_memory = features_from_images(ext, u8).stats.features
    # Same pixels, different batching (4+2 vs 6): the convolutions and the 2048-wide embedding sum in another
    # order, so float32 round-off differs; the bound follows the reduction lengths of the network's layers.
    # A decoding error (one wrong pixel level) moves features by ~1e-2, far above it.
    w = ext.model.config.widths
    atol = roundoff_atol(torch.float32, [9, 9 * w[0], 9 * w[0], 9 * w[1], 9 * w[1],  # the five convolutions
                                         w[2] * (ext.native_size // 8) ** 2, ext.num_features],
                         magnitude=float(np.abs(in_memory).max()))
    np.testing.assert_allclose(from_files.stats.features, in_memory, rtol=0, atol=atol)
    assert torch.equal(pil_to_tensor([Image.open(tmp_path / "0.png")]), u8[:1])


@pytest.mark.skipif(not (entry_path("digits-clip") / "config.json").is_file(), reason="zoo digits-clip not trained")
def test_clip_score_semantics_on_digits_clip(test_split):
    from diffaccel.evals.extractors import load_clip

    labels = load_split("test").labels[:20].tolist()
    images = test_split[:20]
    right = clip_score(images, [caption(y) for y in labels])
    wrong = clip_score(images, [caption((y + 5) % 10) for y in labels])
    assert right.score > wrong.score and right.n == 20 and right.model == "clip:digits-clip" and right.truncated == 0
    # x100 cosine of L2-normalised embeddings, mean over pairs, then clamp at 0 (torchmetrics' order)
    model, proc = load_clip("digits-clip")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        img = model.get_image_features(**proc(images=list(images.expand(-1, 3, -1, -1)), return_tensors="pt"))
        txt = model.get_text_features(**proc(text=[caption(y) for y in labels], return_tensors="pt", padding=True))
    img, txt = getattr(img, "pooler_output", img), getattr(txt, "pooler_output", txt)
    cos = torch.nn.functional.cosine_similarity(img, txt)
    assert right.score == pytest.approx(max(100 * float(cos.mean()), 0.0), rel=1e-3)  # float32 sums
