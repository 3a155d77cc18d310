"""One acceleration protocol: every method is a frozen config applied by `accelerate` and removed by its handle.

>>> handle = diffaccel.accelerate(pipe, Sampler("s-pndm", nfe=10), EncoderPropagation("uniform-3"))
>>> images = pipe(prompts, num_inference_steps=10).images      # the accelerated pipeline
>>> handle.remove()                                              # back to the pipeline as loaded
>>> with diffaccel.accelerate(pipe, "ddim@20 + harmonica:digits-dit-20-harmonica-b1") as h:
...     out = h(class_labels=[3, 7])

See `protocol.recipe` for the recipe grammar and `protocol.base` for the order, refusals and removal.
"""

from .base import AccelerationHandle, CompositionError, Method, Stage, accelerate, check
from .caches import FORA, EncoderPropagation, FirstBlockCache, HarmoniCa, MagCache, TaylorSeer
from .events import CallEvents
from .models import OneStep, PatchParallel
from .recipe import REGISTRY, format_recipe, parse_method, parse_recipe
from .samplers import SAMPLERS, Sampler, TimeShift
from .steering import BestOfN, FKSteering, SearchResults

__all__ = [
    "FORA",
    "REGISTRY",
    "SAMPLERS",
    "AccelerationHandle",
    "BestOfN",
    "CallEvents",
    "CompositionError",
    "EncoderPropagation",
    "FKSteering",
    "FirstBlockCache",
    "HarmoniCa",
    "MagCache",
    "Method",
    "OneStep",
    "PatchParallel",
    "Sampler",
    "SearchResults",
    "Stage",
    "TaylorSeer",
    "TimeShift",
    "accelerate",
    "check",
    "format_recipe",
    "parse_method",
    "parse_recipe",
]
