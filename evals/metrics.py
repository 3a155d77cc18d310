"""FID, KID, Inception Score and CLIP score on top of the extractors, streaming statistics and torchmetrics.

Every function takes uint8 images (quantize float output with `diffaccel.core.to_uint8`, which rounds) or features,
and every result records the extractor, its digest, dims, resize mode and sample counts (evals/README.md).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import EvalInputError
from .extractors import FeatureExtractor, load_extractor
from .frechet import FeatureStats, frechet_distance
from .images import LOSSY_EXTENSIONS, ImageFilesDataset, collate_prepared, find_images
from .stats import ReferenceStats, check_compatible

# ------------------------------------------------------------------------------------------------ features


@dataclass
class Features:
    """Streaming statistics of one image set plus, when asked, its classifier logits."""

    stats: FeatureStats
    describe: dict
    logits: np.ndarray | None = None
    source: str = ""
    warnings: list[str] = field(default_factory=list)

    def reference(self) -> ReferenceStats:
        return ReferenceStats.from_features(self.stats, self.describe, self.source)


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, leave=False)


def _accumulate(extractor: FeatureExtractor, x: torch.Tensor, stats: FeatureStats, logits: list[np.ndarray],
                with_logits: bool) -> None:
    """Run the extractor on prepared input and add the features (and logits) to the running state."""
    if with_logits:
        f, lg = extractor.embed_with_logits(x)
        logits.append(lg.double().cpu().numpy())
    else:
        f = extractor.embed(x)
    stats.update(f.float())


@torch.no_grad()
def features_from_images(extractor: FeatureExtractor, images: torch.Tensor | Iterable[torch.Tensor], *,
                         batch_size: int = 64, keep_features: bool = True, with_logits: bool = False,
                         source: str = "images") -> Features:
    """Features of uint8 (N, C, H, W) images (or an iterable of such batches), in batches of `batch_size`."""
    if batch_size < 1:
        raise EvalInputError(f"batch size must be >= 1, got {batch_size}")
    batches = [images] if isinstance(images, torch.Tensor) else images
    stats = FeatureStats(dims=extractor.num_features, keep_features=keep_features)
    logits: list[np.ndarray] = []
    for chunk in batches:
        for start in range(0, chunk.shape[0], batch_size):
            _accumulate(extractor, extractor.prepare(chunk[start:start + batch_size]), stats, logits, with_logits)
    return Features(stats, extractor.describe(), np.concatenate(logits) if logits else None, source)


@torch.no_grad()
def features_from_folder(extractor: FeatureExtractor, folder: str | Path, *, batch_size: int = 64,
                         num_workers: int = 0, recursive: bool = False, keep_features: bool = True,
                         with_logits: bool = False, progress: bool = False) -> Features:
    """Features of every image in `folder` (sorted; see `evals.images` for decoding and resizing).

    Raises EvalInputError naming the first corrupt file; mixed image sizes are resized one by one (a warning)."""
    if batch_size < 1:
        raise EvalInputError(f"batch size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise EvalInputError(f"num_workers must be >= 0, got {num_workers}")
    files = find_images(folder, recursive=recursive)
    notes: list[str] = []
    lossy = sum(p.suffix.lower() in LOSSY_EXTENSIONS for p in files)
    if lossy:
        notes.append(f"{folder} contains {lossy} lossy (JPEG/WebP) file(s); compare like with like")
    ds = ImageFilesDataset(files, extractor.native_size, extractor.channels, extractor.resize)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=collate_prepared)
    stats = FeatureStats(dims=extractor.num_features, keep_features=keep_features)
    logits: list[np.ndarray] = []
    sizes: set[tuple[int, int]] = set()
    bar = _progress(len(files), f"features {Path(folder).name}", progress)
    for x, batch_sizes, errors in loader:
        if errors:
            raise EvalInputError(errors[0])
        sizes.update(batch_sizes)
        _accumulate(extractor, x.to(extractor.device), stats, logits, with_logits)
        if bar is not None:
            bar.update(x.shape[0])
    if bar is not None:
        bar.close()
    if len(sizes) > 1:
        shown = ", ".join(f"{w}x{h}" for h, w in sorted(sizes)[:5])
        notes.append(f"{folder} has images of {len(sizes)} sizes ({shown}); each was resized to "
                     f"{extractor.native_size}x{extractor.native_size} by mode {extractor.resize!r}")
    source = f"folder {Path(folder).name}: {len(files)} files"
    return Features(stats, extractor.describe(), np.concatenate(logits) if logits else None, source, notes)


# ------------------------------------------------------------------------------------------------------ FID


def fid_from_stats(a: ReferenceStats, b: ReferenceStats, *, method: str = "eigh") -> float:
    """FID (Heusel et al. 2017, eq. 6) between two statistics made with the same extractor, dims and resize."""
    check_compatible(a, b)
    for tag, s in (("a", a), ("b", b)):
        if s.n and s.n < 2:
            raise EvalInputError(f"set {tag} has {s.n} image(s); FID needs at least 2 on each side")
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma, method=method)


def fid(images_a: torch.Tensor, images_b: torch.Tensor, extractor: str | FeatureExtractor = "digits", *,
        batch_size: int = 64, method: str = "eigh") -> float:
    """FID between two uint8 image tensors with the given extractor (name or module)."""
    ext = load_extractor(extractor) if isinstance(extractor, str) else extractor
    fa = features_from_images(ext, images_a, batch_size=batch_size, keep_features=False)
    fb = features_from_images(ext, images_b, batch_size=batch_size, keep_features=False)
    return fid_from_stats(fa.reference(), fb.reference(), method=method)


# ------------------------------------------------------------------------------------------------------ KID


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: float | None = None,
                      coef0: float = 1.0) -> np.ndarray:
    """k(x, y) = (gamma x^T y + coef0)^degree, gamma = 1/d by default (Bińkowski et al. 2018, §4)."""
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    return (x @ y.T * gamma + coef0) ** degree


def mmd2_unbiased(k_xx: np.ndarray, k_xy: np.ndarray, k_yy: np.ndarray) -> float:
    """Unbiased MMD^2 (Gretton et al. 2012, eq. 3): off-diagonal means of k_xx and k_yy minus twice the mean of k_xy."""
    m = k_xx.shape[0]
    sxx = k_xx.sum() - np.trace(k_xx)
    syy = k_yy.sum() - np.trace(k_yy)
    return float((sxx + syy) / (m * (m - 1)) - 2.0 * k_xy.sum() / (m * m))


@dataclass
class KIDResult:
    mean: float
    std: float  # population std (ddof = 0) over subsets, as torchmetrics
    subsets: int
    subset_size: int


def kid(feats_a: np.ndarray | torch.Tensor, feats_b: np.ndarray | torch.Tensor, *, subsets: int = 100,
        subset_size: int = 1000, seed: int = 0, degree: int = 3, gamma: float | None = None,
        coef0: float = 1.0) -> KIDResult:
    """Kernel Inception Distance (Bińkowski et al. 2018, "Demystifying MMD GANs"): unbiased MMD^2 with a cubic
    polynomial kernel on `subsets` random subsets of size m drawn without replacement from each side (seeded numpy
    Generator), in float64. m = min(subset_size, n_a, n_b), with a warning when it had to shrink."""
    a = np.asarray(feats_a.detach().cpu() if isinstance(feats_a, torch.Tensor) else feats_a, dtype=np.float64)
    b = np.asarray(feats_b.detach().cpu() if isinstance(feats_b, torch.Tensor) else feats_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise EvalInputError(f"KID needs two (n, d) feature sets of the same d, got {a.shape} and {b.shape}")
    m = min(subset_size, a.shape[0], b.shape[0])
    if m < 2:
        raise EvalInputError(f"KID needs at least 2 samples per side, got {a.shape[0]} and {b.shape[0]}")
    if m < subset_size:
        warnings.warn(f"KID subset size lowered from {subset_size} to {m} (n_a={a.shape[0]}, n_b={b.shape[0]})",
                      stacklevel=2)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(subsets):
        x = a[rng.choice(a.shape[0], m, replace=False)]
        y = b[rng.choice(b.shape[0], m, replace=False)]
        values.append(mmd2_unbiased(polynomial_kernel(x, x, degree, gamma, coef0),
                                    polynomial_kernel(x, y, degree, gamma, coef0),
                                    polynomial_kernel(y, y, degree, gamma, coef0)))
    v = np.asarray(values)
    return KIDResult(float(v.mean()), float(v.std()), subsets, m)


# ------------------------------------------------------------------------------------------ Inception Score


def inception_score(logits: np.ndarray | torch.Tensor, *, splits: int = 10, seed: int = 0) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) || p(y))) (Salimans et al. 2016, §4), per split after a seeded shuffle; returns
    (mean, population std over splits). With a domain classifier call it "classifier score", not IS."""
    lg = np.asarray(logits.detach().cpu() if isinstance(logits, torch.Tensor) else logits, dtype=np.float64)
    if lg.ndim != 2 or lg.shape[0] < splits:
        raise EvalInputError(f"inception score needs (n, classes) logits with n >= splits={splits}, got {lg.shape}")
    lg = lg[np.random.default_rng(seed).permutation(lg.shape[0])]
    log_p = lg - np.logaddexp.reduce(lg, axis=1, keepdims=True)
    scores = []
    for part in np.array_split(log_p, splits):
        p = np.exp(part)
        log_py = np.log(p.mean(axis=0))
        scores.append(float(np.exp((p * (part - log_py)).sum(axis=1).mean())))
    return float(np.mean(scores)), float(np.std(scores))


