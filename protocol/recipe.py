"""Recipe strings: the one-line form of an acceleration, for the CLI, the demo, `bench` and benchmark records.

Grammar (whitespace around ``+`` is ignored; names are case-insensitive)::

    recipe  :=  "plain"  |  method ( "+" method )*
    method  :=  NAME [ "@" INT ] ( ":" arg )*
    arg     :=  VALUE  |  KEY "=" VALUE  |  FLAG

``@n`` is a sampler's NFE (denoiser evaluations per image). Methods and their arguments:

==================  =====================================================  ==========================================
name                arguments                                              example
==================  =====================================================  ==========================================
ddim, ddpm,         ``@nfe``, ``grid=trailing|model``                      ``s-pndm@10``, ``ddim@25:grid=model``
dpm++2m, unipc,
plms-diffusers,
s-pndm, f-pndm,
pie, prk,
plms-ldm, fon
time-shift (ts)     ``window=``, ``cutoff=``                               ``ddim@10 + time-shift``
ep                  key steps, ``parallel``, ``noise=off|a/tau``,          ``ep:uniform-3:parallel``
                    ``max-parallel=``
harmonica           plan name or file, ``force``                           ``harmonica:digits-dit-20-harmonica-b1``
fora                interval, ``steps=``, ``forecast=0|1|2``               ``ddim@20 + fora:2:forecast=1``
fbc                 threshold (diffusers FirstBlockCache)                  ``ddim@20 + fbc:0.1``
taylorseer          interval, ``warmup=`` (diffusers TaylorSeer)           ``ddim@20 + taylorseer:2``
magcache            threshold, ``steps=`` (diffusers MagCache; ratios      ``ddim@20 + magcache:0.25``
                    calibrated on apply)
fk                  k, ``potential= every= start= end= lambda= eta=``,     ``ddim@10 + fk:4:every=2:start=2:end=9``
                    ``reward=classifier|clip|compressibility``
best-of-n (bon)     n, ``reward=``, ``eta=``                               ``ddim@10 + best-of-n:4``
patch-parallel      mode (sync, displaced, pcpp), ``warmup= gn= pcpp=      ``patch-parallel:sync``
(pp)                cfg halo= timeout=``
one-step            student (zoo entry or folder)                          ``one-step:digits-sd-onestep``
==================  =====================================================  ==========================================

``str(method)`` writes the canonical form and ``parse_recipe(str(recipe)) == recipe`` for every recipe whose
arguments are recipe values (a custom reward object prints as ``reward=custom``, which does not parse back).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from .base import Method, Stage
from .caches import FORA, EncoderPropagation, FirstBlockCache, HarmoniCa, MagCache, TaylorSeer
from .models import OneStep, PatchParallel
from .samplers import SAMPLERS, Sampler, TimeShift
from .steering import BestOfN, FKSteering

METHOD_TYPES: tuple[type[Method], ...] = (TimeShift, EncoderPropagation, HarmoniCa, FORA, FirstBlockCache, TaylorSeer,
                                          MagCache, FKSteering, BestOfN, PatchParallel, OneStep)
#: recipe name -> method class (sampler names all map to `Sampler`)
REGISTRY: dict[str, type[Method]] = {name: Sampler for name in SAMPLERS}
for _cls in METHOD_TYPES:
    for _name in (_cls.name, *_cls.aliases):
        REGISTRY[_name] = _cls

_METHOD = re.compile(r"^(?P<name>[a-z0-9+\-]+?)(?:@(?P<at>\d+))?(?P<args>(?::[^:]*)*)$")


def parse_method(text: str) -> Method:
    """One method from its recipe form, e.g. ``"fora:2"``."""
    text = text.strip()
    m = _METHOD.match(text.lower()) if text else None
    if m is None:
        raise ValueError(f"cannot read method {text!r}; the form is name[@n][:arg...], e.g. s-pndm@10 or fora:2")
    name = m["name"]
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(sorted(REGISTRY))}")
    # arguments keep their case (file paths); the name and @n are case-insensitive
    args_text = text[len(text) - len(m["args"]):] if m["args"] else ""
    args = [a for a in args_text.split(":")[1:]]
    if any(not a for a in args):
        raise ValueError(f"empty argument in {text!r}")
    at = int(m["at"]) if m["at"] is not None else None
    return REGISTRY[name].from_args(name, at, args)


def parse_recipe(text: str) -> tuple[Method, ...]:
    """A recipe string (see the module docstring for the grammar) as method configs in application order."""
    if not isinstance(text, str):
        raise TypeError(f"a recipe is a string such as 's-pndm@10 + fora:2', got {type(text).__name__}")
    if text.strip().lower() in ("", "plain", "none"):
        return ()
    parts = _split(text)
    return tuple(sorted((parse_method(p) for p in parts), key=lambda m: m.stage))


def _split(text: str) -> list[str]:
    """Split on a ``+`` followed by a method name (a letter), so ``dpm++2m`` stays whole."""
    return [p.strip() for p in re.split(r"\s*\+\s*(?=[A-Za-z])", text.strip())]


def format_recipe(methods: Iterable[Method]) -> str:
    """The canonical string of a recipe (methods in application order); ``"plain"`` for none."""
    ordered = sorted(methods, key=lambda m: m.stage)
    return " + ".join(str(m) for m in ordered) or "plain"


__all__ = ["METHOD_TYPES", "REGISTRY", "Stage", "format_recipe", "parse_method", "parse_recipe"]
