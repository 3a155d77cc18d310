"""Reference statistics as `.npz`: pytorch-fid's `mu` / `sigma` plus provenance metadata (evals/README.md).

pytorch-fid and clean-fid read only `mu` and `sigma`; the extra keys (`n`, `extractor`, `extractor_sha256`, `dims`,
`resize`, `source`, `toolkit_version`, `created_utc`, optional `feats`) are plain arrays, so
`np.load(path, allow_pickle=False)` works. Files are written atomically (temp file, then rename) and an existing file
is only replaced with `force=True`.
"""

from __future__ import annotations

import datetime as _dt
import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.errors import InputError
from ..core.files import atomic_save
from .errors import EvalInputError, StatsMismatchError
from .frechet import FeatureStats, check_psd


@dataclass
class ReferenceStats:
    """Gaussian statistics of one image set, with what made them."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    extractor: str
    dims: int
    resize: str
    extractor_sha256: str = ""
    source: str = ""
    feats: np.ndarray | None = None

    @classmethod
    def from_features(cls, stats: FeatureStats, describe: dict, source: str = "") -> ReferenceStats:
        return cls(mu=stats.mu, sigma=stats.sigma, n=stats.n, extractor=describe["extractor"],
                   dims=int(describe["dims"]), resize=describe["resize"],
                   extractor_sha256=describe.get("extractor_sha256", ""), source=source, feats=stats.features)

    def metadata(self) -> dict:
        return {"extractor": self.extractor, "extractor_sha256": self.extractor_sha256, "dims": self.dims,
                "resize": self.resize, "n": self.n}


def check_compatible(a: ReferenceStats, b: ReferenceStats) -> None:
    """Refuse to compare statistics made with a different extractor, dims or resize mode (an unknown resize mode,
    as in statistics from other tools, is not compared)."""
    for key in ("extractor", "dims", "resize"):
        va, vb = getattr(a, key), getattr(b, key)
        if key == "resize" and "" in (va, vb):
            continue
        if va != vb:
            raise StatsMismatchError(f"statistics differ in {key}: {va!r} vs {vb!r}; recompute one side with the "
                                     f"same {key}")
    if a.extractor_sha256 and b.extractor_sha256 and a.extractor_sha256 != b.extractor_sha256:
        raise StatsMismatchError(f"statistics were made with different {a.extractor} weights "
                                 f"(sha256 {a.extractor_sha256[:12]} vs {b.extractor_sha256[:12]})")


def save_stats(path: str | os.PathLike, stats: ReferenceStats, *, force: bool = False) -> Path:
    """Write `stats` to `path` (.npz) atomically; refuses to overwrite unless `force`."""
    from .. import __version__ as toolkit_version  # noqa: PLC0415 - avoid import cycle at module import

    path = Path(path)
    if path.suffix != ".npz":
        raise EvalInputError(f"{path}: statistics files must end in .npz")
    if path.exists() and not force:
        raise EvalInputError(f"{path} exists; refusing to overwrite it (use --force / force=True)")
    if not path.parent.exists():
        raise EvalInputError(f"{path.parent}: output folder does not exist")
    arrays = {
        "mu": np.asarray(stats.mu, np.float64), "sigma": np.asarray(stats.sigma, np.float64),
        "n": np.int64(stats.n), "dims": np.int64(stats.dims), "extractor": np.str_(stats.extractor),
        "extractor_sha256": np.str_(stats.extractor_sha256), "resize": np.str_(stats.resize),
        "source": np.str_(stats.source), "toolkit_version": np.str_(toolkit_version),
        "created_utc": np.str_(_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")),
    }
    if stats.feats is not None:
        arrays["feats"] = np.asarray(stats.feats, np.float32)
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # a file object: numpy would append ".npz" to a bare temporary name
            np.savez_compressed(fh, **arrays)

    return atomic_save(path, write)


def load_stats(path: str | os.PathLike, assume_extractor: str | None = None) -> ReferenceStats:
    """Read an `.npz` written by `save_stats`, pytorch-fid or clean-fid; wrong keys or shapes raise EvalInputError.

    A file without diffaccel's metadata (pytorch-fid, clean-fid) does not say which network made it: it is refused
    unless `assume_extractor` names that network (an extractor name such as ``inception-tf-2015-12-05:pool3``);
    its resize mode is then unknown and not compared. A covariance that is not positive semi-definite is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise EvalInputError(f"{path}: no such statistics file")
    with open(path, "rb") as fh:
        magic = fh.read(6)
    if magic.startswith(b"\x93NUMPY"):
        raise EvalInputError(f"{path}: is a single .npy array, not an .npz of statistics (mu, sigma)")
    if not magic.startswith(b"PK"):
        kind = "a text file" if magic and all(32 <= c < 127 or c in (9, 10, 13) for c in magic) else "not a zip archive"
        raise EvalInputError(f"{path}: is {kind}, not an .npz of statistics (an .npz is a zip archive, as written "
                             "by numpy.savez or `diffaccel fid --save-stats`)")
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in f.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise EvalInputError(f"{path}: not a readable .npz file ({exc})") from exc
    missing = [k for k in ("mu", "sigma") if k not in data]
    if missing:
        raise EvalInputError(f"{path}: missing key(s) {', '.join(missing)}; found {', '.join(sorted(data)) or 'none'}")
    mu, sigma = data["mu"], data["sigma"]
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise EvalInputError(f"{path}: mu must be (d,) and sigma (d, d); got {mu.shape} and {sigma.shape}")
    if not (np.issubdtype(mu.dtype, np.floating) and np.issubdtype(sigma.dtype, np.floating)):
        raise EvalInputError(f"{path}: mu and sigma must be floating point, got {mu.dtype} and {sigma.dtype}")
    d = int(mu.shape[0])
    feats = data.get("feats")
    if feats is not None and (feats.ndim != 2 or feats.shape[1] != d):
        raise EvalInputError(f"{path}: feats must be (n, {d}), got {feats.shape}")
    if "dims" in data and int(data["dims"]) != d:
        raise EvalInputError(f"{path}: dims={int(data['dims'])} but mu has {d} entries")
    if "extractor" not in data:
        if not assume_extractor:
            raise EvalInputError(f"{path}: has no extractor metadata (statistics from another tool?), so it cannot "
                                 "be checked against this run's features; if you know which network made it, pass "
                                 "--assume-extractor NAME (e.g. inception for pytorch-fid's Inception pool3)")
        warnings.warn(f"{path}: no metadata; assuming extractor {assume_extractor} as told (--assume-extractor)",
                      stacklevel=2)
    if not np.isfinite(sigma).all() or not np.isfinite(mu).all():
        raise EvalInputError(f"{path}: mu/sigma contain NaN or infinite values")
    try:
        check_psd((sigma + sigma.T).astype(np.float64) / 2, f"{path}: sigma")
    except InputError as exc:
        raise EvalInputError(str(exc)) from None
    n = int(data["n"]) if "n" in data else (int(feats.shape[0]) if feats is not None else 0)
    return ReferenceStats(
        mu=mu.astype(np.float64), sigma=sigma.astype(np.float64), n=n,
        extractor=str(data.get("extractor", assume_extractor)), dims=d, resize=str(data.get("resize", "")),
        extractor_sha256=str(data.get("extractor_sha256", "")), source=str(data.get("source", "")), feats=feats)
