"""The family layer: one adapter per pipeline family, and the one `find_denoiser`.

>>> fam = family_for(pipe)            # StableDiffusionFamily, DiTFamily, DDPMFamily, PixArtFamily, ...
>>> fam.name, fam.denoiser, fam.default_guidance
>>> pipe(**fam.call_kwargs("a handwritten digit seven", n=4, steps=10))

New families are one module each (as SDXL, SD3 and Flux are): subclass `PipelineFamily`, set its class attributes, and
register it with `register_family`. Every method (samplers, caches, steering, parallel, distillation, the demo, the
benchmarks) reaches pipelines only through this layer.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import PipelineFamily, step_kwargs
from .ddpm import DDPMFamily
from .dit import DiTFamily
from .flux import FluxFamily
from .pixart import PixArtFamily
from .rectified_flow import RectifiedFlowFamily
from .sd import StableDiffusionFamily
from .sd3 import StableDiffusion3Family
from .sdxl import StableDiffusionXLFamily

#: family name -> adapter class, in registration order
FAMILIES: dict[str, type[PipelineFamily]] = {}
#: attributes tried, in order, on objects no family claims
DENOISER_ATTRS = ("unet", "transformer", "prior")


def register_family(cls: type[PipelineFamily]) -> type[PipelineFamily]:
    """Add a family adapter (usable as a class decorator). Names must be unique."""
    if not cls.name or not cls.pipeline_classes:
        raise ValueError(f"{cls.__name__} must set `name` and `pipeline_classes`")
    if cls.name in FAMILIES and FAMILIES[cls.name] is not cls:
        raise ValueError(f"a family named {cls.name!r} is already registered ({FAMILIES[cls.name].__name__})")
    FAMILIES[cls.name] = cls
    return cls


for _cls in (StableDiffusionFamily, DiTFamily, DDPMFamily, PixArtFamily, RectifiedFlowFamily,
             StableDiffusionXLFamily, StableDiffusion3Family, FluxFamily):
    register_family(_cls)


def family_class(pipe: Any) -> type[PipelineFamily] | None:
    """The adapter class serving this pipeline (its class or a base class is listed by a family), else None."""
    names = [c.__name__ for c in type(pipe).__mro__]
    for name in names:  # most specific class first
        for cls in FAMILIES.values():
            if name in cls.pipeline_classes:
                return cls
    return None


def family_for(pipe: Any) -> PipelineFamily:
    """The adapter for `pipe`; a `TypeError` naming the supported pipelines otherwise."""
    cls = family_class(pipe)
    if cls is None:
        supported = ", ".join(n for c in FAMILIES.values() for n in c.pipeline_classes)
        raise TypeError(f"{type(pipe).__name__} is not a supported pipeline; supported: {supported}")
    return cls(pipe)


def find_denoiser(pipe_or_model: Any) -> torch.nn.Module:
    """The network a pipeline calls once per step (its family's denoiser); a bare module is returned as is."""
    if isinstance(pipe_or_model, torch.nn.Module):
        return pipe_or_model
    cls = family_class(pipe_or_model)
    attrs = (cls.denoiser_attr,) if cls is not None else DENOISER_ATTRS
    for name in attrs:
        module = getattr(pipe_or_model, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise TypeError(
        f"{type(pipe_or_model).__name__} has no denoising network: expected one of the attributes {attrs}"
    )


__all__ = [
    "DENOISER_ATTRS",
    "FAMILIES",
    "DDPMFamily",
    "DiTFamily",
    "FluxFamily",
    "PipelineFamily",
    "PixArtFamily",
    "RectifiedFlowFamily",
    "StableDiffusion3Family",
    "StableDiffusionFamily",
    "StableDiffusionXLFamily",
    "family_class",
    "family_for",
    "find_denoiser",
    "register_family",
    "step_kwargs",
]
