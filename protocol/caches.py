"""Feature-cache methods: `EncoderPropagation` (UNets), `HarmoniCa` and `FORA` (DiT / PixArt / MMDiT
transformers), and diffusers' own caches as baselines (`FirstBlockCache`, `TaylorSeer`, `MagCache`).

All three are hooks on the stock denoiser (`caching/`); the protocol adds what `cached_call` used to do around each
call: every generation starts with empty caches (the `CallEvents` reset at ``set_timesteps``), and encoder
propagation's prior noise injection (Li et al., NeurIPS 2024, §3.4) runs as a step-end handler, so a plain
``pipe(...)`` equals ``cached_call(pipe, ...)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..core.families import PipelineFamily, find_denoiser
from .base import ApplyContext, CompositionError, Method, Stage, parse_args
from .samplers import Sampler


def _flag_args(name: str, args: list[str], flags: Sequence[str], keys: Sequence[str]) -> tuple[list[str], dict]:
    """Split recipe arguments into positional values, flags present and key=value pairs."""
    positional, kv = [], {}
    for a in args:
        key, eq, value = a.partition("=")
        if eq:
            if key not in keys:
                raise ValueError(f"{name}: unknown argument {key!r}; expected one of {', '.join(keys)}")
            kv[key] = value
        elif a in flags:
            kv[a] = True
        else:
            positional.append(a)
    return positional, kv


@dataclass(frozen=True)
class EncoderPropagation(Method, name="ep", aliases=("encoder-propagation",), slot="cache", stage=Stage.CACHE,
                         uses_events=True):
    """Encoder propagation: the UNet encoder runs at key steps only (`caching/encoder_propagation.py`).

    key_steps: a schedule name (`sd50`, `sd50-scaled`, `uniform-<k>`, `all`) or explicit steps; parallel: decode
    the non-key steps after a key step in one batch; prior_noise: ``(alpha, tau_frac)`` of prior noise injection,
    None for off (the paper's default is (0.003, 0.5))."""

    key_steps: str | tuple[int, ...] = "sd50-scaled"
    parallel: bool = False
    prior_noise: tuple[float, float] | None = (0.003, 0.5)
    max_parallel: int = 16

    def __post_init__(self) -> None:
        if isinstance(self.key_steps, list):
            object.__setattr__(self, "key_steps", tuple(self.key_steps))
        if self.prior_noise is not None:
            object.__setattr__(self, "prior_noise", tuple(float(v) for v in self.prior_noise))
        self.hook_config()  # validates every field

    def hook_config(self) -> Any:
        from ..caching import EncoderPropagationConfig

        steps = list(self.key_steps) if isinstance(self.key_steps, tuple) else self.key_steps
        noise = self.prior_noise
        if noise is not None:
            from ..caching import NoiseInjection

            NoiseInjection(*noise)  # validates alpha and tau_frac
        return EncoderPropagationConfig(steps, parallel=self.parallel, max_parallel=self.max_parallel,
                                        noise_injection=None)

    def args(self) -> list[str]:
        steps = self.key_steps if isinstance(self.key_steps, str) else ",".join(map(str, self.key_steps))
        out = [steps] + (["parallel"] if self.parallel else [])
        if self.prior_noise is None:
            out.append("noise=off")
        elif self.prior_noise != (0.003, 0.5):
            out.append(f"noise={self.prior_noise[0]:g}/{self.prior_noise[1]:g}")
        return out + ([f"max-parallel={self.max_parallel}"] if self.max_parallel != 16 else [])

    @classmethod
    def from_args(cls, name: str, at: int | None, args: list[str]) -> EncoderPropagation:
        pos, kv = _flag_args(name, args, ("parallel",), ("noise", "max-parallel"))
        if at is not None or len(pos) > 1:
            raise ValueError(f"{name} takes one key-step schedule (e.g. ep:uniform-3:parallel), got {args}")
        kw: dict[str, Any] = {"parallel": bool(kv.get("parallel", False))}
        if pos:
            kw["key_steps"] = tuple(int(v) for v in pos[0].split(",")) if pos[0][:1].isdigit() else pos[0]
        if "noise" in kv:
            if kv["noise"] == "off":
                kw["prior_noise"] = None
            else:
                alpha, _, tau = kv["noise"].partition("/")
                kw["prior_noise"] = (float(alpha), float(tau or 0.5))
        if "max-parallel" in kv:
            kw["max_parallel"] = int(kv["max-parallel"])
        return cls(**kw)

    def check(self, pipe: Any, family: PipelineFamily, recipe: Sequence[Method]) -> None:
        from diffusers import UNet2DConditionModel, UNet2DModel

        denoiser = find_denoiser(pipe)
        if not isinstance(denoiser, (UNet2DModel, UNet2DConditionModel)):
            raise CompositionError(f"{self} caches a UNet encoder, but {type(pipe).__name__}'s denoiser is "
                                   f"{type(denoiser).__name__}; use harmonica or fora for transformers")

    def apply(self, pipe: Any, ctx: ApplyContext) -> None:
        from ..caching import apply_encoder_propagation, remove_encoder_propagation
        from ..caching.encoder_propagation import PriorNoiseInjection, _state

        apply_encoder_propagation(pipe, self.hook_config())
        ctx.on_remove(lambda: remove_encoder_propagation(pipe))
        if self.prior_noise is None or self.prior_noise[0] == 0:
            return
        alpha, tau = self.prior_noise
        events, state = ctx.events, _state(pipe)

        def inject(prev: Any, timestep: Any, index: int) -> Any:
            if index == 0:  # a new generation: z_T is the first step's input (already times init_noise_sigma)
                state.last_injection = PriorNoiseInjection(events.first_sample, alpha, tau, scaled=True)
            return state.last_injection.inject(events, index, timestep, prev)

        events.step_end.append(inject)


def _distinct_steps(pipe: Any, sampler: Sampler | None, steps: int | None) -> int | None:
    """Denoiser steps a plan needs: distinct timesteps of the recipe's scheduler at its step count (set as the
    pipeline sets them: FluxPipeline's FlowMatch-Euler needs the resolution shift `mu`)."""
    from ..core.families import family_for
    from ..core.hooks import dedupe_consecutive

    n = steps if steps is not None else (sampler.num_inference_steps if sampler is not None else None)
    if n is None:
        return None
    scheduler = pipe.scheduler
    family_for(pipe).set_timesteps(scheduler, n)
    return len(dedupe_consecutive([float(t) for t in scheduler.timesteps]))


class _TransformerCache(Method, slot="cache", stage=Stage.CACHE, uses_events=True):

    def check(self, pipe: Any, family: PipelineFamily, recipe: Sequence[Method]) -> None:
        from ..caching.harmonica import unit_modules

        denoiser = find_denoiser(pipe)
        try:
            unit_modules(denoiser)
        except (TypeError, ValueError, AttributeError) as exc:
            raise CompositionError(f"{self} caches transformer blocks, but {type(pipe).__name__}'s denoiser is "
                                   f"{type(denoiser).__name__} ({exc}); use ep for UNets") from None

    def attach(self, pipe: Any, ctx: ApplyContext, plan: Any) -> None:
        from ..caching import apply_cache_plan, remove_cache_plan

        apply_cache_plan(pipe, plan, force=getattr(self, "force", False))
        ctx.on_remove(lambda: remove_cache_plan(pipe))
        ctx.notes.append(f"{self}: cache-usage ratio {plan.usage_ratio:.0%}")


@dataclass(frozen=True)
class HarmoniCa(_TransformerCache, name="harmonica", aliases=("cache-plan",)):
    """A HarmoniCa cache plan (Huang et al., ICML 2025): a shipped plan's name or a plan file
    (`caching/plans/`). `force` skips the plan's step-count and scheduler checks."""

    plan: str = "digits-dit-20-harmonica-b1"
    force: bool = False

    def args(self) -> list[str]:
        return [self.plan] + (["force"] if self.force else [])

    @classmethod
    def from_args(cls, name: str, at: int | None, args: list[str]) -> HarmoniCa:
        pos, kv = _flag_args(name, args, ("force",), ())
        if at is not None or len(pos) != 1:
            raise ValueError(f"{name} takes one plan name or file (e.g. harmonica:digits-dit-20-harmonica-b1)")
        return cls(pos[0], bool(kv.get("force", False)))

    def load(self) -> Any:
        from ..caching import CachePlan

        return CachePlan.load(self.plan)

    def check(self, pipe: Any, family: PipelineFamily, recipe: Sequence[Method]) -> None:
        super().check(pipe, family, recipe)
        try:
            self.load()
        except (FileNotFoundError, ValueError, OSError) as exc:
            raise CompositionError(f"{self}: {exc}") from None

    def apply(self, pipe: Any, ctx: ApplyContext) -> None:
        self.attach(pipe, ctx, self.load())


@dataclass(frozen=True)
class FORA(_TransformerCache, name="fora"):
    """FORA (Selvaraju et al. 2024): every block computed every `interval`-th step, reused in between. The plan's
    step count comes from the recipe's sampler, or `steps`. `forecast=1` (2) hands out the order-1 (order-2) forecast
    of the reused outputs instead of the last ones (see `caching.CachePlan`)."""

    interval: int = 2
    steps: int | None = None
    forecast: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.interval, bool) or not isinstance(self.interval, int) or self.interval < 1:
            raise ValueError(f"fora interval must be a whole number >= 1, got {self.interval!r}")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise ValueError(f"fora steps must be a whole number >= 1, got {self.steps!r}")
        if self.forecast not in (0, 1, 2):
            raise ValueError(f"fora forecast is 0, 1 or 2, got {self.forecast!r}")

    def args(self) -> list[str]:
        return [str(self.interval)] + ([f"steps={self.steps}"] if self.steps is not None else []) \
            + ([f"forecast={self.forecast}"] if self.forecast else [])

    @classmethod
    def from_args(cls, name: str, at: int | None, args: list[str]) -> FORA:
        if at is not None:
            raise ValueError(f"{name} takes no @n; give the interval as fora:2")
        return cls(**parse_args(name, args, {"steps": ("steps", int), "forecast": ("forecast", int)},
                                positional=[("interval", int)]))

    def check(self, pipe: Any, family: PipelineFamily, recipe: Sequence[Method]) -> None:
        super().check(pipe, family, recipe)
        sampler = next((m for m in recipe if isinstance(m, Sampler)), None)
        if self.steps is None and (sampler is None or sampler.num_inference_steps is None):
            raise CompositionError(f"{self} needs the step count: add a sampler with @nfe (e.g. ddim@20 + fora:2) "
                                   "or give steps=")

    def apply(self, pipe: Any, ctx: ApplyContext) -> None:
        from ..caching import fora_plan
        from ..caching.harmonica import unit_modules

        n = _distinct_steps(pipe, ctx.find(Sampler), self.steps)
        units = len(unit_modules(find_denoiser(pipe)))
        self.attach(pipe, ctx, fora_plan(n, units, self.interval, model=pipe, forecast=self.forecast))


