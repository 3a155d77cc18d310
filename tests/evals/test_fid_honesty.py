"""`diffaccel fid` is honest about what it computed (regressions of issue 14, defects 2, 6, 9 and 11)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from clirun import last_line, run_cli
from diffaccel.core import to_uint8
from diffaccel.evals import DigitsExtractor, features_from_folder, fid_from_stats
from diffaccel.evals.errors import EvalInputError
from diffaccel.evals.frechet import frechet_distance
from diffaccel.evals.images import decode_image
from diffaccel.evals.stats import load_stats
from PIL import Image


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Eight real digits saved as 8-bit PNGs, the same images as 16-bit PNGs (v * 257), and as float TIFFs."""
    from diffaccel.zoo import load_split

    root = tmp_path_factory.mktemp("fid")
    u8 = to_uint8((load_split("test").images[:8] + 1) / 2)[:, 0].numpy()
    for kind in ("u8", "u16", "f32", "i32"):
        (root / kind).mkdir()
    for i, a in enumerate(u8):
        Image.fromarray(a).save(root / "u8" / f"{i}.png")
        Image.fromarray(a.astype(np.uint16) * 257).save(root / "u16" / f"{i}.png")
        Image.fromarray(a.astype(np.float32) / 255).save(root / "f32" / f"{i}.tiff")
        Image.fromarray(a.astype(np.int32) * 257).save(root / "i32" / f"{i}.tiff")
    return root, u8


def test_16_bit_and_float_images_decode_to_the_8_bit_originals(folders):
    root, u8 = folders
    for kind, ext in (("u16", "png"), ("f32", "tiff"), ("i32", "tiff")):
        got = decode_image(root / kind / f"3.{ext}")
        assert got.shape == (1, 32, 32) and torch.equal(got[0], torch.from_numpy(u8[3])), kind


def test_fid_of_16_bit_copies_is_zero(folders):
    """Was 122.6: `I;16` was clipped at 255 when converted to L."""
    root, _ = folders
    ext = DigitsExtractor()
    a = features_from_folder(ext, root / "u8").reference()
    b = features_from_folder(ext, root / "u16").reference()
    np.testing.assert_array_equal(a.mu, b.mu)  # the same uint8 pixels, the same computation: identical
    np.testing.assert_array_equal(a.sigma, b.sigma)
    # identical statistics: 0 up to the eigensolver's round-off (d^2 eps of the traces), never negative
    scale = 2 * float(np.trace(a.sigma))
    assert 0.0 <= fid_from_stats(b, a) <= 4 * a.dims**2 * np.finfo(np.float64).eps * scale


def test_images_above_the_pixel_limit_are_refused_by_name(tmp_path):
    big = tmp_path / "wide.png"
    Image.new("1", (9000, 9000)).save(big)  # 81 Mpx: below PIL's own bomb limit, above ours (8192 x 8192)
    with pytest.raises(EvalInputError, match=r"wide\.png: image is 9000x9000 pixels, more than the limit"):
        decode_image(big)


def test_decompression_bomb_names_the_file(tmp_path):
    big = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(big)  # a tiny file whose header claims 400 megapixels
    with pytest.raises(EvalInputError, match=r"bomb\.png: .*(20000x20000 pixels|decompression bomb)"):
        decode_image(big)
    code, _, err = run_cli("fid", str(tmp_path), str(tmp_path), "-q")
    assert code == 2 and "bomb.png" in last_line(err) and "Traceback" not in err


def test_identical_sets_give_zero_not_minus_zero(tmp_path, folders, capsys):
    root, _ = folders
    code, out, err = run_cli("fid", str(root / "u8"), str(root / "u8"), "--json", "-q")
    assert code == 0, err
    res = json.loads(out)
    assert res["fid"] >= 0.0  # a round-off negative is clamped to 0 (with a warning in `warnings`)
    assert all("reported as 0" in w for w in res["warnings"] if "round-off" in w)
    code, out, _ = run_cli("fid", str(root / "u8"), str(root / "u8"), "-q")
    assert "FID: 0.0000" in out and "-0.0000" not in out


def test_json_never_contains_infinity(tmp_path):
    d = 4
    np.savez(tmp_path / "a.npz", mu=np.zeros(d), sigma=np.eye(d), extractor="domain:digits-features", dims=d,
             resize="clean", n=10)
    np.savez(tmp_path / "b.npz", mu=np.full(d, 1e200), sigma=np.eye(d), extractor="domain:digits-features", dims=d,
             resize="clean", n=10)
    code, out, err = run_cli("fid", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--json", "-q")
    assert code == 0, err
    assert "Infinity" not in out and "NaN" not in out
    res = json.loads(out)
    assert res["fid"] is None and any("not finite" in w for w in res["warnings"])


def test_negative_definite_sigma_is_refused(tmp_path):
    np.savez(tmp_path / "neg.npz", mu=np.zeros(3), sigma=-np.eye(3), extractor="domain:digits-features", dims=3,
             resize="clean", n=10)
    with pytest.raises(EvalInputError, match="not positive semi-definite"):
        load_stats(tmp_path / "neg.npz")
    with pytest.raises(ValueError, match="not positive semi-definite"):
        frechet_distance(np.zeros(3), -np.eye(3), np.zeros(3), np.eye(3))


def test_stats_without_metadata_need_assume_extractor(tmp_path, folders):
    root, _ = folders
    ext = DigitsExtractor()
    ref = features_from_folder(ext, root / "u8").reference()
    np.savez(tmp_path / "plain.npz", mu=ref.mu, sigma=ref.sigma)  # as pytorch-fid writes: no metadata
    code, _, err = run_cli("fid", str(root / "u8"), str(tmp_path / "plain.npz"), "-q")
    assert code == 2 and "--assume-extractor" in last_line(err)
    code, _, err = run_cli("fid", str(root / "u8"), str(tmp_path / "plain.npz"), "-q", "--assume-extractor",
                           "inception")
    assert code == 2 and "extractor" in last_line(err)  # told Inception: does not match digits features
    code, out, err = run_cli("fid", str(root / "u8"), str(tmp_path / "plain.npz"), "-q", "--json",
                             "--assume-extractor", "digits")
    assert code == 0, err
    assert json.loads(out)["fid"] == pytest.approx(0.0, abs=1e-6)


def test_a_text_file_named_npz_is_named_as_such(tmp_path, folders):
    (tmp_path / "notes.npz").write_text("mu = 1, sigma = 2\n")
    code, _, err = run_cli("fid", str(folders[0] / "u8"), str(tmp_path / "notes.npz"), "-q")
    assert code == 2 and "is a text file, not an .npz" in last_line(err) and "pickled" not in err


def test_save_stats_is_checked_before_computing_and_never_loses_the_result(tmp_path, folders):
    root, _ = folders
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, out, err = run_cli("fid", str(root / "u8"), "--save-stats", str(blocker / "x.npz"), "-q")
    assert code == 2 and "--save-stats" in last_line(err) and out == ""  # refused at once, nothing computed
    existing = tmp_path / "s.npz"
    existing.write_bytes(b"keep")
    code, _, err = run_cli("fid", str(root / "u8"), "--save-stats", str(existing), "-q")
    assert code == 2 and "--force" in err and existing.read_bytes() == b"keep"
