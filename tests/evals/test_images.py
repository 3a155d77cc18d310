"""Resize modes, channel handling and folder decoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffaccel.evals import find_images, prepare_images, resize
from diffaccel.evals.errors import EvalInputError
from diffaccel.evals.images import decode_image, resize_tf1_bilinear
from PIL import Image


def _u8(shape, seed=0):
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


@pytest.mark.parametrize("mode", ["clean", "legacy-tf", "legacy-pytorch", "torch-aa"])
def test_native_size_is_never_resized(mode):
    x = _u8((2, 3, 8, 8))
    assert torch.equal(prepare_images(x, 8, 3, mode), x.float())


def test_clean_is_pil_bicubic_on_float_without_requantization():
    x = _u8((1, 1, 13, 11))
    out = resize(x.float(), 7, "clean")
    ref = np.asarray(Image.fromarray(x[0, 0].numpy().astype(np.float32), mode="F").resize(
        (7, 7), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(out[0, 0].numpy(), np.clip(ref, 0, 255))
    assert not torch.equal(out, out.round())  # not re-quantized to integers


def test_legacy_tf_has_no_half_pixel_offset():
    x = torch.tensor([[[[0.0, 100.0]]]]).expand(1, 1, 2, 2)
    out = resize_tf1_bilinear(x, 4)
    # TF1 align_corners=False: source = dst * in/out = 0, 0.5, 1, 1.5 -> 0, 50, 100, 100 (edge clamped)
    np.testing.assert_allclose(out[0, 0, 0].numpy(), [0, 50, 100, 100])
    assert not torch.allclose(out, F.interpolate(x, size=4, mode="bilinear", align_corners=False))


def test_torch_modes_are_the_stated_interpolations():
    x = _u8((2, 3, 40, 40)).float()
    ref_aa = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(resize(x, 16, "torch-aa"), ref_aa)
    ref_pt = F.interpolate(x / 255, size=(16, 16), mode="bilinear", align_corners=False) * 255
    torch.testing.assert_close(resize(x, 16, "legacy-pytorch"), ref_pt)
    assert not torch.allclose(resize(x, 16, "torch-aa"), resize(x, 16, "legacy-pytorch"))


def test_channels_and_dtype():
    grey = _u8((1, 1, 4, 4))
    rgb = prepare_images(grey, 4, 3, "clean")
    assert rgb.shape == (1, 3, 4, 4) and torch.equal(rgb[:, 0], rgb[:, 2])
    back = prepare_images(rgb.to(torch.uint8), 4, 1, "clean")
    torch.testing.assert_close(back, grey.float())  # luma weights sum to 1
    with pytest.raises(EvalInputError, match="uint8"):
        prepare_images(grey.float() / 255, 4, 1)
    with pytest.raises(EvalInputError, match="resize mode"):
        resize(grey.float(), 8, "nearest")


def test_find_images_sorted_case_insensitive_and_errors(tmp_path):
    with pytest.raises(EvalInputError, match="no such"):
        find_images(tmp_path / "missing")
    with pytest.raises(EvalInputError, match="empty"):
        find_images(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(EvalInputError, match="no images found"):
        find_images(tmp_path)
    for name in ("b.PNG", "a.jpg", "sub/c.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.new("L", (4, 4)).save(tmp_path / name, format="PNG")
    assert [p.name for p in find_images(tmp_path)] == ["a.jpg", "b.PNG"]
    assert [p.name for p in find_images(tmp_path, recursive=True)] == ["a.jpg", "b.PNG", "c.png"]


def test_corrupt_file_is_named(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    with pytest.raises(EvalInputError, match="broken.png"):
        decode_image(bad)