class _DiffusersCache(Method, slot="cache", stage=Stage.CACHE, uses_events=True):
    """One of diffusers' own caches through `caching.diffusers_caches` (which provides the cache context that
    `DiTPipeline` / `PixArtAlphaPipeline` do not open): a baseline to compare diffaccel's caches against."""

    def check(self, pipe: Any, family: PipelineFamily, recipe: Sequence[Method]) -> None:
        denoiser = find_denoiser(pipe)
        blocks = getattr(denoiser, "transformer_blocks", None)
        if blocks is None or len(blocks) == 0:
            raise CompositionError(f"{self} hooks transformer blocks, but {type(pipe).__name__}'s denoiser is "
                                   f"{type(denoiser).__name__}; use ep for UNets")

    def config(self, pipe: Any, ctx: ApplyContext) -> Any:
        raise NotImplementedError

    def apply(self, pipe: Any, ctx: ApplyContext) -> None:
        from ..caching.diffusers_caches import apply_diffusers_cache, remove_diffusers_cache

        apply_diffusers_cache(pipe, self.config(pipe, ctx))
        ctx.on_remove(lambda: remove_diffusers_cache(pipe))


def _unit_patterns(pipe: Any) -> list[str] | None:
    """TaylorSeer's module patterns on diffaccel's cache units (diffusers' defaults match Flux / SD3 names only)."""
    import re

    from diffusers.models.cache_utils import CacheMixin

    from ..caching.harmonica import unit_modules

    denoiser = find_denoiser(pipe)
    if isinstance(denoiser, CacheMixin):
        return None  # diffusers' own patterns are written for these models
    try:
        names = [n for n, _ in unit_modules(denoiser)]
    except (TypeError, ValueError):
        return None
    return sorted({re.escape(re.sub(r"\.\d+\.", ".@.", n)).replace("@", r"\d+") for n in names})


