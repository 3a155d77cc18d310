"""Fréchet distance and streaming statistics."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
from diffaccel.evals import FeatureStats, frechet_distance
from diffaccel.evals.errors import EvalInputError


def _gaussian_features(rng, n, d, scale=1.0, shift=0.0, mix=True):
    x = rng.normal(size=(n, d))
    if mix:
        x = x @ rng.normal(size=(d, d)) / np.sqrt(d)
    return x * scale + shift


def _scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """Independent float64 reference: with centred features X_a, X_b, Tr((S_a S_b)^{1/2}) is the nuclear norm of
    X_a X_b^T / sqrt((n_a-1)(n_b-1)), exact also for rank-deficient covariances. With thin QR factors X = QR the
    singular values of X_a X_b^T are those of R_a R_b^T (scipy QR and SVD)."""
    xa, xb = a - a.mean(0), b - b.mean(0)
    ra = scipy.linalg.qr(xa, mode="r")[0][: min(xa.shape)]
    rb = scipy.linalg.qr(xb, mode="r")[0][: min(xb.shape)]
    tr_sqrt = scipy.linalg.svdvals(ra @ rb.T).sum() / np.sqrt((len(a) - 1) * (len(b) - 1))
    dmu = a.mean(0) - b.mean(0)
    return float(dmu @ dmu + np.trace(np.cov(a, rowvar=False)) + np.trace(np.cov(b, rowvar=False)) - 2 * tr_sqrt)


def _stats(x):
    return x.mean(0), np.cov(x, rowvar=False)


@pytest.mark.parametrize("method", ["eigh", "sqrtm", "eigvals"])
@pytest.mark.parametrize("d, n_a, n_b", [(64, 2000, 1500), (256, 100, 120), (128, 30, 600)])
def test_matches_independent_scipy_computation(method, d, n_a, n_b):
    rng = np.random.default_rng(d + n_a)
    a = _gaussian_features(rng, n_a, d, 0.5, 1.0)
    b = _gaussian_features(rng, n_b, d, 0.6, 0.8)
    ref = _scipy_fid(a, b)
    ours = frechet_distance(*_stats(a), *_stats(b), method=method)
    assert abs(ours - ref) <= 1e-6 * abs(ref)
    if n_a < d:  # the rank-deficient case really is rank-deficient
        assert np.linalg.matrix_rank(np.cov(a, rowvar=False)) < d


def test_self_distance_is_zero_to_rounding():
    rng = np.random.default_rng(0)
    x = _gaussian_features(rng, 500, 32)
    mu, sigma = _stats(x)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8 * (np.trace(sigma) + 1)


def test_closed_forms():
    rng = np.random.default_rng(1)
    d = 16
    q = np.linalg.qr(rng.normal(size=(d, d)))[0]
    sigma = q @ np.diag(rng.uniform(0.5, 2.0, d)) @ q.T
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    # equal covariances: only the mean term is left
    assert frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(float((mu1 - mu2) @ (mu1 - mu2)), rel=1e-10)
    # diagonal covariances: |dmu|^2 + sum (sqrt a_i - sqrt b_i)^2
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    expected = float((mu1 - mu2) @ (mu1 - mu2) + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    # scaled covariance: Sigma_b = c^2 Sigma_a gives |dmu|^2 + (1 - c)^2 Tr Sigma_a
    c = 1.7
    expected = float((mu1 - mu2) @ (mu1 - mu2) + (1 - c) ** 2 * np.trace(sigma))
    assert frechet_distance(mu1, sigma, mu2, c * c * sigma) == pytest.approx(expected, rel=1e-10)
    # pytorch-fid's own test: mu 0 vs 1, Sigma = I
    assert frechet_distance(np.zeros(d), np.eye(d), np.ones(d), np.eye(d)) == pytest.approx(d, rel=1e-12)


def test_symmetric():
    rng = np.random.default_rng(2)
    a, b = _gaussian_features(rng, 300, 24), _gaussian_features(rng, 400, 24, 1.3, 0.2)
    ab = frechet_distance(*_stats(a), *_stats(b))
    ba = frechet_distance(*_stats(b), *_stats(a))
    assert ab == pytest.approx(ba, rel=1e-9)


def test_validation_names_the_argument():
    mu, sigma = np.zeros(3), np.eye(3)
    with pytest.raises(ValueError, match="sigma2"):
        frechet_distance(mu, sigma, mu, np.eye(4))
    with pytest.raises(ValueError, match="symmetric"):
        frechet_distance(mu, sigma, mu, np.triu(np.ones((3, 3))))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.array([0, np.nan, 0]), sigma, mu, sigma)
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance(mu, sigma, np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="unknown"):
        frechet_distance(mu, sigma, mu, sigma, method="magic")


@pytest.mark.parametrize("batch", [1, 7, 64])
@pytest.mark.parametrize("shift", [0.0, 1e4])
def test_streaming_equals_batch(batch, shift):
    rng = np.random.default_rng(3)
    x = _gaussian_features(rng, 300, 16, 2.0, shift)
    s = FeatureStats(keep_features=True)
    for i in range(0, len(x), batch):
        s.update(x[i:i + batch])
    assert s.n == 300
    np.testing.assert_allclose(s.mu, x.mean(0), rtol=1e-10, atol=1e-10 * max(shift, 1))
    np.testing.assert_allclose(s.sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(s.features, x.astype(np.float32))


def test_streaming_needs_two_samples():
    s = FeatureStats()
    s.update(np.ones((1, 4)))
    assert s.mu.shape == (4,)
    with pytest.raises(EvalInputError, match="at least 2"):
        _ = s.sigma
    with pytest.raises(ValueError, match="dims"):
        s.update(np.ones((2, 5)))
