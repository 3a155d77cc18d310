"""Sampler methods: `Sampler` (swap the scheduler) and `TimeShift` (wrap it).

`Sampler(name, nfe)` builds the scheduler from the pipeline's own scheduler config (same training schedule), on the
``trailing`` grid unless ``grid="model"`` keeps the pipeline's grid, and sets the call's step count so that the
denoiser runs exactly `nfe` times per image (the samplers benchmark's convention; PNDM warm-up steps cost extra
evaluations). `TimeShift` wraps whatever scheduler the recipe leaves (Li et al., "Alleviating Exposure Bias in
Diffusion Models through Sampling with Shifted Time Steps", ICLR 2024; `samplers/time_shift.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..core.families import PipelineFamily
from ..core.schedulers import class_name, supports_time_shift
from .base import ApplyContext, CompositionError, Method, Stage, parse_args


def _diffusers(cls_name: str, extra_calls: int = 0, tolerant: bool = False, **kw: Any) -> tuple[Callable, Callable]:
    def build(config: dict, spacing: dict) -> Any:
        import diffusers

        from ..samplers.bench import kwargs_tolerant

        cls = getattr(diffusers, cls_name)
        return (kwargs_tolerant(cls) if tolerant else cls).from_config(config, **spacing, **kw)

    return build, lambda nfe: nfe - extra_calls if nfe - extra_calls >= 1 else None


def _pndm(method: str) -> tuple[Callable, Callable]:
    def build(config: dict, spacing: dict) -> Any:
        from ..samplers import PseudoNumericalScheduler

        return PseudoNumericalScheduler.from_config(config, method=method, **spacing)

    def steps(nfe: int) -> int | None:
        from ..samplers.pndm import transitions_for_nfe

        return transitions_for_nfe(method, nfe)

    return build, steps


#: recipe name -> (build(pipeline scheduler config, spacing kwargs) -> scheduler, NFE -> num_inference_steps)
SAMPLERS: dict[str, tuple[Callable, Callable]] = {
    "ddim": _diffusers("DDIMScheduler"),
    "ddpm": _diffusers("DDPMScheduler"),
    "dpm++2m": _diffusers("DPMSolverMultistepScheduler", algorithm_type="dpmsolver++", solver_order=2),
    "unipc": _diffusers("UniPCMultistepScheduler", tolerant=True),  # DDPMPipeline passes `generator`
    "plms-diffusers": _diffusers("PNDMScheduler", extra_calls=1, tolerant=True, skip_prk_steps=True),
    **{m: _pndm(m) for m in ("s-pndm", "f-pndm", "pie", "prk", "plms-ldm", "fon")},
}
GRIDS = ("trailing", "model")
#: samplers that run on a flow-matching pipeline (diffaccel's PNDM family in flow mode; `ddim` is FlowMatch-Euler)
FLOW_SAMPLERS = ("ddim", "s-pndm", "f-pndm", "pie", "prk", "plms-ldm", "fon")


@dataclass(frozen=True)
class Sampler(Method, name="sampler", slot="sampler", stage=Stage.SCHEDULER):
    """A scheduler from `SAMPLERS`, spending `nfe` denoiser evaluations per image (None: the caller's steps)."""

    sampler: str = "ddim"
    nfe: int | None = None
    grid: str = "trailing"

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if self.grid not in GRIDS:
            raise ValueError(f"sampler grid must be one of {', '.join(GRIDS)}, got {self.grid!r}")
        if self.nfe is not None:
            if isinstance(self.nfe, bool) or not isinstance(self.nfe, int) or self.nfe < 1:
                raise ValueError(f"{self.sampler}: nfe must be a whole number >= 1, got {self.nfe!r}")
            if SAMPLERS[self.sampler][1](self.nfe) is None:
                raise ValueError(f"{self.sampler} cannot run at exactly {self.nfe} denoiser evaluations per image")

    @property
    def num_inference_steps(self) -> int | None:
        return None if self.nfe is None else SAMPLERS[self.sampler][1](self.nfe)

    def __str__(self) -> str:
        out = self.sampler + (f"@{self.nfe}" if self.nfe is not None else "")
        return out + (f":grid={self.grid}" if self.grid != "trailing" else "")

    @classmethod
    def from_args(cls, name: str, at: int | None, args: list[str]) -> Sampler:
        return cls(name, at, **parse_args(name, args, {"grid": ("grid", str)}))

    def build(self, config: dict) -> Any:
        from ..samplers.flow import is_flow_config

        if is_flow_config(dict(config)):  # the flow grid is the pipeline's own sigma schedule
            if self.sampler not in FLOW_SAMPLERS:
                raise CompositionError(self._flow_refusal())
            return _pndm(self.sampler)[0](dict(config), {})
        spacing = {"timestep_spacing": "trailing"} if self.grid == "trailing" else {}
        return SAMPLERS[self.sampler][0](dict(config), spacing)

    def _flow_refusal(self, pipe: Any = None) -> str:
        what = f"{type(pipe).__name__} is" if pipe is not None else "the scheduler config is"
        return (f"{self} is a variance-preserving sampler (it steps alphas_cumprod levels), but {what} flow-matching "
                f"(x = (1 - sigma) x0 + sigma eps, velocity output); on flow models use one of "
                f"{', '.join(FLOW_SAMPLERS)} (ddim there is FlowMatch-Euler)")

    def check(self, pipe: Any, family: PipelineFamily, recipe: Sequence[Method]) -> None:
        from ..samplers.flow import is_flow_scheduler

        flow = family.flow_matching or is_flow_scheduler(pipe.scheduler)
        if flow and self.sampler not in FLOW_SAMPLERS:
            raise CompositionError(self._flow_refusal(pipe))

    def apply(self, pipe: Any, ctx: ApplyContext) -> None:
        original = pipe.scheduler
        pipe.scheduler = self.build(original.config)

        def restore() -> None:
            pipe.scheduler = original

        ctx.on_remove(restore)


@dataclass(frozen=True)
class TimeShift(Method, name="time-shift", aliases=("ts",), slot="time-shift",
                stage=Stage.SCHEDULER_WRAP):
    """Time-Shift sampling around the recipe's scheduler: window `w` (None: by step count, the paper's Fig. 7),
    shifting only transitions whose nominal target time is above `cutoff`."""

    window: int | None = None
    cutoff: int = 300

    def __post_init__(self) -> None:
        for key in ("window", "cutoff"):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ValueError(f"time-shift {key} must be a whole number >= 0, got {v!r}")

    def args(self) -> list[str]:
        out = [f"window={self.window}"] if self.window is not None else []
        return out + ([f"cutoff={self.cutoff}"] if self.cutoff != 300 else [])

    @classmethod
    def from_args(cls, name: str, at: int | None, args: list[str]) -> TimeShift:
        kw = parse_args(name, args, {"window": ("window", int), "cutoff": ("cutoff", int)})
        if at is not None:
            raise ValueError("time-shift takes no @n; its step count comes from the sampler")
        return cls(**kw)

    def check(self, pipe: Any, family: PipelineFamily, recipe: Sequence[Method]) -> None:
        sampler = next((m for m in recipe if isinstance(m, Sampler)), None)
        if self.window is None and (sampler is None or sampler.num_inference_steps is None):
            raise CompositionError(f"{self} needs the step count to pick its window: add a sampler with @nfe "
                                   "(e.g. ddim@10 + time-shift) or give window=")
        base = sampler.build(pipe.scheduler.config) if sampler is not None else pipe.scheduler
        if not supports_time_shift(base):
            from ..core.schedulers import TIME_SHIFT_BASES

            what = str(sampler) if sampler is not None else f"the pipeline's {class_name(base)}"
            raise CompositionError(f"{self} cannot be combined with {what}: Time-Shift wraps only "
                                   f"{', '.join(TIME_SHIFT_BASES)}")

    def apply(self, pipe: Any, ctx: ApplyContext) -> None:
        from ..samplers import TimeShiftScheduler
        from ..samplers.bench import ts_params

        sampler = ctx.find(Sampler)
        params = ts_params(sampler.num_inference_steps) if self.window is None else {"window": self.window}
        params["cutoff"] = self.cutoff
        original = pipe.scheduler
        pipe.scheduler = TimeShiftScheduler.wrap(original, **params)

        def restore() -> None:
            pipe.scheduler = original

        ctx.on_remove(restore)
