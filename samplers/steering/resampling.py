"""Log-space particle weights, effective sample size and the four classic resamplers.

Everything works on grouped log-weights ``[B, k]`` (B prompt groups of k particles) and returns ancestor indices
``[B, k]`` that stay inside their group. Reductions run in float64; raw log-weights are never exponentiated
(``softmax`` goes through ``logsumexp``), so ``λ·r`` of order 1e4 is harmless. All four resamplers are unbiased:
``E[#copies of i] = k·ŵ_i`` (Douc, Cappé & Moulines 2005, "Comparison of resampling schemes for particle filtering").
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch

from ...core.errors import InputError

Resampler = Literal["multinomial", "systematic", "stratified", "residual"]
RESAMPLERS: tuple[str, ...] = ("multinomial", "systematic", "stratified", "residual")


def _as_groups(log_weights: torch.Tensor) -> torch.Tensor:
    lw = torch.as_tensor(log_weights).detach().to("cpu", torch.float64)
    if lw.ndim == 1:
        lw = lw[None]
    if lw.ndim != 2 or lw.shape[1] < 1:
        raise InputError(f"log-weights must have shape [k] or [B, k], got {tuple(lw.shape)}")
    return lw


def normalize_log_weights(log_weights: torch.Tensor, warn: bool = True) -> torch.Tensor:
    """``log ŵ = logw − logsumexp(logw)`` per group; NaN/+inf count as −inf and an all-−inf group becomes uniform."""
    lw = _as_groups(log_weights)
    lw = torch.where(torch.isnan(lw) | (lw == float("inf")), torch.full_like(lw, float("-inf")), lw)
    dead = torch.isneginf(lw).all(dim=1)
    if dead.any():
        if warn:
            warnings.warn(f"{int(dead.sum())} particle group(s) have no finite weight; using uniform weights",
                          RuntimeWarning, stacklevel=2)
        lw[dead] = 0.0
    return lw - torch.logsumexp(lw, dim=1, keepdim=True)


def effective_sample_size(log_weights: torch.Tensor) -> torch.Tensor:
    """``ESS = 1/Σŵ² = exp(2·LSE(logw) − LSE(2·logw))`` per group, in [1, k]."""
    lw = normalize_log_weights(log_weights, warn=False)
    return torch.exp(-torch.logsumexp(2 * lw, dim=1)).clamp(1.0, lw.shape[1])


def _inverse_cdf(w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Indices i with CDF(i−1) ≤ u < CDF(i) for sorted points u ∈ [0, 1), per group."""
    cdf = torch.cumsum(w, dim=1)
    cdf[:, -1] = 1.0  # guard float round-off so u < 1 always finds an index
    return torch.searchsorted(cdf, u.contiguous(), right=True).clamp_max(w.shape[1] - 1)


def resample(log_weights: torch.Tensor, method: Resampler = "multinomial",
             generator: torch.Generator | None = None, num_samples: int | None = None) -> torch.Tensor:
    """Ancestor indices ``[B, n]`` (n = k unless `num_samples`) drawn from each group's normalised weights.

    multinomial: n i.i.d. categorical draws; systematic: one uniform ``U`` and points ``(U + j)/n``;
    stratified: one uniform per stratum ``(U_j + j)/n``; residual: ``⌊nŵ_i⌋`` deterministic copies and
    multinomial draws on the remainder. Use a dedicated generator so resampling never shifts the diffusion noise.
    """
    if method not in RESAMPLERS:
        raise InputError(f"unknown resampler {method!r}; valid: {', '.join(RESAMPLERS)}")
    w = normalize_log_weights(log_weights).exp()
    groups, k = w.shape
    n = k if num_samples is None else int(num_samples)
    if method == "multinomial":
        return torch.multinomial(w, n, replacement=True, generator=generator)
    if method == "systematic":
        u = (torch.rand(groups, 1, generator=generator, dtype=torch.float64) + torch.arange(n)) / n
        return _inverse_cdf(w, u)
    if method == "stratified":
        u = (torch.rand(groups, n, generator=generator, dtype=torch.float64) + torch.arange(n)) / n
        return _inverse_cdf(w, u)
    counts = torch.floor(n * w).long()  # residual
    rest = n - counts.sum(dim=1)
    if int(rest.max()) > 0:
        resid = (n * w - counts).clamp_min(0)
        resid[rest == 0] = 1.0  # rows with nothing left to draw: any valid distribution, draws are masked out
        draws = torch.multinomial(resid, int(rest.max()), replacement=True, generator=generator)
        keep = torch.arange(draws.shape[1])[None] < rest[:, None]
        counts = counts + torch.zeros_like(counts).scatter_add_(1, draws, keep.long())
    return _from_counts(counts)


def _from_counts(counts: torch.Tensor) -> torch.Tensor:
    """Copy counts ``[B, k]`` (rows summing to n) -> sorted ancestor indices ``[B, n]``."""
    n = int(counts[0].sum())
    return torch.searchsorted(torch.cumsum(counts, dim=1), torch.arange(n).expand(len(counts), n).contiguous(),
                              right=True)


def flat_indices(ancestors: torch.Tensor) -> torch.Tensor:
    """Group-local ancestors ``[B, k]`` -> row indices into a prompt-major ``B·k`` batch (never crossing groups)."""
    groups, k = ancestors.shape
    return (ancestors + k * torch.arange(groups)[:, None]).reshape(-1)
