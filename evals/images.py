"""Image inputs of the metrics: folder listing and decoding, channel conversion, and the named resize modes.

Order (evals/README.md, "Resize modes"; after Parmar et al., "On Aliased Resizing and Surprising Subtleties in GAN
Evaluation", CVPR 2022): decode -> uint8 -> channels -> resize to the extractor's native size
-> normalise (inside the extractor).
Float generator output is quantized with `diffaccel.core.to_uint8` (round, never truncate) before any of this.

Resize modes (recorded in every result):

- ``clean`` (default): PIL bicubic per channel on float32 (mode "F"), clipped to [0, 255], not re-quantized.
- ``legacy-tf``: TensorFlow-1 bilinear (align_corners=False, no half-pixel centres), as torch-fidelity.
- ``legacy-pytorch``: ``F.interpolate(bilinear, align_corners=False)``, no antialias, as pytorch-fid.
- ``torch-aa``: ``F.interpolate(bilinear, antialias=True)``, the torchmetrics >= 1.8 default.

Images already at the native size are never resized. Folders with mixed sizes are accepted: every image is resized
to the extractor's native size on its own by the stated mode (a warning lists the sizes found).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..core.images import pil_to_tensor
from .errors import EvalInputError

RESIZE_MODES = ("clean", "legacy-tf", "legacy-pytorch", "torch-aa")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
LOSSY_EXTENSIONS = (".jpg", ".jpeg", ".webp")
# ITU-R BT.601 luma, the same weights as the zoo's digits classifier uses for RGB input.
LUMA = (0.299, 0.587, 0.114)


def check_resize_mode(mode: str) -> str:
    if mode not in RESIZE_MODES:
        raise EvalInputError(f"unknown resize mode {mode!r}; expected one of {', '.join(RESIZE_MODES)}")
    return mode


def to_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Float NCHW with 1 or 3 channels -> `channels` channels (grey is repeated; RGB -> grey by BT.601 luma)."""
    c = x.shape[1]
    if c == channels:
        return x
    if c == 1 and channels == 3:
        return x.expand(-1, 3, -1, -1)
    if c == 3 and channels == 1:
        return LUMA[0] * x[:, 0:1] + LUMA[1] * x[:, 1:2] + LUMA[2] * x[:, 2:3]
    raise EvalInputError(f"cannot convert {c}-channel images to {channels} channels")


def _resize_clean(x: torch.Tensor, size: int) -> torch.Tensor:
    arr = x.detach().cpu().numpy().astype(np.float32)
    out = np.empty((arr.shape[0], arr.shape[1], size, size), np.float32)
    for i in range(arr.shape[0]):
        for c in range(arr.shape[1]):
            im = Image.fromarray(arr[i, c], mode="F").resize((size, size), resample=Image.Resampling.BICUBIC)
            out[i, c] = np.asarray(im)
    return torch.from_numpy(np.clip(out, 0.0, 255.0)).to(x.device)


def _tf1_axis(n_in: int, n_out: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # TF1 `resize_bilinear(align_corners=False)`: source coordinate = dst * (in / out), no half-pixel offset.
    src = torch.arange(n_out, dtype=torch.float64, device=device) * (n_in / n_out)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    return i0, i1, (src - i0).float()


def resize_tf1_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """TensorFlow-1 bilinear resize of float NCHW to (size, size)."""
    h0, h1, wh = _tf1_axis(x.shape[-2], size, x.device)
    w0, w1, ww = _tf1_axis(x.shape[-1], size, x.device)
    top = x[..., h0, :] * (1 - wh)[:, None] + x[..., h1, :] * wh[:, None]
    return top[..., w0] * (1 - ww) + top[..., w1] * ww


def resize(x: torch.Tensor, size: int, mode: str = "clean") -> torch.Tensor:
    """Float NCHW in [0, 255] -> float32 (N, C, size, size) in [0, 255] by the named mode (module docstring)."""
    check_resize_mode(mode)
    x = x.float()
    if x.shape[-2:] == (size, size):
        return x
    if mode == "clean":
        return _resize_clean(x, size)
    if mode == "legacy-tf":
        return resize_tf1_bilinear(x, size)
    if mode == "legacy-pytorch":
        return F.interpolate(x / 255.0, size=(size, size), mode="bilinear", align_corners=False) * 255.0
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def prepare_images(images: torch.Tensor, size: int, channels: int, mode: str = "clean") -> torch.Tensor:
    """uint8 (N, 1|3, H, W) -> float32 (N, channels, size, size) in [0, 255], ready for an extractor's network."""
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise EvalInputError(f"expected images of shape (N, 1|3, H, W), got {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        raise EvalInputError(f"metrics take uint8 images (quantize with diffaccel.core.to_uint8), got {images.dtype}")
    return resize(to_channels(images.float(), channels), size, mode)


# ----------------------------------------------------------------------------------------------------- folders


def find_images(folder: str | Path, recursive: bool = False) -> list[Path]:
    """Sorted image files in `folder` (extensions matched case-insensitively); clear errors when there are none."""
    folder = Path(folder)
    if not folder.exists():
        raise EvalInputError(f"{folder}: no such file or folder")
    if not folder.is_dir():
        raise EvalInputError(f"{folder}: not a folder of images or an .npz of statistics")
    entries = sorted(folder.rglob("*") if recursive else folder.iterdir())
    if not entries:
        raise EvalInputError(f"{folder}: the folder is empty")
    files = [p for p in entries if p.is_file()]
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    if not images:
        hint = "" if recursive else " (add --recursive to search sub-folders)"
        raise EvalInputError(f"{folder}: no images found among {len(files)} file(s); looked for "
                             f"{', '.join(IMAGE_EXTENSIONS)}{hint}")
    return images


#: largest image decoded (width x height): a header claiming more is refused before its pixels are read
MAX_IMAGE_PIXELS = 8192 * 8192


def decode_image(path: Path, max_pixels: int = MAX_IMAGE_PIXELS) -> torch.Tensor:
    """One image file -> uint8 (C, H, W), C = 1 for greyscale files and 3 otherwise.

    16-bit and float files are scaled to 8 bits (`diffaccel.core.images.to_8bit`). A file whose header claims more
    than `max_pixels` pixels is refused before decoding (a decompression bomb), naming the file.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise EvalInputError(f"{path}: image is {w}x{h} pixels, more than the limit of {max_pixels} "
                                         "(8192x8192); refusing to decode it")
                im.load()
                return pil_to_tensor(im)[0]
    except EvalInputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise EvalInputError(f"{path}: refusing to decode a possible decompression bomb ({exc})") from exc
    except (OSError, ValueError, SyntaxError) as exc:  # also InputError from to_8bit
        raise EvalInputError(f"{path}: cannot decode image ({exc})") from exc


class ImageFilesDataset(torch.utils.data.Dataset):
    """Decodes and prepares one file per item; failures come back as messages so the main process raises them."""

    def __init__(self, files: Sequence[Path], size: int, channels: int, mode: str):
        self.files, self.size, self.channels, self.mode = list(files), size, channels, mode

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            img = decode_image(self.files[i])
        except EvalInputError as exc:
            return None, (0, 0), str(exc)
        x = prepare_images(img[None], self.size, self.channels, self.mode)[0]
        return x, tuple(img.shape[-2:]), ""


def collate_prepared(batch: list) -> tuple[torch.Tensor | None, list[tuple[int, int]], list[str]]:
    errors = [e for _, _, e in batch if e]
    if errors:
        return None, [], errors
    return torch.stack([x for x, _, _ in batch]), [s for _, s, _ in batch], []
