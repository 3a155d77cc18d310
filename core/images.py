"""Image conversion in one place: tensors in [-1, 1] or [0, 1] <-> uint8 <-> PIL, always rounding (never truncating)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from .errors import InputError


def to_uint8(images: torch.Tensor | np.ndarray, value_range: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """Quantize float images to uint8 by clamping then rounding: 0.999 -> 255, never 254.

    Accepts NCHW / CHW tensors or NHWC / HWC numpy arrays (as diffusers returns with ``output_type="np"``);
    returns a uint8 tensor in the same layout it was given (numpy input is returned as a tensor, HWC kept).
    Integer input that is already uint8 is returned unchanged.
    """
    t = torch.as_tensor(images)
    if t.dtype == torch.uint8:
        return t
    if not torch.is_floating_point(t):
        raise TypeError(f"to_uint8 expects float or uint8 images, got {t.dtype}")
    lo, hi = value_range
    if hi <= lo:
        raise InputError(f"value_range must be increasing, got {value_range}")
    scaled = (t.double() - lo) / (hi - lo)
    return torch.round(scaled.clamp(0.0, 1.0) * 255.0).to(torch.uint8)


def tensor_to_pil(images: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> list[Image.Image]:
    """NCHW float (or uint8) tensor -> list of PIL images ("L" for one channel, "RGB" for three)."""
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise InputError(f"expected images of shape (N, 1|3, H, W), got {tuple(images.shape)}")
    u8 = to_uint8(images.detach().cpu(), value_range).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a[..., 0], mode="L") if a.shape[-1] == 1 else Image.fromarray(a, mode="RGB") for a in u8]


#: single-channel modes whose values are not 8-bit: PIL's own convert("L") clips them at 255 instead of scaling
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def to_8bit(im: Image.Image) -> Image.Image:
    """Scale a 16-bit, 32-bit integer or float greyscale image to 8-bit "L" (rounding); other modes pass through.

    16-bit ("I;16*"): v * 255 / 65535. 32-bit integer ("I"): as 8-bit when every value is <= 255, as 16-bit when
    <= 65535, refused above. Float ("F"): [0, 1] when every value is in it, else [0, 255] clipped. NaN or infinite
    pixels are refused.
    """
    if im.mode not in WIDE_MODES:
        return im
    a = np.asarray(im).astype(np.float64)
    if not np.isfinite(a).all():
        raise InputError(f"a {im.mode} image has NaN or infinite pixels")
    hi = float(a.max()) if a.size else 0.0
    if im.mode.startswith("I;16"):
        scale = 255.0 / 65535.0
    elif im.mode == "I":
        if hi > 65535 or float(a.min(initial=0.0)) < 0:
            raise InputError(f"a 32-bit integer image with values in [{a.min():g}, {hi:g}] has no known range "
                             "(expected 8- or 16-bit values)")
        scale = 1.0 if hi <= 255 else 255.0 / 65535.0
    else:
        scale = 255.0 if hi <= 1.0 and float(a.min(initial=0.0)) >= 0.0 else 1.0
    return Image.fromarray(np.clip(np.rint(a * scale), 0, 255).astype(np.uint8), mode="L")


def pil_to_tensor(images: Image.Image | Sequence[Image.Image], channels: int | None = None) -> torch.Tensor:
    """PIL image(s) -> uint8 NCHW tensor. `channels` forces 1 (grayscale) or 3 (RGB); default keeps grey as 1.

    16-bit, 32-bit integer and float greyscale images are scaled to 8 bits first (`to_8bit`), never clipped.
    """
    if isinstance(images, Image.Image):
        images = [images]
    if len(images) == 0:
        raise InputError("no images given")
    arrays = []
    for im in images:
        im = to_8bit(im)
        mode = {1: "L", 3: "RGB"}.get(channels) if channels else ("L" if im.mode in ("L", "1") else "RGB")
        if mode is None:
            raise InputError(f"channels must be 1 or 3, got {channels}")
        a = np.asarray(im.convert(mode))
        arrays.append(a[..., None] if a.ndim == 2 else a)
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise InputError(f"images have different sizes: {sorted(shapes)}")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def pipeline_output_to_uint8(images) -> torch.Tensor:
    """Whatever a diffusers pipeline returned (PIL list, NHWC numpy in [0,1], NCHW tensor in [0,1]) -> uint8 NCHW."""
    if isinstance(images, Image.Image) or (
        isinstance(images, (list, tuple)) and images and isinstance(images[0], Image.Image)
    ):
        return pil_to_tensor(images)
    if isinstance(images, np.ndarray):
        t = to_uint8(images)
        return t.permute(0, 3, 1, 2).contiguous() if t.ndim == 4 else t
    if isinstance(images, torch.Tensor):
        return to_uint8(images)
    raise TypeError(f"cannot convert pipeline output of type {type(images).__name__} to images")
