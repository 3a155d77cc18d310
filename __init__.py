"""diffaccel: drop-in accelerations for diffusers pipelines, each measured for speed and quality.

Subpackages load on first use (``diffaccel.zoo``, ``diffaccel.samplers``, ...), and the main entry points are
re-exported here, also lazily, so ``import diffaccel`` stays cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_SUBPACKAGES = ("core", "zoo", "samplers", "caching", "parallel", "distill", "evals", "app", "protocol")
_EXPORTS = {
    # core
    "count_nfe": "core", "make_generators": "core", "measure": "core", "to_uint8": "core",
    "DiffaccelError": "core", "InputError": "core", "WeightsError": "core",
    # zoo
    "load": "zoo",
    # the protocol: one way to apply, compose and remove every method
    "accelerate": "protocol", "parse_recipe": "protocol", "format_recipe": "protocol", "CompositionError": "protocol",
    "Sampler": "protocol", "TimeShift": "protocol", "EncoderPropagation": "protocol", "HarmoniCa": "protocol",
    "FORA": "protocol", "FKSteering": "protocol", "BestOfN": "protocol", "PatchParallel": "protocol",
    "OneStep": "protocol", "FirstBlockCache": "protocol", "TaylorSeer": "protocol", "MagCache": "protocol",
    # samplers
    "PseudoNumericalScheduler": "samplers", "TimeShiftScheduler": "samplers", "FKConfig": "samplers",
    "best_of_n": "samplers",
    # caching
    "EncoderPropagationConfig": "caching", "apply_encoder_propagation": "caching",
    "remove_encoder_propagation": "caching", "cached_call": "caching",
    # parallel
    "PatchParallelConfig": "parallel", "parallelize": "parallel",
    # evals
    "evaluate": "evals", "paired_fidelity": "evals",
}

__all__ = ["__version__", *_SUBPACKAGES, *_EXPORTS]


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'diffaccel' has no attribute {name!r}")
