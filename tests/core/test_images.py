import numpy as np
import pytest
import torch
from diffaccel.core import pil_to_tensor, pipeline_output_to_uint8, tensor_to_pil, to_uint8
from PIL import Image


def test_to_uint8_rounds_instead_of_truncating():
    x = torch.tensor([0.0, 0.999, 0.5 / 255, 0.49 / 255, 1.0, 1.5, -0.2])
    assert to_uint8(x).tolist() == [0, 255, 1, 0, 255, 255, 0]


def test_to_uint8_value_range_minus_one_one():
    x = torch.tensor([-1.0, 0.0, 1.0])
    assert to_uint8(x, (-1, 1)).tolist() == [0, 128, 255]


def test_to_uint8_rejects_integer_non_uint8():
    with pytest.raises(TypeError):
        to_uint8(torch.tensor([1, 2, 3]))


def test_pil_round_trip_is_exact():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (2, 3, 8, 8), dtype=np.uint8)
    pils = tensor_to_pil(torch.from_numpy(arr), value_range=(0, 255))
    assert [p.mode for p in pils] == ["RGB", "RGB"]
    assert torch.equal(pil_to_tensor(pils), torch.from_numpy(arr))


def test_grayscale_kept_as_one_channel():
    im = Image.fromarray(np.full((4, 5), 7, dtype=np.uint8), mode="L")
    t = pil_to_tensor(im)
    assert t.shape == (1, 1, 4, 5) and int(t.max()) == 7
    assert pil_to_tensor(im, channels=3).shape == (1, 3, 4, 5)


def test_mixed_sizes_refused():
    a = Image.new("RGB", (4, 4))
    b = Image.new("RGB", (5, 4))
    with pytest.raises(ValueError, match="different sizes"):
        pil_to_tensor([a, b])


def test_pipeline_output_forms_agree():
    rng = np.random.default_rng(1)
    nhwc = rng.random((2, 6, 6, 3)).astype(np.float32)
    from_np = pipeline_output_to_uint8(nhwc)
    from_pt = pipeline_output_to_uint8(torch.from_numpy(nhwc).permute(0, 3, 1, 2))
    from_pil = pipeline_output_to_uint8(tensor_to_pil(torch.from_numpy(nhwc).permute(0, 3, 1, 2), (0, 1)))
    assert from_np.shape == (2, 3, 6, 6)
    assert torch.equal(from_np, from_pt) and torch.equal(from_np, from_pil)
