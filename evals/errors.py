"""Typed errors of the evals package, in diffaccel's hierarchy (core/errors.py: 2 bad input, 3 missing weights)."""

from __future__ import annotations

from ..core.errors import InputError, WeightsError


class EvalInputError(InputError):
    """Bad input to a metric or to `diffaccel fid`: empty folder, corrupt image, too few samples, bad `.npz`."""


class StatsMismatchError(EvalInputError):
    """Two statistics (or an `.npz` and the current run) were made with a different extractor, dims or resize."""


class FeatureExtractorWeightsNotFound(WeightsError, FileNotFoundError):
    """The weights of a feature extractor are not on disk; nothing is ever downloaded (CLI exit code 3)."""


class FeatureExtractorWeightsInvalid(WeightsError):
    """A weight file was found but its digest or its state-dict keys/shapes are wrong (CLI exit code 3)."""
