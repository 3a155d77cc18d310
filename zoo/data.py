"""The zoo's data: scikit-learn's `load_digits` (1797 8x8 images that ship inside scikit-learn), upsampled.

Fixed split: a stratified 80/20 split with `random_state=0` (1437 train, 360 test). Images are upsampled from
8x8 to 32x32 with bilinear interpolation (align_corners=False) after scaling the 0..16 ink values to [0, 1];
models see them in [-1, 1].
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from ..core.errors import InputError

IMAGE_SIZE = 32
SPLIT_SEED = 0
TEST_FRACTION = 0.2
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Caption templates used to train digits-sd and digits-clip; the first is the canonical prompt.
CAPTION_TEMPLATES = (
    "a handwritten digit {word}",
    "the number {word}",
    "a picture of the digit {digit}",
    "handwritten {word}",
)


@dataclass(frozen=True)
class DigitsSplit:
    images: torch.Tensor  # (N, 1, 32, 32) float32 in [-1, 1]
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@lru_cache(maxsize=4)
def _split_indices() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    y = load_digits().target
    idx = np.arange(len(y))
    train, test = train_test_split(idx, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=y)
    return np.sort(train), np.sort(test)


def upsample(images8: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """(N, 64) or (N, 8, 8) ink values 0..16 -> (N, 1, size, size) in [-1, 1]."""
    x = torch.as_tensor(images8, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x.clamp(0, 1) * 2 - 1).contiguous()


@lru_cache(maxsize=4)
def load_split(split: str = "train", size: int = IMAGE_SIZE) -> DigitsSplit:
    """The fixed train or test split as tensors in [-1, 1]."""
    from sklearn.datasets import load_digits

    if split not in ("train", "test", "all"):
        raise InputError(f"unknown split {split!r}: expected 'train', 'test' or 'all'")
    d = load_digits()
    train, test = _split_indices()
    idx = {"train": train, "test": test, "all": np.arange(len(d.target))}[split]
    return DigitsSplit(upsample(d.data[idx], size), torch.as_tensor(d.target[idx], dtype=torch.long))


def dataset_hash() -> str:
    """SHA-256 of the raw digits data and the split: recorded in model cards and feature-extractor metadata."""
    from sklearn.datasets import load_digits

    d = load_digits()
    train, test = _split_indices()
    h = hashlib.sha256()
    for arr in (d.data.astype(np.float64), d.target.astype(np.int64), train, test):
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def caption(label: int, template: int = 0) -> str:
    """The caption of a digit class: `caption(7)` -> "a handwritten digit seven"."""
    if not 0 <= int(label) <= 9:
        raise InputError(f"digit label must be in 0..9, got {label}")
    return CAPTION_TEMPLATES[template].format(word=DIGIT_WORDS[int(label)], digit=int(label))


def all_captions() -> list[tuple[str, int]]:
    """Every (caption, label) pair the text models were trained on."""
    return [(caption(k, t), k) for k in range(10) for t in range(len(CAPTION_TEMPLATES))]


def label_from_prompt(prompt: str) -> int | None:
    """The digit a prompt asks for (by word or numeral), or None when it names none or several."""
    words = prompt.lower().replace(",", " ").replace(".", " ").split()
    found = {i for i, w in enumerate(DIGIT_WORDS) if w in words}
    found |= {int(w) for w in words if w.isdigit() and len(w) == 1}
    return found.pop() if len(found) == 1 else None


def augment_shift(x: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random integer translation by up to `max_shift` pixels, filling with background (-1)."""
    n = x.shape[0]
    out = torch.full_like(x, -1.0)
    shifts = torch.randint(-max_shift, max_shift + 1, (n, 2), generator=generator)
    h, w = x.shape[-2:]
    for i in range(n):
        dy, dx = int(shifts[i, 0]), int(shifts[i, 1])
        ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
        xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
        out[i, :, yd, xd] = x[i, :, ys, xs]
    return out
