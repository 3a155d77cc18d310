"""Typed errors of the evals package; each carries the CLI exit code it maps to (2 bad input, 3 missing weights)."""

from __future__ import annotations


class EvalInputError(ValueError):
    """Bad input to a metric or to `diffaccel fid`: empty folder, corrupt image, too few samples, bad `.npz`."""

    exit_code = 2


class StatsMismatchError(EvalInputError):
    """Two statistics (or an `.npz` and the current run) were made with a different extractor, dims or resize."""


class FeatureExtractorWeightsNotFound(FileNotFoundError):
    """The weights of a feature extractor are not on disk; nothing is ever downloaded (CLI exit code 3)."""

    exit_code = 3


class FeatureExtractorWeightsInvalid(RuntimeError):
    """A weight file was found but its digest or its state-dict keys/shapes are wrong (CLI exit code 3)."""

    exit_code = 3