@dataclass(frozen=True)
class FirstBlockCache(_DiffusersCache, name="fbc", aliases=("first-block-cache",)):
    """diffusers' FirstBlockCache: the later blocks are skipped while the first block's residual changes by less
    than `threshold` (relative L1) since the last computed step."""

    threshold: float = 0.1

    def args(self) -> list[str]:
        return [f"{self.threshold:g}"]

    @classmethod
    def from_args(cls, name: str, at: int | None, args: list[str]) -> FirstBlockCache:
        return cls(**parse_args(name, args, {}, positional=[("threshold", float)]))

    def config(self, pipe: Any, ctx: ApplyContext) -> Any:
        from diffusers import FirstBlockCacheConfig

        return FirstBlockCacheConfig(threshold=self.threshold)


@dataclass(frozen=True)
class TaylorSeer(_DiffusersCache, name="taylorseer"):
    """diffusers' TaylorSeer (Liu et al. 2025): units computed every `interval`-th step after `warmup` full steps,
    forecast by a Taylor expansion in between; on DiT / PixArt the units are diffaccel's cache units."""

    interval: int = 2
    warmup: int = 1

    def args(self) -> list[str]:
        return [str(self.interval)] + ([f"warmup={self.warmup}"] if self.warmup != 1 else [])

    @classmethod
    def from_args(cls, name: str, at: int | None, args: list[str]) -> TaylorSeer:
        return cls(**parse_args(name, args, {"warmup": ("warmup", int)}, positional=[("interval", int)]))

    def config(self, pipe: Any, ctx: ApplyContext) -> Any:
        from diffusers import TaylorSeerCacheConfig

        return TaylorSeerCacheConfig(cache_interval=self.interval, disable_cache_before_step=self.warmup,
                                     cache_identifiers=_unit_patterns(pipe))


