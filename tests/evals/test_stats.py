"""`.npz` reference statistics."""

from __future__ import annotations

import numpy as np
import pytest
from diffaccel.evals import FeatureStats, ReferenceStats, fid_from_stats, load_stats, save_stats
from diffaccel.evals.errors import EvalInputError, StatsMismatchError

DESC = {"extractor": "domain:test", "extractor_sha256": "ab" * 32, "dims": 8, "resize": "clean"}


def _ref(seed: int, n: int = 50, keep: bool = True) -> ReferenceStats:
    s = FeatureStats(keep_features=keep)
    s.update(np.random.default_rng(seed).normal(size=(n, 8)).astype(np.float32) + seed)
    return ReferenceStats.from_features(s, DESC, source=f"seed {seed}")


def test_round_trip_is_exact(tmp_path):
    a, b = _ref(0), _ref(1)
    path = save_stats(tmp_path / "a.npz", a)
    back = load_stats(path)
    np.testing.assert_array_equal(back.mu, a.mu)
    np.testing.assert_array_equal(back.sigma, a.sigma)
    np.testing.assert_array_equal(back.feats, a.feats)
    assert (back.n, back.extractor, back.extractor_sha256, back.dims, back.resize, back.source) == \
        (50, "domain:test", "ab" * 32, 8, "clean", "seed 0")
    assert fid_from_stats(back, b) == fid_from_stats(a, b)
    # plain arrays only: readable without pickle, and pytorch-fid's keys are there
    with np.load(path, allow_pickle=False) as f:
        assert f["mu"].dtype == np.float64 and f["sigma"].shape == (8, 8)
        assert "toolkit_version" in f.files and "created_utc" in f.files


def test_refuses_to_overwrite_without_force(tmp_path):
    path = save_stats(tmp_path / "a.npz", _ref(0))
    before = path.read_bytes()
    with pytest.raises(EvalInputError, match="exists"):
        save_stats(path, _ref(1))
    assert path.read_bytes() == before
    save_stats(path, _ref(1), force=True)
    assert load_stats(path).source == "seed 1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz"]  # no temp files left behind


def test_pytorch_fid_style_file_needs_the_extractor_named(tmp_path):
    rng = np.random.default_rng(0)
    np.savez_compressed(tmp_path / "p.npz", mu=rng.normal(size=4), sigma=np.eye(4))
    with pytest.raises(EvalInputError, match="no extractor metadata.*--assume-extractor"):
        load_stats(tmp_path / "p.npz")
    with pytest.warns(UserWarning, match="no metadata; assuming extractor x as told"):
        s = load_stats(tmp_path / "p.npz", assume_extractor="x")
    assert s.dims == 4 and s.extractor == "x" and s.resize == ""


@pytest.mark.parametrize("arrays, message", [
    ({"m2": np.zeros(3), "s2": np.eye(3)}, "missing key"),
    ({"mu": np.zeros(3), "sigma": np.eye(4)}, "mu must be"),
    ({"mu": np.zeros((3, 1)), "sigma": np.eye(3)}, "mu must be"),
    ({"mu": np.zeros(3), "sigma": np.eye(3), "feats": np.zeros((5, 2))}, "feats must be"),
])
def test_wrong_keys_or_shapes_raise(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(EvalInputError, match=message):
        load_stats(tmp_path / "bad.npz")


def test_not_an_npz(tmp_path):
    (tmp_path / "x.npz").write_bytes(b"not a zip file")
    with pytest.raises(EvalInputError, match="is a text file, not an .npz"):
        load_stats(tmp_path / "x.npz")
    (tmp_path / "y.npz").write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(EvalInputError, match="not a readable"):
        load_stats(tmp_path / "y.npz")


def test_mismatched_extractor_or_resize_raises():
    a, b = _ref(0), _ref(1)
    b.resize = "legacy-tf"
    with pytest.raises(StatsMismatchError, match="resize"):
        fid_from_stats(a, b)
    b.resize, b.extractor = "clean", "inception-tf-2015-12-05:pool3"
    with pytest.raises(StatsMismatchError, match="extractor"):
        fid_from_stats(a, b)
