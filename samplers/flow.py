"""Flow matching (rectified flow) for the samplers: recognising flow schedulers, their sigma grid, and the exact
transfer map of the flow interpolation.

A flow-matching model (SD3, Flux; Lipman et al. 2023, Liu et al. 2023, Esser et al. 2024) is trained on the
straight path `x_σ = (1 - σ) x0 + σ ε` and predicts the velocity `v = ε - x0` (diffusers'
``prediction_type="flow_prediction"``; `FlowMatchEulerDiscreteScheduler` feeds it `t = 1000 σ`). Given `v` at
`(x, σ)`, the data and noise estimates are `x0 = x - σ v` and `ε = x + (1 - σ) v`, and moving both to level `σ'` on
the interpolation gives

    φ_flow(x, v; σ -> σ') = (1 - σ') x0 + σ' ε = x + (σ' - σ) v,

the flow counterpart of PNDM's transfer part (Eq. 11): exact on a straight path, and the Euler step of
`dx/dσ = v`. (The ε-form of the same map divides by `1 - σ`, which is 0 at the first step of every flow sampler:
there `ε = x` carries no model information, so the gradient part works on `v`.)
"""

from __future__ import annotations

from typing import Any

import torch

from ..core.errors import InputError

#: diffusers schedulers that integrate a flow-matching model
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler", "FlowMatchSDEScheduler")
#: options of FlowMatchEulerDiscreteScheduler that fix its sigma grid (passed through unchanged)
SIGMA_OPTIONS = ("num_train_timesteps", "shift", "use_dynamic_shifting", "base_shift", "max_shift",
                 "base_image_seq_len", "max_image_seq_len", "shift_terminal", "use_karras_sigmas",
                 "use_exponential_sigmas", "use_beta_sigmas", "time_shift_type")


def is_flow_config(config: dict[str, Any]) -> bool:
    """True for the config of a flow-matching scheduler (FlowMatch*, or any scheduler in flow mode)."""
    if config.get("_class_name") in FLOW_SCHEDULERS or bool(config.get("use_flow_sigmas", False)):
        return True
    if "prediction_type" in config:
        return config["prediction_type"] == "flow_prediction"
    # a config built in code carries no class name: FlowMatch schedulers have a shift and no beta schedule
    return "shift" in config and "use_dynamic_shifting" in config and "beta_start" not in config


def is_flow_scheduler(scheduler) -> bool:
    base = getattr(scheduler, "base", scheduler)  # TimeShiftScheduler wraps its base
    return type(base).__name__ in FLOW_SCHEDULERS or is_flow_config(dict(base.config))


def require_vp(scheduler, method: str) -> None:
    """Refuse a flow-matching scheduler in a method that assumes a variance-preserving (DDPM-type) schedule."""
    if is_flow_scheduler(scheduler):
        raise InputError(
            f"{method} assumes a variance-preserving diffusion schedule (x_t = sqrt(a) x0 + sqrt(1 - a) eps, with "
            f"alphas_cumprod), but the pipeline's {type(getattr(scheduler, 'base', scheduler)).__name__} is a "
            "flow-matching scheduler (x = (1 - sigma) x0 + sigma eps, velocity prediction); it has no "
            "alphas_cumprod to compute its levels from"
        )


def flow_base_scheduler(config: dict[str, Any]):
    """A FlowMatchEulerDiscreteScheduler with the sigma options of `config`: the one source of flow sigma grids."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**{k: config[k] for k in SIGMA_OPTIONS if k in config})


def flow_transfer(x: torch.Tensor, v: torch.Tensor, s: torch.Tensor | float, s_next: torch.Tensor | float
                  ) -> torch.Tensor:
    """φ_flow(x, v; σ -> σ') = x + (σ' - σ) v (module docstring). `s`, `s_next`: scalars or per-sample (B,) sigmas.

    The step `σ' - σ` is formed in float64 and rounded once to the working precision (float32 unless `x` is
    float64), then applied as FlowMatchEulerDiscreteScheduler applies it, so the Euler case matches it bit for bit.
    """
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = torch.as_tensor(s_next, dtype=torch.float64) - torch.as_tensor(s, dtype=torch.float64)
    if h.ndim == 1:
        h = h.reshape(-1, *([1] * (x.ndim - 1)))
    out = x.to(dt) + h.to(device=x.device, dtype=dt) * v.to(dt)
    return out.to(x.dtype)


def select_shift_flow(sample: torch.Tensor, center: float, window: int, num_train_timesteps: int,
                      halfwidth_rule: str = "floor_half") -> torch.Tensor:
    """Time-Shift's selection rule restated on σ (samplers/README.md, "Time-Shift on flow matching").

    Candidates are the training levels `σ_τ = τ / T` for integer τ within `h` training steps of the centre
    `round(center T)` (h = window // 2, or window for ``full``), clipped to `1..T`; each sample takes the σ_τ whose
    noise variance `σ_τ²` is closest to the variance of its entries (ties: smallest σ). Returns float64 sigmas (B,).
    """
    big_t = int(num_train_timesteps)
    h = window // 2 if halfwidth_rule == "floor_half" else window
    c = int(round(float(center) * big_t))
    lo, hi = max(1, c - h), min(big_t, c + h)
    cand = torch.arange(lo, hi + 1, dtype=torch.float64) / big_t
    var = sample.detach().to(torch.float32).flatten(1).var(dim=1).cpu().to(torch.float64)
    return cand[((var[:, None] - cand[None, :] ** 2) ** 2).argmin(dim=1)]
