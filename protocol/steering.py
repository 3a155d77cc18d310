"""Call-level methods: `FKSteering` and `BestOfN` change what a generation returns, so they run through
``handle(...)`` (same arguments as the pipeline) on top of whatever sampler, cache and parallel hooks the recipe
put on the pipeline.

* FK steering (Singhal et al. 2025, Alg. 1): k particles per prompt, resampled by reward-based potentials; returns
  the best particle per prompt (``select="all"``: the `SteeringOutput` with every particle). With a feature cache
  in the recipe, each resampling copies the particles' cache rows with the particles (`core.hooks.reorder_rows`), so
  every particle keeps the cache of its own trajectory.
* Best-of-N (Ma et al. 2025, §3.2, random search): N deterministic samples per prompt, the reward's best kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..core.families import PipelineFamily
from .base import AccelerationHandle, CompositionError, Method, Stage, optional_int, parse_args
from .samplers import Sampler, TimeShift

#: reward names usable in recipes -> factory
REWARDS = {
    "classifier": lambda: _reward("ClassifierReward"),
    "clip": lambda: _reward("CLIPReward"),
    "compressibility": lambda: _reward("CompressibilityReward"),
}


def _reward(cls_name: str) -> Any:
    from ..samplers import steering

    return getattr(steering, cls_name)()


def resolve_reward(reward: Any) -> Any:
    if isinstance(reward, str):
        if reward not in REWARDS:
            raise ValueError(f"unknown reward {reward!r}; choose one of {', '.join(REWARDS)} or pass a Reward")
        return REWARDS[reward]()
    return reward


def _conditioning(family: PipelineFamily, args: tuple, kwargs: dict) -> tuple[list, dict]:
    """The prompts / class labels of a pipeline-style call, and the remaining keyword arguments."""
    kwargs = dict(kwargs)
    key = "class_labels" if family.conditioning_kind == "class" else "prompt"
    cond = args[0] if args else kwargs.pop(key, None)
    if cond is None:
        raise ValueError(f"{type(family.pipe).__name__} needs `{key}`")
    return ([cond] if isinstance(cond, (str, int)) else list(cond)), kwargs


class _Steering(Method, slot="steering", stage=Stage.CALL):

    def apply(self, pipe: Any, ctx: Any) -> None:
        """Nothing to install: the method runs when the handle is called."""

    #: families whose components the steering loops drive (`core.families`)
    FAMILIES = ("sd", "dit", "flux", "sd3")

    def check(self, pipe: Any, family: PipelineFamily, recipe: Sequence[Method]) -> None:
        if family.name not in self.FAMILIES:
            raise CompositionError(f"{self} drives Stable Diffusion, DiT, Flux and SD3 pipelines; "
                                   f"{type(pipe).__name__} is the {family.name!r} family")


@dataclass(frozen=True)
class FKSteering(_Steering, name="fk", aliases=("fk-steering",)):
    """FK steering with `k` particles per prompt; resampling at steps start, start+every, ... <= end and the
    last step; DDIM-style samplers run with `eta` (FK needs fresh noise). On Flux/SD3 the pipeline's FlowMatch-Euler
    runs as `FlowMatchSDEScheduler` with that `eta` (its stochastic counterpart with the ODE's marginals)."""

    k: int = 4
    potential: str = "max"
    every: int = 20
    start: int = 20
    end: int | None = 80
    lmbda: float = 10.0
    eta: float = 1.0
    reward: Any = "classifier"
    select: str = "best"

    def fk_config(self) -> Any:
        from ..samplers.steering import FKConfig

        return FKConfig(num_particles=self.k, potential=self.potential, lmbda=self.lmbda, resample_every=self.every,
                        resample_start=self.start, resample_end=self.end)

    def __post_init__(self) -> None:
        self.fk_config()  # validates
        if self.select not in ("best", "all"):
            raise ValueError(f"fk select must be 'best' (one image per prompt) or 'all' (every particle), "
                             f"got {self.select!r}")
        if not isinstance(self.reward, str) and not callable(self.reward):
            raise ValueError(f"fk reward must be a name ({', '.join(REWARDS)}) or a Reward, got {self.reward!r}")

    def args(self) -> list[str]:
        out = [str(self.k), f"potential={self.potential}", f"every={self.every}", f"start={self.start}",
               f"end={'none' if self.end is None else self.end}"]
        out += [f"lambda={self.lmbda:g}"] if self.lmbda != 10.0 else []
        out += [f"eta={self.eta:g}"] if self.eta != 1.0 else []
        out += [f"reward={self.reward if isinstance(self.reward, str) else 'custom'}"]
        return out + (["select=all"] if self.select == "all" else [])

    @classmethod
    def from_args(cls, name: str, at: int | None, args: list[str]) -> FKSteering:
        keys = {"every": ("every", int), "start": ("start", int), "end": ("end", optional_int),
                "lambda": ("lmbda", float), "eta": ("eta", float), "potential": ("potential", str),
                "reward": ("reward", str), "select": ("select", str)}
        return cls(**parse_args(name, args, keys, positional=[("k", int)]))

    def check(self, pipe: Any, family: PipelineFamily, recipe: Sequence[Method]) -> None:
        from ..samplers.flow_sde import stochastic_counterpart
        from ..samplers.steering import check_sampler

        super().check(pipe, family, recipe)
        sampler = next((m for m in recipe if isinstance(m, Sampler)), None)
        scheduler = sampler.build(pipe.scheduler.config) if sampler is not None else pipe.scheduler
        if family.flow_matching:
            scheduler = stochastic_counterpart(scheduler)
        try:
            check_sampler(scheduler, self.eta, self.fk_config(), flow=family.flow_matching)
        except ValueError as exc:
            what = str(sampler) if sampler is not None else f"the pipeline's {type(scheduler).__name__}"
            raise CompositionError(f"{self} cannot be combined with {what}: {exc}") from None
        if any(isinstance(m, TimeShift) for m in recipe) and sampler is None:
            raise CompositionError(f"{self} with time-shift needs an explicit stochastic sampler (e.g. ddim@10)")

    def run(self, handle: AccelerationHandle, *args: Any, **kwargs: Any) -> Any:
        from ..samplers.steering import FKSteering as Runner

        family = handle.family
        conds, kwargs = _conditioning(family, args, kwargs)
        runner = Runner(handle.pipe, resolve_reward(self.reward), self.fk_config())
        kwargs.setdefault("eta", self.eta)
        kwargs.pop("return_dict", None)
        gens = kwargs.get("generator")
        if isinstance(gens, (list, tuple)) and len(gens) == len(conds) and self.k > 1:
            # one generator per prompt (as for the plain pipeline): particle j of a prompt seeded k*seed + j
            kwargs["generator"] = [torch.Generator(g.device).manual_seed(g.initial_seed() * self.k + j)
                                   for g in gens for j in range(self.k)]
        if family.conditioning_kind == "class":
            out = runner(class_labels=conds, **kwargs)
        else:
            out = runner(conds, **kwargs)
        if self.select == "all":
            return out
        best = out.best()
        images = out.images
        picked = [images[int(i)] for i in best] if isinstance(images, list) else images[best.numpy()] \
            if not isinstance(images, torch.Tensor) else images[best]
        return SearchResults(picked, [out])


@dataclass(frozen=True)
class BestOfN(_Steering, name="best-of-n", aliases=("bon",)):
    """Best-of-N random search with a deterministic sampler (`eta` 0): N candidates per prompt, the best kept.
    Prompt i uses generator i of the call (one generator per prompt, as the steering benchmark)."""

    n: int = 4
    reward: Any = "classifier"
    eta: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"best-of-n needs n >= 1, got {self.n!r}")

    def args(self) -> list[str]:
        return [str(self.n), f"reward={self.reward if isinstance(self.reward, str) else 'custom'}"] + \
            ([f"eta={self.eta:g}"] if self.eta else [])

    @classmethod
    def from_args(cls, name: str, at: int | None, args: list[str]) -> BestOfN:
        keys = {"reward": ("reward", str), "eta": ("eta", float)}
        return cls(**parse_args(name, args, keys, positional=[("n", int)]))

    def run(self, handle: AccelerationHandle, *args: Any, **kwargs: Any) -> Any:
        from ..samplers.steering import best_of_n

        family = handle.family
        conds, kwargs = _conditioning(family, args, kwargs)
        gens = kwargs.pop("generator", None)
        gens = gens if isinstance(gens, (list, tuple)) else [gens] * len(conds)
        if len(gens) != len(conds):
            raise ValueError(f"best-of-n takes one generator per prompt; got {len(gens)} for {len(conds)} prompts")
        output_type = kwargs.pop("output_type", "pt")
        reward = resolve_reward(self.reward)
        # Flux / SD3: the size and T5 length of the call (the search's loop checks them; other keys stay ignored)
        sized = {k: kwargs[k] for k in ("height", "width", "max_sequence_length")
                 if family.flow_matching and kwargs.get(k) is not None}
        searches = [best_of_n(handle.pipe, c, reward, n=self.n, eta=self.eta, generator=g,
                              num_inference_steps=kwargs.get("num_inference_steps", 50),
                              guidance_scale=kwargs.get("guidance_scale"), **sized)
                    for c, g in zip(conds, gens, strict=True)]
        images = torch.cat([s.image for s in searches])
        if output_type == "np":
            images = images.cpu().permute(0, 2, 3, 1).float().numpy()
        return SearchResults(images, searches)


@dataclass
class SearchResults:
    """One image per prompt (best-of-N winners, or FK's best particle) and the search / steering records."""

    images: Any
    searches: list[Any]
