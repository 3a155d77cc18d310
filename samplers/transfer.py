"""Shared machinery of the PNDM family: noise schedules, inference grids and the transfer map φ.

Notation (as in PNDM, Liu et al. ICLR 2022, Sec. 3): `A[i] = prod_{k<=i} (1 - beta_k)` is the 0-indexed cumulative
product (`alphas_cumprod` in diffusers); a state at level `a` is `x = sqrt(a) x0 + sqrt(1 - a) eps`.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..core.errors import InputError

GRID_SPACINGS = ("leading", "trailing", "linspace", "pndm_uniform", "quad")

#: model time of the "final" level (the clean end of a trajectory); its noise level is `final_alpha_cumprod`.
FINAL = -1


def make_betas(
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    beta_schedule: str,
    trained_betas: np.ndarray | list[float] | None = None,
) -> torch.Tensor:
    """Training betas as float32, computed exactly as diffusers does so `alphas_cumprod` match bit for bit.

    Refused: fewer than 2 training steps, betas outside (0, 1) (the noise levels must stay in (0, 1)).
    """
    if trained_betas is not None:
        betas = torch.tensor(np.asarray(trained_betas, dtype=np.float64), dtype=torch.float32)
        if betas.ndim != 1 or len(betas) < 2 or not bool(((betas > 0) & (betas < 1)).all()):
            raise InputError("trained_betas must be a 1-D list of at least 2 values, each in (0, 1)")
        return betas
    if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, (int, np.integer)) \
            or not 2 <= num_train_timesteps <= 1_000_000:
        raise InputError(f"num_train_timesteps must be an integer in [2, 1000000], got {num_train_timesteps!r}")
    for name, v in (("beta_start", beta_start), ("beta_end", beta_end)):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating)) or not 0 < v < 1:
            raise InputError(f"{name} must be a number in (0, 1), got {v!r}")
    if beta_end < beta_start:
        raise InputError(f"beta_end ({beta_end}) must be >= beta_start ({beta_start})")
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        from diffusers.schedulers.scheduling_ddpm import betas_for_alpha_bar

        return betas_for_alpha_bar(num_train_timesteps)
    raise InputError(
        f"beta_schedule={beta_schedule!r} is not supported; use 'linear', 'scaled_linear', 'squaredcos_cap_v2' "
        "or pass trained_betas"
    )


def make_grid(spacing: str, num_steps: int, num_train_timesteps: int, steps_offset: int = 0) -> np.ndarray:
    """Decreasing model times `t_0 > ... > t_{K-1}` at which transitions start (the final target is not included).

    * ``leading`` / ``trailing`` / ``linspace``: the diffusers grids (Table 2 of Lin et al., "Common Diffusion Noise
      Schedules and Sample Steps are Flawed", 2023); ``steps_offset`` is added to ``leading`` only, as diffusers does.
      Always ``num_steps`` points (diffusers' ``trailing`` has one extra point for some N, e.g. 61).
    * ``pndm_uniform``: the grid of the original PNDM code, ``range(0, T, T // N)`` reversed; it has
      ``ceil(T / (T // N))`` points, which is ``N`` only when ``T % N == 0``.
    * ``quad``: the DDIM quadratic grid ``int((i * sqrt(0.8 T) / (N - 1))^2)`` (Song et al. 2021, App. D.2).
    """
    n, big_t = num_steps, num_train_timesteps
    if spacing == "leading":
        grid = np.arange(0, n, dtype=np.int64) * (big_t // n) + steps_offset
    elif spacing == "trailing":
        # diffusers uses np.arange(T, 0, -T / N), which yields N + 1 points for some N (61, ...) by float
        # round-off; indexing keeps exactly N
        grid = (np.round(big_t - np.arange(n) * (big_t / n)).astype(np.int64) - 1)[::-1]
    elif spacing == "linspace":
        grid = np.linspace(0, big_t - 1, n).round().astype(np.int64)
    elif spacing == "pndm_uniform":
        grid = np.arange(0, big_t, big_t // n, dtype=np.int64)
    elif spacing == "quad":
        if n == 1:
            grid = np.zeros(1, dtype=np.int64)
        else:
            grid = ((np.arange(n) * math.sqrt(0.8 * big_t) / (n - 1)) ** 2).astype(np.int64)
    else:
        raise InputError(f"timestep_spacing={spacing!r} is not supported; choose one of {GRID_SPACINGS}")
    grid = np.ascontiguousarray(grid[::-1])
    if len(grid) > 1 and not np.all(np.diff(grid) < 0):
        raise InputError(
            f"timestep_spacing={spacing!r} with num_inference_steps={num_steps} gives repeated model times "
            f"(grid not strictly decreasing); use fewer steps or another spacing"
        )
    return grid


def transfer_coefficients(a: torch.Tensor, a_next: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients `(c_x, c_e)` of φ(x, e; a -> a') = c_x x - c_e e (PNDM paper, Eq. 11).

    Written without the cancellation of `sqrt(a') x0_hat + sqrt(1-a') e` when `a ≈ a'`:
    `c_x = sqrt(a'/a)`, `c_e = (a' - a) / (sqrt(a) (sqrt(a (1-a')) + sqrt(a' (1-a))))`.
    """
    c_x = (a_next / a).sqrt()
    c_e = (a_next - a) / (a.sqrt() * ((a * (1 - a_next)).sqrt() + (a_next * (1 - a)).sqrt()))
    return c_x, c_e


def _as_level(v: torch.Tensor | float, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A scalar or per-sample (B,) noise level, shaped to broadcast against `like` (B, ...)."""
    v = torch.as_tensor(v, dtype=torch.float64)
    if v.ndim == 1:
        v = v.reshape(-1, *([1] * (like.ndim - 1)))
    return v.to(device=like.device, dtype=dtype)


def work_dtype(sample: torch.Tensor) -> torch.dtype:
    """Arithmetic precision of a step: float64 stays float64, everything else is computed in float32."""
    return torch.float64 if sample.dtype == torch.float64 else torch.float32


def transfer(x: torch.Tensor, e: torch.Tensor, a: torch.Tensor | float, a_next: torch.Tensor | float) -> torch.Tensor:
    """The transfer part φ of PNDM (Liu et al., ICLR 2022, Eq. 11): move `x` from level `a` to `a_next` along `e`.

    `a`, `a_next` are scalars or per-sample (B,) tensors of `alphas_cumprod` values. Coefficients are computed in
    float64 and applied in `work_dtype(x)`; the result has `x.dtype`. Exact on a noise-free trajectory: with
    `x = sqrt(a) x0 + sqrt(1-a) eps` and `e = eps` the result is `sqrt(a') x0 + sqrt(1-a') eps`.
    """
    dt = work_dtype(x)
    a64 = torch.as_tensor(a, dtype=torch.float64)
    an64 = torch.as_tensor(a_next, dtype=torch.float64)
    c_x, c_e = transfer_coefficients(a64, an64)
    out = _as_level(c_x, x, dt) * x.to(dt) - _as_level(c_e, x, dt) * e.to(dt)
    return out.to(x.dtype)


def epsilon_from_v(v: torch.Tensor, x: torch.Tensor, a: torch.Tensor | float) -> torch.Tensor:
    """Noise prediction from a v-prediction (Salimans & Ho 2022, Eq. 9 rearranged): eps = sqrt(a) v + sqrt(1-a) x."""
    dt = work_dtype(x)
    a64 = torch.as_tensor(a, dtype=torch.float64)
    out = _as_level(a64.sqrt(), x, dt) * v.to(dt) + _as_level((1 - a64).sqrt(), x, dt) * x.to(dt)
    return out.to(v.dtype)
