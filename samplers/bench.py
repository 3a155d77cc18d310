"""Sampler benchmark rows: each sampler configured to spend exactly a given number of model calls (NFE).

Used by `benchmarks/samplers.py` (the full FID-vs-NFE sweep) and registered as `diffaccel bench --suite samplers`
(`--steps` is the NFE there). Every scheduler uses the pipeline's training schedule with ``trailing`` spacing
(grid starts at t = 999 for every step count, the diffusers recommendation at low step counts).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler, UniPCMultistepScheduler

from .pndm import PseudoNumericalScheduler, transitions_for_nfe
from .time_shift import TimeShiftScheduler

SPACING = {"timestep_spacing": "trailing"}
#: conditioning and guidance per zoo model (digits-ddpm is unconditional)
MODELS: dict[str, dict[str, Any]] = {
    "digits-ddpm": {"prompts_or_labels": None, "call_kwargs": {}},
    "digits-sd": {"prompts_or_labels": list(range(10)), "call_kwargs": {"guidance_scale": 7.5}},
    "random-ddpm": {"prompts_or_labels": None, "call_kwargs": {}},  # smoke runs only: numbers are meaningless
}
DEFAULT_MODELS = ("digits-ddpm", "digits-sd")


def ts_params(transitions: int) -> dict[str, int]:
    """Time-Shift window by step count from the TS paper's Fig. 7 (w = 40, 30, 8, 2 for 10, 20, 50, 100 steps),
    cutoff 300 (the middle of the paper's sweep); not tuned on our models."""
    window = 40 if transitions <= 10 else 30 if transitions <= 20 else 8 if transitions <= 50 else 2
    return {"window": window, "cutoff": 300}


def _pndm(method: str, spacing: dict | None = None) -> Callable[[dict, int], tuple[Any, int] | None]:
    def build(config: dict, nfe: int):
        n = transitions_for_nfe(method, nfe)
        if n is None:
            return None
        sched = PseudoNumericalScheduler.from_config(config, method=method, **(SPACING if spacing is None else spacing))
        return sched, n

    return build


def kwargs_tolerant(cls: type) -> type:
    """`cls` with a `step` that drops pipeline kwargs it does not take (DDPMPipeline passes `generator`, which
    diffusers' UniPC and PNDM reject). Numerics are untouched."""

    def step(self, model_output, timestep, sample, return_dict: bool = True, **kwargs):
        return cls.step(self, model_output, timestep, sample, return_dict=return_dict)

    return type(cls.__name__, (cls,), {"step": step, "__module__": __name__})


def _diffusers(cls, calls_per_step_extra: int = 0, spacing: dict | None = None,
               **kw) -> Callable[[dict, int], tuple[Any, int] | None]:
    def build(config: dict, nfe: int):
        n = nfe - calls_per_step_extra
        return (cls.from_config(config, **(SPACING if spacing is None else spacing), **kw), n) if n >= 1 else None

    return build


def _ts(inner: Callable[[dict, int], tuple[Any, int] | None]) -> Callable[[dict, int], tuple[Any, int] | None]:
    def build(config: dict, nfe: int):
        got = inner(config, nfe)
        if got is None:
            return None
        base, n = got
        return TimeShiftScheduler.wrap(base, **ts_params(n)), n

    return build


#: name -> builder(pipeline scheduler config, NFE) -> (scheduler, num_inference_steps) or None if infeasible
SAMPLERS: dict[str, Callable[[dict, int], tuple[Any, int] | None]] = {
    "DDIM": _diffusers(DDIMScheduler),
    "DPM-Solver++(2M)": _diffusers(DPMSolverMultistepScheduler, algorithm_type="dpmsolver++", solver_order=2),
    "UniPC": _diffusers(kwargs_tolerant(UniPCMultistepScheduler)),
    "diffusers PNDM (PLMS)": _diffusers(kwargs_tolerant(PNDMScheduler), calls_per_step_extra=1,
                                        skip_prk_steps=True),
    "S-PNDM": _pndm("s-pndm"),
    "F-PNDM": _pndm("f-pndm"),
    # the model's own grid (leading + steps_offset, ends at t = 1): the last transition is tiny, which multistep
    # methods need on pixel models at low NFE (trailing ends with one huge step, where AB extrapolation blows up)
    "S-PNDM (leading)": _pndm("s-pndm", spacing={}),
    # the baselines on that same shipped grid, so the leading-grid S-PNDM row has a same-grid comparison
    "DDIM (leading)": _diffusers(DDIMScheduler, spacing={}),
    "DPM-Solver++(2M) (leading)": _diffusers(DPMSolverMultistepScheduler, spacing={}, algorithm_type="dpmsolver++",
                                             solver_order=2),
    "UniPC (leading)": _diffusers(kwargs_tolerant(UniPCMultistepScheduler), spacing={}),
    "TS-DDIM": _ts(_diffusers(DDIMScheduler)),
    "TS-S-PNDM": _ts(_pndm("s-pndm")),
    "TS-F-PNDM": _ts(_pndm("f-pndm")),
    "TS-DPM-Solver++(2M)": _ts(_diffusers(DPMSolverMultistepScheduler, algorithm_type="dpmsolver++",
                                          solver_order=2)),
}
BASELINES = ("DDIM", "DPM-Solver++(2M)", "UniPC", "DDIM (leading)", "DPM-Solver++(2M) (leading)",
             "UniPC (leading)")


def samplers_suite(nfe: int = 10, models: tuple[str, ...] = DEFAULT_MODELS) -> list:
    """`BenchConfig`s for every sampler that can run at exactly `nfe` model calls, on each model."""
    from ..evals import BenchConfig
    from ..zoo import load

    configs = []
    for model in models:
        for name, builder in SAMPLERS.items():

            def factory(model=model, builder=builder):
                pipe = load(model)
                pipe.scheduler, _ = builder(dict(pipe.scheduler.config), nfe)
                return pipe

            probe = builder(dict(PseudoNumericalScheduler().config), nfe)
            if probe is None:
                continue
            configs.append(BenchConfig(f"{model} {name} NFE{nfe}", factory,
                                       {"num_inference_steps": probe[1], **MODELS[model]["call_kwargs"]},
                                       MODELS[model]["prompts_or_labels"], requires=(model,)))
    return configs
