"""Paired fidelity: how far accelerated images are from the unaccelerated ones made with the same seeds.

FID, KID and class accuracy compare *distributions*; on small zoo models they cannot separate caches whose images
differ visibly. Paired metrics compare image i of the accelerated run with image i of the reference run (same
seed, same prompt), the measure cache-dit's and DistriFusion's reports use:

- **PSNR** (dB) per pair on uint8 pixels, ``10 log10(255^2 / MSE)``, averaged over the pairs that differ. A pair that
  is bit-identical has infinite PSNR; it is counted in ``identical`` and left out of the mean, so one untouched
  image cannot turn the mean into infinity. When every pair is identical, ``psnr`` is ``inf`` (``None`` in
  `PairedFidelity.as_dict`, which stays strict JSON).
- **SSIM** per pair (Wang et al. 2004, Gaussian window sigma 1.5, K1 = 0.01, K2 = 0.03, data range 255, via
  ``torchmetrics.functional.image``), averaged. The window is 11 pixels, or the largest odd size that fits smaller
  images; the size used is recorded. Identical pairs give 1.
- **feature_dist**: the mean L2 distance between the paired feature vectors of an extractor (default the zoo's
  ``digits`` classifier, d = 128), divided by the root-mean-square norm of the reference features, so 0 means
  identical features and 1 means a distance as large as a typical feature vector.

    from diffaccel.evals import paired_fidelity
    fid = paired_fidelity(cached_images, plain_images)   # {psnr, ssim, feature_dist, ...}
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from ..core import pipeline_output_to_uint8
from .errors import EvalInputError
from .extractors import FeatureExtractor

DATA_RANGE = 255.0
SSIM_SIGMA = 1.5
SSIM_KERNEL = 11


@dataclass
class PairedFidelity:
    """Paired fidelity of n image pairs (module docstring). `as_dict()` is strict JSON (no inf/NaN)."""

    psnr: float  # dB, mean over differing pairs; inf when every pair is identical
    ssim: float  # mean over pairs, 1 for identical images
    feature_dist: float | None  # relative paired feature distance; None without an extractor
    n: int
    identical: int  # bit-identical pairs (infinite PSNR, left out of the PSNR mean)
    psnr_min: float  # worst pair (inf when every pair is identical)
    ssim_kernel: int
    extractor: str | None

    def as_dict(self) -> dict:
        d = asdict(self)
        for key, value in d.items():
            if isinstance(value, float) and not math.isfinite(value):
                d[key] = None  # psnr / psnr_min: every pair identical (see `identical`)
        return d

    def __getitem__(self, key: str):
        """`result["psnr"]` as well as `result.psnr`."""
        return getattr(self, key)


def _as_uint8(images, what: str) -> torch.Tensor:
    try:
        u8 = pipeline_output_to_uint8(images)
    except (TypeError, ValueError) as exc:
        raise EvalInputError(f"paired fidelity: cannot read the {what} images ({exc})") from exc
    if u8.ndim == 3:
        u8 = u8[None]
    if u8.ndim != 4 or u8.shape[1] not in (1, 3) or u8.shape[0] == 0:
        raise EvalInputError(f"paired fidelity: {what} images must be (N, 1|3, H, W) with N >= 1, "
                             f"got {tuple(u8.shape)}")
    return u8


def psnr_per_image(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-pair PSNR (dB, float64) of uint8 NCHW images; identical pairs give inf."""
    diff = images.double() - reference.double()
    mse = diff.pow(2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(DATA_RANGE**2 / mse)  # mse == 0 -> inf


def ssim_kernel_size(height: int, width: int) -> int:
    """11, or the largest odd window that fits an image smaller than 11 pixels."""
    side = min(SSIM_KERNEL, height, width)
    return side if side % 2 == 1 else side - 1


def ssim_per_image(images: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Per-pair SSIM (float64) of uint8 NCHW images and the Gaussian window size used."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    k = ssim_kernel_size(images.shape[-2], images.shape[-1])
    values = structural_similarity_index_measure(
        images.double(), reference.double(), gaussian_kernel=True, sigma=SSIM_SIGMA, kernel_size=k,
        data_range=DATA_RANGE, reduction="none")
    return values.reshape(-1), k


@torch.no_grad()
def feature_distance(images: torch.Tensor, reference: torch.Tensor, extractor: FeatureExtractor,
                     batch_size: int = 32) -> float:
    """Mean paired L2 feature distance over the RMS norm of the reference features (0 = identical).

    Each pair is embedded in one batch, and bit-identical pairs count as distance 0 exactly (an extractor may
    differ in the last float bits between calls)."""
    dists, ref_sq = [], []
    for s in range(0, images.shape[0], batch_size):
        a, b = images[s:s + batch_size], reference[s:s + batch_size]
        f = extractor(torch.cat([a, b])).double()
        fa, fb = f[:a.shape[0]], f[a.shape[0]:]
        same = (a == b).flatten(1).all(dim=1)
        dists.append(torch.where(same, 0.0, (fa - fb).norm(dim=1)))
        ref_sq.append(fb.pow(2).sum(dim=1))
    scale = torch.cat(ref_sq).mean().sqrt()
    mean_dist = torch.cat(dists).mean()
    if scale == 0:
        return 0.0 if mean_dist == 0 else math.inf
    return float(mean_dist / scale)


def paired_fidelity(images, reference, *, extractor: str | FeatureExtractor | None = "digits",
                    resize: str = "clean") -> PairedFidelity:
    """PSNR, SSIM and feature distance of `images` against `reference`, pair by pair (module docstring).

    Both are batches of the same N images in any form a diffusers pipeline returns (uint8 or [0, 1] float NCHW
    tensors, NHWC numpy arrays in [0, 1], PIL lists); float input is rounded to uint8 first. `extractor` is a
    registered extractor name, an extractor, or None to skip the feature distance."""
    a, b = _as_uint8(images, "accelerated"), _as_uint8(reference, "reference")
    if a.shape != b.shape:
        raise EvalInputError(f"paired fidelity needs the same images in both sets (same seeds, count and size); "
                             f"got {tuple(a.shape)} vs {tuple(b.shape)}")
    psnr = psnr_per_image(a, b)
    finite = psnr[torch.isfinite(psnr)]
    ssim, k = ssim_per_image(a, b)
    dist, ext_name = None, None
    if extractor is not None:
        if isinstance(extractor, str):
            from .harness import _cached_extractor

            extractor = _cached_extractor(extractor, resize)
        dist, ext_name = feature_distance(a, b, extractor), extractor.name
    return PairedFidelity(
        psnr=float(finite.mean()) if finite.numel() else math.inf, ssim=float(ssim.mean()), feature_dist=dist,
        n=int(a.shape[0]), identical=int(a.shape[0] - finite.numel()),
        psnr_min=float(psnr.min()), ssim_kernel=k, extractor=ext_name)
