"""One-step distillation: reflow (rectified flow) then distillation, InstaFlow-style, with a LoRA guidance option.

Liu et al. 2022, "Flow Straight and Fast" (arXiv 2209.03003); Liu et al. 2023, "InstaFlow" (arXiv 2309.06380).
See README.md in this folder. Names are imported lazily, so `diffaccel --help` does not load diffusers.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "RectifiedFlowPipeline": "pipeline",
    "RectifiedFlowEulerScheduler": "pipeline",
    "PairWriter": "pairs",
    "PairDataset": "pairs",
    "PairsError": "pairs",
    "TeacherSampler": "teachers",
    "SDPipelineTeacher": "teachers",
    "RectifiedFlowEulerTeacher": "teachers",
    "make_teacher": "teachers",
    "rf_loss": "objectives",
    "rf_interpolate": "objectives",
    "rf_time_to_unet_timestep": "objectives",
    "one_step_distill_loss": "objectives",
    "guidance_distill_loss": "objectives",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