# ------------------------------------------------------------------------------------------------ CLIP score


class _TensorFeatureCLIP(torch.nn.Module):
    """Wraps a transformers CLIPModel so `get_*_features` return tensors (transformers >= 5 returns model outputs,
    which torchmetrics 1.9's CLIPScore cannot normalise)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        out = self.model.get_image_features(*args, **kwargs)
        return getattr(out, "pooler_output", out)

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        out = self.model.get_text_features(*args, **kwargs)
        return getattr(out, "pooler_output", out)


_CLIP_CACHE: dict[str, tuple] = {}


@dataclass
class ClipScoreResult:
    score: float  # torchmetrics semantics: max(100 * mean cosine, 0)
    n: int
    model: str
    truncated: int  # captions longer than the text tower's context

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def clip_score(images: torch.Tensor, captions: Sequence[str], model: str | Path = "digits-clip", *,
               batch_size: int = 64) -> ClipScoreResult:
    """CLIP score with torchmetrics' `CLIPScore` (100 x cosine of L2-normalised embeddings, mean then clamp at 0;
    Hessel et al. 2021 use 2.5 x max(cos, 0) per sample instead) on a local CLIP folder or zoo entry."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    from .extractors import load_clip, resolve_clip_folder

    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise EvalInputError(f"clip_score takes uint8 (N, 1|3, H, W) images, got {images.dtype} {tuple(images.shape)}")
    if len(captions) != images.shape[0]:
        raise EvalInputError(f"{images.shape[0]} images but {len(captions)} captions")
    folder = resolve_clip_folder(model)
    key = str(folder.resolve())
    if key not in _CLIP_CACHE:
        _CLIP_CACHE.clear()  # keep one model in memory at most
        _CLIP_CACHE[key] = load_clip(folder)
    clip, processor = _CLIP_CACHE[key]
    metric = CLIPScore(model_name_or_path=lambda: (_TensorFeatureCLIP(clip), processor))
    max_len = int(clip.config.text_config.max_position_embeddings)
    truncated = sum(len(ids) > max_len for ids in processor.tokenizer(list(captions))["input_ids"])
    rgb = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the truncation warning is counted above instead
        for start in range(0, rgb.shape[0], batch_size):
            metric.update(list(rgb[start:start + batch_size]), list(captions[start:start + batch_size]))
        score = float(metric.compute())
    return ClipScoreResult(score, int(images.shape[0]), f"clip:{folder.name}", int(truncated))