@dataclass(frozen=True)
class MagCache(_DiffusersCache, name="magcache"):
    """diffusers' MagCache (Ma et al. 2025): steps are skipped while the accumulated magnitude-ratio error stays
    under `threshold`. Its per-step ratios are calibrated when the recipe is applied, by one generation of one
    image (seed 10000) at the recipe's step count, as diffusers documents."""

    threshold: float = 0.1
    steps: int | None = None

    def args(self) -> list[str]:
        return [f"{self.threshold:g}"] + ([f"steps={self.steps}"] if self.steps is not None else [])

    @classmethod
    def from_args(cls, name: str, at: int | None, args: list[str]) -> MagCache:
        return cls(**parse_args(name, args, {"steps": ("steps", int)}, positional=[("threshold", float)]))

    def check(self, pipe: Any, family: PipelineFamily, recipe: Sequence[Method]) -> None:
        super().check(pipe, family, recipe)
        sampler = next((m for m in recipe if isinstance(m, Sampler)), None)
        if self.steps is None and (sampler is None or sampler.num_inference_steps is None):
            raise CompositionError(f"{self} calibrates for a step count: add a sampler with @nfe "
                                   "(e.g. ddim@20 + magcache:0.1) or give steps=")

    def config(self, pipe: Any, ctx: ApplyContext) -> Any:
        from diffusers import MagCacheConfig

        from ..caching.diffusers_caches import calibrate_mag_ratios
        from ..core import make_generators
        from ..core.families import family_for

        sampler = ctx.find(Sampler)
        steps = self.steps if self.steps is not None else sampler.num_inference_steps
        family = family_for(pipe)
        cond = {"class": 0, "text": "a photo"}.get(family.conditioning_kind)
        kw = family.call_kwargs(cond, 1, steps)
        kw.pop("num_inference_steps")
        ratios = calibrate_mag_ratios(pipe, steps, generator=make_generators(10_000, 1), **kw)
        return MagCacheConfig(threshold=self.threshold, num_inference_steps=steps, mag_ratios=ratios)
