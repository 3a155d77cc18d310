"""Evaluation: FID / KID / IS / CLIP score with named extractors and resize modes, paired fidelity (PSNR / SSIM /
feature distance against the unaccelerated images of the same seeds), and the shared harness.

Every number carries the extractor (and its digest), dims, resize mode and sample counts (evals/README.md).
"""

from .errors import EvalInputError, FeatureExtractorWeightsInvalid, FeatureExtractorWeightsNotFound, StatsMismatchError
from .extractors import EXTRACTORS, ClipExtractor, DigitsExtractor, FeatureExtractor, InceptionExtractor, load_extractor
from .frechet import FeatureStats, frechet_distance
from .harness import (
    SUITES,
    BenchConfig,
    EvalResult,
    baseline_suite,
    evaluate,
    format_table,
    reference_features,
    reference_images,
    register_suite,
    run_bench,
)
from .images import RESIZE_MODES, find_images, prepare_images, resize
from .inception import FIDInceptionV3, find_inception_weights, load_fid_inception
from .metrics import (
    ClipScoreResult,
    Features,
    KIDResult,
    clip_score,
    features_from_folder,
    features_from_images,
    fid,
    fid_from_stats,
    inception_score,
    kid,
)
from .paired import PairedFidelity, paired_fidelity
from .stats import ReferenceStats, load_stats, save_stats

__all__ = [
    "EXTRACTORS",
    "RESIZE_MODES",
    "SUITES",
    "BenchConfig",
    "ClipExtractor",
    "ClipScoreResult",
    "DigitsExtractor",
    "EvalInputError",
    "EvalResult",
    "FIDInceptionV3",
    "FeatureExtractor",
    "FeatureExtractorWeightsInvalid",
    "FeatureExtractorWeightsNotFound",
    "FeatureStats",
    "Features",
    "InceptionExtractor",
    "KIDResult",
    "PairedFidelity",
    "ReferenceStats",
    "StatsMismatchError",
    "baseline_suite",
    "clip_score",
    "evaluate",
    "features_from_folder",
    "features_from_images",
    "fid",
    "fid_from_stats",
    "find_images",
    "find_inception_weights",
    "format_table",
    "frechet_distance",
    "inception_score",
    "kid",
    "load_extractor",
    "load_fid_inception",
    "load_stats",
    "paired_fidelity",
    "prepare_images",
    "reference_features",
    "reference_images",
    "register_suite",
    "resize",
    "run_bench",
    "save_stats",
]
