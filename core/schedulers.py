"""One table of scheduler capabilities, read by every method that cares how a scheduler steps.

* stochastic — `step` draws fresh noise (FK steering needs it; noise search and reflow teachers refuse it);
  None means "depends on the configuration" (`eta` for DDIM, `algorithm_type` for DPM-Solver, ...).
* keeps_history — `step` keeps per-row state between calls (multistep buffers, PRK stages): permuting or
  re-batching rows between steps (FK resampling) desynchronises it.
* time_shift — `TimeShiftScheduler` can wrap it (single-evaluation VP schedulers, FlowMatch-Euler and diffaccel's
  PNDM family).

A `TimeShiftScheduler` is looked through: its base is what steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SchedulerCapabilities:
    stochastic: bool | None
    keeps_history: bool
    time_shift: bool


_C = SchedulerCapabilities
#: scheduler class name -> capabilities (stochastic None: decided by `is_stochastic` from the configuration)
CAPABILITIES: dict[str, SchedulerCapabilities] = {
    "DDIMScheduler": _C(None, False, True),
    "DDPMScheduler": _C(True, False, True),
    "DPMSolverMultistepScheduler": _C(None, True, True),
    "UniPCMultistepScheduler": _C(False, True, True),
    "DEISMultistepScheduler": _C(False, True, True),
    "PseudoNumericalScheduler": _C(False, True, True),  # every PNDM-family method is an ODE solver
    "PNDMScheduler": _C(False, True, False),
    "EulerDiscreteScheduler": _C(False, False, False),
    "HeunDiscreteScheduler": _C(False, True, False),
    "LMSDiscreteScheduler": _C(False, True, False),
    "KDPM2DiscreteScheduler": _C(False, True, False),
    "DPMSolverSinglestepScheduler": _C(False, True, False),
    "FlowMatchEulerDiscreteScheduler": _C(None, False, True),
    "FlowMatchSDEScheduler": _C(None, False, False),  # diffaccel's: eta > 0 (its default, 1) injects noise
    "FlowMatchHeunDiscreteScheduler": _C(False, True, False),
    "EulerAncestralDiscreteScheduler": _C(True, False, False),
    "KDPM2AncestralDiscreteScheduler": _C(True, True, False),
    "DPMSolverSDEScheduler": _C(True, True, False),
    "LCMScheduler": _C(True, False, False),
    "TCDScheduler": _C(True, False, False),
    "DDPMWuerstchenScheduler": _C(True, False, False),
    "RectifiedFlowEulerScheduler": _C(False, False, False),
}
TIME_SHIFT_BASES: tuple[str, ...] = tuple(name for name, c in CAPABILITIES.items() if c.time_shift)


def unwrap(scheduler: Any) -> Any:
    """The scheduler that actually steps: wrappers (`TimeShiftScheduler`, diffaccel's step proxies) expose `base`."""
    seen = 0
    while seen < 8:
        inner = scheduler.__dict__.get("base") if hasattr(scheduler, "__dict__") else None
        if inner is None:
            inner = getattr(scheduler, "wrapped_scheduler", None)
        if inner is None:
            return scheduler
        scheduler, seen = inner, seen + 1
    return scheduler


def class_name(scheduler: Any) -> str:
    """The name of the stepping class; `kwargs_tolerant` subclasses keep their base's name."""
    return type(unwrap(scheduler)).__name__


def capabilities(scheduler: Any) -> SchedulerCapabilities | None:
    """This scheduler's row of `CAPABILITIES`, or None for an unknown class."""
    return CAPABILITIES.get(class_name(scheduler))


def is_stochastic(scheduler: Any, eta: float | None = 0.0) -> bool | None:
    """Whether `scheduler.step` injects fresh noise (True/False), or None when the class is unknown.

    `eta` is the value given to ``step``: DDIM's defaults to 0 there; diffaccel's `FlowMatchSDEScheduler` uses its
    config's `eta` when ``step`` gets None (stock Flux/SD3 pipelines pass none)."""
    inner = unwrap(scheduler)
    name = type(inner).__name__
    cfg = getattr(inner, "config", {}) or {}
    if name == "DDIMScheduler":
        return (eta or 0.0) > 0
    if name == "FlowMatchSDEScheduler":
        return (cfg.get("eta", 1.0) if eta is None else eta) > 0
    if name == "DPMSolverMultistepScheduler":
        return "sde" in str(cfg.get("algorithm_type", ""))
    if name == "FlowMatchEulerDiscreteScheduler":
        return bool(cfg.get("stochastic_sampling", False))
    caps = CAPABILITIES.get(name)
    if caps is not None and caps.stochastic is not None:
        return caps.stochastic
    return True if "Ancestral" in name else None


def keeps_history(scheduler: Any) -> bool:
    """Whether `step` keeps per-row state between calls (unknown classes are assumed to)."""
    caps = capabilities(scheduler)
    return True if caps is None else caps.keeps_history


def supports_time_shift(scheduler: Any) -> bool:
    return class_name(scheduler) in TIME_SHIFT_BASES
