"""Feynman–Kac potentials and particle weights across resampling events (Singhal et al. 2025, §3).

`ParticleSystem` owns everything about the particles except their pixels: log-weights, the per-particle running
state of the potential (previous reward / running max / running sum), the log of the potentials applied along each
particle's ancestry (`acc`), the ESS trace and the ancestry. A sampling loop calls `event(rewards, final)` at each
resampling step and applies the returned ancestor indices to its own tensors.

Textbook mode (default) is standard SMC: log-weights accumulate across events, the final event divides out what the
ancestry already received so that the product of potentials along every path is ``exp(λ·r(x0))`` (the product
condition; Singhal et al. eq. 5), and the tilted target ``p(x0)·exp(λ·r(x0))`` is reached as k → ∞.
``compat="reference"`` reproduces the reference implementation's weighting for cross-checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from ...core.errors import InputError
from .resampling import Resampler, effective_sample_size, normalize_log_weights, resample

Potential = Literal["diff", "max", "sum", "immediate", "bon", "is"]
POTENTIALS: tuple[str, ...] = ("diff", "max", "sum", "immediate", "bon", "is")
INTERMEDIATE_POTENTIALS: tuple[str, ...] = ("diff", "max", "sum", "immediate")
REFERENCE_WEIGHT_CLAMP = 1e10  # the reference clamps exp(A) to [0, 1e10]


def resampling_events(num_steps: int, every: int, start: int, end: int | None, potential: str = "max",
                      steps: list[int] | tuple[int, ...] | None = None) -> list[int]:
    """Event step indices ``{start, start+every, …, ≤ end} ∪ {T−1}`` counting up from the noisiest step.

    `steps` overrides the arithmetic schedule. `bon`/`is` have only the final event. Steps outside ``[0, T−1]``
    raise: a silently dropped event would change the target.
    """
    last = num_steps - 1
    if num_steps < 1:
        raise InputError(f"num_inference_steps must be >= 1, got {num_steps}")
    if potential in ("bon", "is"):
        return [last]
    if steps is not None:
        bad = [s for s in steps if not 0 <= int(s) <= last]
        if bad:
            raise InputError(f"resampling steps {bad} are outside the schedule [0, {last}] of {num_steps} steps")
        return sorted({int(s) for s in steps} | {last})
    if every < 1:
        raise InputError(f"resample_every must be >= 1, got {every}")
    end = last if end is None else end
    if not 0 <= start <= last or not 0 <= end <= last:
        raise InputError(f"resampling window start={start}, end={end} is outside the schedule [0, {last}] of "
                         f"{num_steps} steps; pass resample_start/resample_end (or resample_steps) that fit")
    if end < start:
        raise InputError(f"resample_end ({end}) < resample_start ({start})")
    return sorted(set(range(start, end + 1, every)) | {last})


@dataclass
class ParticleSystem:
    """Weights and potential state of `groups` × `k` particles; `event()` returns ancestors ``[groups, k]``."""

    groups: int
    k: int
    potential: Potential = "max"
    lmbda: float = 10.0
    adaptive: bool = False
    ess_threshold: float = 0.5
    resampler: Resampler = "multinomial"
    reward_floor: float | None = None
    compat: Literal["textbook", "reference"] = "textbook"
    generator: torch.Generator | None = None
    log_weights: torch.Tensor = field(init=False)
    running: torch.Tensor = field(init=False)
    acc: torch.Tensor = field(init=False)
    ess_trace: list[torch.Tensor] = field(init=False, default_factory=list)
    ancestry: list[torch.Tensor] = field(init=False, default_factory=list)
    resampled: list[torch.Tensor] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        if self.potential not in POTENTIALS:
            raise InputError(f"unknown potential {self.potential!r}; valid: {', '.join(POTENTIALS)}")
        if self.compat not in ("textbook", "reference"):
            raise InputError(f"compat must be 'textbook' or 'reference', got {self.compat!r}")
        floor = self.reward_floor
        if floor is None:  # −inf for max (first event uses r_1), 0 otherwise; the reference uses 0.0
            floor = float("-inf") if self.potential == "max" and self.compat == "textbook" else 0.0
        if self.potential == "diff" and not torch.isfinite(torch.tensor(floor)):
            raise InputError("reward_floor must be finite for the 'diff' potential")
        shape = (self.groups, self.k)
        self.log_weights = torch.zeros(shape, dtype=torch.float64)
        self.running = torch.full(shape, float(floor), dtype=torch.float64)
        if self.potential == "sum":
            self.running.zero_()
        self.acc = torch.zeros(shape, dtype=torch.float64)
        self.ess_trace, self.ancestry, self.resampled = [], [], []

    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x) if self.lmbda == 0 else self.lmbda * x

    def _log_potential(self, r: torch.Tensor, final: bool) -> torch.Tensor:
        """The accumulated potential ``A_j``; updates the running state. Returns the value the potential is built on
        at final."""
        p = self.potential
        if p == "bon":
            return torch.where(r == r.max(dim=1, keepdim=True).values, 0.0, float("-inf"))
        if p == "is":
            return self._scale(r)
        if p == "diff":
            a = self._scale(r - self.running)
            self.running = r.clone()
            return a
        if p == "max":
            self.running = torch.maximum(self.running, r)
        elif p == "sum":
            self.running = self.running + r
        else:  # immediate
            self.running = r.clone()
        if not final:
            return self._scale(self.running)
        # final correction: λ·r_J − Σ_{i<J} A_i restores the product condition (the reference keeps its candidate
        # value — running max / running sum — here instead of r_J).
        target = self.running if self.compat == "reference" else r
        return self._scale(target) - self.acc

    def event(self, rewards: torch.Tensor, final: bool = False) -> torch.Tensor:
        """Apply one resampling event; returns ancestor indices ``[groups, k]`` (identity where nothing moved)."""
        r = torch.as_tensor(rewards).detach().to("cpu", torch.float64).reshape(self.groups, self.k)
        bad = ~torch.isfinite(r)
        inc = self._log_potential(r, final)
        inc = torch.where(bad | torch.isnan(inc) | (inc == float("inf")), float("-inf"), inc)
        if self.compat == "reference":
            # exp, clamp to [0, 1e10], NaN -> 0; only the current increment counts (weights not carried)
            w = torch.nan_to_num(inc.exp().clamp(0, REFERENCE_WEIGHT_CLAMP), nan=0.0)
            logw = w.log()
            ess = effective_sample_size(logw)
            if self.adaptive or final:
                do = ess < self.ess_threshold * self.k
            else:
                do = torch.ones(self.groups, dtype=torch.bool)
        else:
            self.acc = self.acc + inc
            self.log_weights = torch.where(torch.isneginf(inc), float("-inf"), self.log_weights + inc)
            logw = self.log_weights
            ess = effective_sample_size(logw)
            if self.potential in ("bon", "is"):
                do = torch.zeros(self.groups, dtype=torch.bool)
            elif self.adaptive:
                do = ess < self.ess_threshold * self.k
            else:
                do = torch.ones(self.groups, dtype=torch.bool)
        identity = torch.arange(self.k).expand(self.groups, self.k)
        anc = resample(logw, self.resampler, self.generator) if do.any() else identity
        anc = torch.where(do[:, None], anc, identity).contiguous()
        rows = torch.arange(self.groups)[:, None]
        if self.compat == "reference":
            acc_new = self.acc + logw  # product_of_potentials * w, kept only where resampled
            self.acc = torch.where(do[:, None], acc_new[rows, anc], self.acc)
            self.log_weights = torch.zeros_like(logw)
        else:
            self.acc = self.acc[rows, anc]
            self.log_weights = torch.where(do[:, None], torch.zeros_like(logw), self.log_weights)
        self.running = self.running[rows, anc]
        self.ess_trace.append(ess.float())
        self.ancestry.append(anc)
        self.resampled.append(do)
        return anc

    def normalized_log_weights(self) -> torch.Tensor:
        """Current normalised log-weights ``[groups, k]`` (uniform right after a resampling)."""
        return normalize_log_weights(self.log_weights, warn=False).float()
