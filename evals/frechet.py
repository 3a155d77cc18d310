"""The Fréchet distance between two Gaussians, and streaming float64 feature statistics.

FID (Heusel et al., 2017, "GANs Trained by a Two Time-Scale Update Rule ...", eq. 6) is the squared
2-Wasserstein distance between N(mu_a, Sigma_a) and N(mu_b, Sigma_b) fitted to features:

    d^2 = |mu_a - mu_b|^2 + Tr(Sigma_a) + Tr(Sigma_b) - 2 Tr((Sigma_a Sigma_b)^{1/2})

For PSD matrices the eigenvalues of Sigma_a Sigma_b equal those of R Sigma_b R with R = Sigma_a^{1/2}, which are
real and non-negative, so the default method needs no general (complex) matrix square root.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from ..core.errors import InputError
from .errors import EvalInputError

METHODS = ("eigh", "sqrtm", "eigvals")


def _check_gaussian(mu: np.ndarray, sigma: np.ndarray, tag: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.asarray(mu, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    if mu.ndim != 1:
        raise InputError(f"mu{tag} must be 1-D, got shape {mu.shape}")
    if sigma.ndim != 2 or sigma.shape[0] != sigma.shape[1]:
        raise InputError(f"sigma{tag} must be a square 2-D matrix, got shape {sigma.shape}")
    if sigma.shape[0] != mu.shape[0]:
        raise InputError(f"sigma{tag} is {sigma.shape} but mu{tag} has {mu.shape[0]} entries")
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
        raise InputError(f"mu{tag}/sigma{tag} contain NaN or infinite values")
    scale = max(float(np.abs(sigma).max()), 1e-300)
    if float(np.abs(sigma - sigma.T).max()) > 1e-6 * scale:
        raise InputError(f"sigma{tag} is not symmetric (to 1e-6 relative)")
    sigma = (sigma + sigma.T) / 2
    check_psd(sigma, f"sigma{tag}")
    return mu, sigma


def check_psd(sigma: np.ndarray, what: str) -> None:
    """Refuse a covariance that is not positive semi-definite beyond round-off (`InputError` naming `what`).

    A Cholesky factorisation of ``Σ + τI`` exists iff the smallest eigenvalue exceeds −τ. τ covers an
    eigensolver's error on a d x d matrix, ~d·eps64·‖Σ‖ (Golub & Van Loan §8.1), plus a covariance stored in
    float32, ~eps32·‖Σ‖; ‖Σ‖ is bounded by its largest diagonal entry for a PSD matrix.
    """
    d = sigma.shape[0]
    top = float(np.max(np.diag(sigma))) if d else 0.0
    tau = 4 * (d * np.finfo(np.float64).eps + np.finfo(np.float32).eps) * max(top, 0.0)
    try:
        if top < 0 or (top == 0 and np.any(sigma)):
            raise np.linalg.LinAlgError
        np.linalg.cholesky(sigma + (tau or np.finfo(np.float64).tiny) * np.eye(d))
    except np.linalg.LinAlgError:
        w = np.linalg.eigvalsh(sigma)
        raise InputError(f"{what} is not a covariance matrix: it is not positive semi-definite (smallest "
                         f"eigenvalue {w[0]:.3g}, largest {w[-1]:.3g})") from None


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray, method: str = "eigh", eps: float = 1e-6) -> float:
    """Tr((Sigma1 Sigma2)^{1/2}) in float64 by one of `METHODS` (see `frechet_distance`)."""
    if method == "eigh":
        r = _psd_sqrt(sigma1)
        m = r @ sigma2 @ r
        lam = np.linalg.eigvalsh((m + m.T) / 2)
        return float(np.sqrt(np.clip(lam, 0.0, None)).sum())
    if method == "eigvals":  # torchmetrics / torch-fidelity: real part of sqrt of the (complex) eigenvalues
        lam = np.linalg.eigvals(sigma1 @ sigma2).astype(np.complex128)
        return float(np.sqrt(lam).real.sum())
    if method == "sqrtm":  # pytorch-fid step by step; scipy>=1.18 has no `disp`, so finiteness is checked here
        from scipy import linalg

        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.all(np.isfinite(covmean)):
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if np.iscomplexobj(covmean):
            if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
                raise InputError(f"imaginary component {np.max(np.abs(covmean.imag))} in sqrtm(Sigma1 Sigma2)")
            covmean = covmean.real
        return float(np.trace(covmean))
    raise InputError(f"unknown Fréchet method {method!r}; expected one of {METHODS}")


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, *, method: str = "eigh",
    eps: float = 1e-6,
) -> float:
    """Squared Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64 (Heusel et al. 2017, eq. 6).

    method:
      - "eigh" (default): R = Sigma1^{1/2} by `eigh` (eigenvalues clipped at 0), Tr = sum sqrt(eigvalsh(R Sigma2 R)).
        Real and PSD throughout, robust for rank-deficient covariances.
      - "sqrtm": pytorch-fid's `calculate_frechet_distance` (scipy sqrtm, eps retry, 1e-3 imaginary check).
      - "eigvals": the torchmetrics / torch-fidelity form, sum of Re sqrt(eig(Sigma1 Sigma2)).
    Covariances that are not positive semi-definite are refused (`check_psd`), so a distance below 0 can only be
    round-off (identical inputs): it is returned as 0.0 with a `UserWarning` that says so.
    """
    mu1, sigma1 = _check_gaussian(mu1, sigma1, "1")
    mu2, sigma2 = _check_gaussian(mu2, sigma2, "2")
    if mu1.shape != mu2.shape:
        raise InputError(f"feature dimensions differ: mu1 has {mu1.shape[0]}, mu2 has {mu2.shape[0]}")
    diff = mu1 - mu2
    tr = trace_sqrt_product(sigma1, sigma2, method, eps)
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr)
    if value < 0:  # both covariances are PSD (checked above): a negative distance is round-off, never information
        warnings.warn(f"FID {value:.3g} is below 0 by floating-point round-off (identical or near-identical "
                      "statistics); reported as 0", UserWarning, stacklevel=2)
        value = 0.0
    return value


@dataclass
class FeatureStats:
    """Streaming sufficient statistics n, sum f, sum f f^T in float64, optionally keeping features.

    Features are shifted by a fixed pivot (the first batch's mean) before accumulation, so large means do not cancel
    the covariance; the pivot is added back to mu. `keep_features=True` also stores the raw float32 features (for
    KID, which needs them, and for the optional `feats` key of the `.npz`).
    """

    dims: int | None = None
    keep_features: bool = False
    n: int = 0
    _pivot: np.ndarray | None = field(default=None, repr=False)
    _sum: np.ndarray | None = field(default=None, repr=False)
    _outer: np.ndarray | None = field(default=None, repr=False)
    _feats: list[np.ndarray] = field(default_factory=list, repr=False)

    def update(self, features: torch.Tensor | np.ndarray) -> None:
        f = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
        if f.ndim != 2:
            raise InputError(f"features must be (N, d), got shape {f.shape}")
        if self.dims is None:
            self.dims = int(f.shape[1])
        if f.shape[1] != self.dims:
            raise InputError(f"features have {f.shape[1]} dims, expected {self.dims}")
        if f.shape[0] == 0:
            return
        if not np.all(np.isfinite(f)):
            raise EvalInputError("the feature extractor returned NaN or infinite features")
        if self.keep_features:
            self._feats.append(np.asarray(f, dtype=np.float32).copy())
        x = f.astype(np.float64)
        if self._pivot is None:
            self._pivot = x.mean(axis=0)
            self._sum = np.zeros(self.dims)
            self._outer = np.zeros((self.dims, self.dims))
        x = x - self._pivot
        self._sum += x.sum(axis=0)
        self._outer += x.T @ x
        self.n += int(f.shape[0])

    @property
    def mu(self) -> np.ndarray:
        self._require(1)
        return self._pivot + self._sum / self.n

    @property
    def sigma(self) -> np.ndarray:
        self._require(2)
        m = self._sum / self.n
        s = (self._outer - self.n * np.outer(m, m)) / (self.n - 1)
        return (s + s.T) / 2

    @property
    def features(self) -> np.ndarray | None:
        if not self.keep_features:
            return None
        return np.concatenate(self._feats) if self._feats else np.zeros((0, self.dims or 0), np.float32)

    def _require(self, k: int) -> None:
        if self.n < k:
            raise EvalInputError(f"need at least {k} samples for statistics, got {self.n}")

    def warn_if_rank_deficient(self, tag: str = "") -> None:
        if self.dims is not None and self.n <= self.dims:
            warnings.warn(f"{tag or 'statistics'}: n={self.n} <= d={self.dims}, the covariance is rank-deficient "
                          "and FID is dominated by estimation noise", stacklevel=2)
