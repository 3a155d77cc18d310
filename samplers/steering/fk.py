"""Feynman–Kac (FK) steering of diffusion samplers with particles and resampling.

Singhal et al. 2025, "A General Framework for Inference-time Scaling and Steering of Diffusion Models", Algorithm 1:
k particles per prompt follow the model's own stochastic transitions; at resampling events each particle gets a
potential G_j built from the reward of its predicted clean sample x̂0, and particles are re-drawn in proportion to
their weights. With the product condition ``Π_j G_j = exp(λ·r(x0))`` the weighted particles target
``p(x0 | c)·exp(λ·r(x0, c))`` (eq. 3).

Two drivers share `ParticleSystem` (weights) and the rewards:

* `StableDiffusionPipeline` runs *stock*: particles are its ``num_images_per_prompt`` batch, an
  ``X0Recorder`` scheduler proxy keeps the step's ``pred_original_sample`` and ``callback_on_step_end`` scores it and
  permutes ``latents`` within each prompt's block.
* `DiTPipeline` has no step callback and does not pass ``eta``/``generator`` to its scheduler, so it runs through
  `sample_fk`, our k-diffusion-style loop over the pipeline's own components (`core.families.DiTFamily`).
* `FluxPipeline` and `StableDiffusion3Pipeline` (flow matching) run through `sample_fk` too, on
  `FlowMatchSDEScheduler`: the pipeline's FlowMatch-Euler becomes its eta family on the same sigma grid (the call's
  `eta`, 1 by default: ancestral steps with the probability-flow ODE's marginals; `samplers/flow_sde.py`), as
  DDIM's `eta` makes SD's DDIM stochastic. Resampling reorders every per-particle conditioning row with the
  particles (`PipelineFamily.reorder_condition`).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ...core import count_nfe
from ...core.errors import InputError
from ...core.families import DiTFamily, PipelineFamily, StableDiffusionFamily, family_for, step_kwargs
from ...core.hooks import reorder_rows
from ...core.schedulers import class_name, is_stochastic, keeps_history
from ..flow import is_flow_scheduler, require_vp
from ..flow_sde import check_eta, stochastic_counterpart
from ..loop import sample
from .potentials import INTERMEDIATE_POTENTIALS, POTENTIALS, ParticleSystem, Potential, resampling_events
from .resampling import RESAMPLERS, Resampler, flat_indices, normalize_log_weights
from .rewards import Reward, as_reward, score

_RESAMPLE_SEED_OFFSET = 0x5EED  # resampling stream derived from the diffusion seed without drawing from it


@dataclass
class FKConfig:
    """FK steering settings; defaults are the paper's image setting with a textbook SMC weighting.

    The resampling schedule is ``{start, start+every, …, ≤ end} ∪ {T−1}`` (or `resample_steps`). `resample_start`,
    `resample_every` and `resample_end` are fractions of the T steps when given as floats (the default 0.2, 0.2,
    0.8 gives the paper's events 20, 40, 60, 80, 99 at T = 100, and 5, 10, 15, 20, 24 at T = 25) and step indices
    when given as ints (the convention of scikit-learn's ``test_size``).
    `nan_policy="raise"` rejects a reward that returns NaN; ``"drop"`` gives such particles zero weight.
    """

    num_particles: int = 4
    potential: Potential = "max"
    lmbda: float = 10.0
    resample_every: int | float = 0.2
    resample_start: int | float = 0.2
    resample_end: int | float | None = 0.8
    resample_steps: Sequence[int] | None = None
    adaptive: bool = False
    ess_threshold: float = 0.5
    resampler: Resampler = "multinomial"
    reward_floor: float | None = None
    compat: Literal["textbook", "reference"] = "textbook"
    allow_deterministic: bool = False
    resample_seed: int | None = None
    nan_policy: Literal["raise", "drop"] = "raise"

    def __post_init__(self) -> None:
        if int(self.num_particles) != self.num_particles or self.num_particles < 1:
            raise InputError(f"num_particles (k) must be an integer >= 1, got {self.num_particles}")
        if not self.lmbda >= 0:
            raise InputError(f"lmbda (λ) must be >= 0, got {self.lmbda}")
        if self.potential not in POTENTIALS:
            raise InputError(f"unknown potential {self.potential!r}; valid: {', '.join(POTENTIALS)}")
        if self.resampler not in RESAMPLERS:
            raise InputError(f"unknown resampler {self.resampler!r}; valid: {', '.join(RESAMPLERS)}")
        if not 0 < self.ess_threshold <= 1:
            raise InputError(f"ess_threshold must be in (0, 1], got {self.ess_threshold}")
        if self.compat not in ("textbook", "reference"):
            raise InputError(f"compat must be 'textbook' or 'reference', got {self.compat!r}")
        if self.nan_policy not in ("raise", "drop"):
            raise InputError(f"nan_policy must be 'raise' or 'drop', got {self.nan_policy!r}")
        for name, lowest in (("resample_start", 0), ("resample_every", 1), ("resample_end", 0)):
            v = getattr(self, name)
            if v is None and name == "resample_end":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise InputError(f"{name} must be an int (step index) or a float (fraction of the steps), got {v!r}")
            if isinstance(v, float) and not (0.0 < v <= 1.0 if name == "resample_every" else 0.0 <= v <= 1.0):
                raise InputError(f"{name} as a fraction of the steps must be in "
                                 f"{'(0, 1]' if name == 'resample_every' else '[0, 1]'}, got {v}")
            if isinstance(v, int) and v < lowest:
                raise InputError(f"{name} as a step index must be >= {lowest}, got {v}")

    def window(self, num_steps: int) -> tuple[int, int, int | None]:
        """(start, every, end) in step indices for a run of `num_steps` (fractions floored, then kept in range)."""
        last = max(0, num_steps - 1)

        def index(v: int | float | None) -> int | None:
            return min(last, int(v * num_steps)) if isinstance(v, float) else v

        every = self.resample_every
        every = max(1, int(every * num_steps)) if isinstance(every, float) else every
        return index(self.resample_start), every, index(self.resample_end)

    def events(self, num_steps: int) -> list[int]:
        start, every, end = self.window(num_steps)
        return resampling_events(num_steps, every, start, end, self.potential, self.resample_steps)


@dataclass
class SteeringOutput:
    """All k particles per prompt (prompt-major), with their final rewards, weights, ESS trace and compute counts."""

    images: Any
    latents: torch.Tensor
    rewards: torch.Tensor  # [B, k] reward of each returned particle
    log_weights: torch.Tensor  # [B, k] normalised; uniform when the final event resampled
    ancestry: torch.Tensor  # [E, B, k] ancestor indices (group-local) at each event
    ess: torch.Tensor  # [E, B] ESS before each event's resampling decision
    resampled: torch.Tensor  # [E, B] whether the group resampled at each event
    events: list[int]
    nfe: dict[str, int] = field(default_factory=dict)

    @property
    def weights(self) -> torch.Tensor:
        return self.log_weights.exp()

    def best(self) -> torch.Tensor:
        """Row index (into `images`) of each prompt's highest-reward particle: what the reference's evals report."""
        k = self.rewards.shape[1]
        return self.rewards.nan_to_num(float("-inf")).argmax(dim=1) + k * torch.arange(self.rewards.shape[0])

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Row index of one particle per prompt drawn by final weight."""
        k = self.rewards.shape[1]
        pick = torch.multinomial(self.log_weights.double().exp(), 1, generator=generator)[:, 0]
        return pick + k * torch.arange(self.rewards.shape[0])


# ------------------------------------------------------------------------------------------------- sampler guard
def check_sampler(scheduler, eta: float, config: FKConfig, flow: bool = False) -> None:
    """FK needs fresh noise after each resampling, else copies never diverge; and no per-row history.

    `flow`: the pipeline is flow-matching (its scheduler must be a flow scheduler, and vice versa)."""
    name = class_name(scheduler)
    if not flow:
        require_vp(scheduler, "FK steering")
    elif not is_flow_scheduler(scheduler):
        raise InputError(f"FK steering: the pipeline is flow-matching (x = (1 - sigma) x0 + sigma eps, velocity "
                         f"output) but its {name} steps variance-preserving levels (alphas_cumprod); use "
                         "FlowMatchSDEScheduler (or FlowMatchEulerDiscreteScheduler, which FK runs as it)")
    if config.num_particles == 1 or config.potential not in INTERMEDIATE_POTENTIALS:
        return
    if keeps_history(scheduler):
        raise InputError(f"{name} keeps per-row history that resampling would desynchronise; use DDPMScheduler, "
                         "DDIMScheduler (eta > 0) or EulerAncestralDiscreteScheduler")
    stochastic = is_stochastic(scheduler, eta)
    if stochastic is False and not config.allow_deterministic:
        fix = ("FlowMatchSDEScheduler with eta > 0" if flow else
               "a stochastic sampler (DDPM, DDIM with eta > 0, Euler-ancestral)")
        raise InputError(f"{name} (eta={eta}) is deterministic: resampled copies stay identical and FK degenerates to "
                         f"best-of-k. Use {fix} or pass allow_deterministic=True")
    if stochastic is None:
        warnings.warn(f"cannot tell whether {name} injects noise; FK needs a stochastic sampler", stacklevel=3)


# ---------------------------------------------------------------------------------------------------- x̂0 recorder
def predict_x0(scheduler, model_output: torch.Tensor, timestep, sample: torch.Tensor) -> torch.Tensor:
    """x̂0 from the model output for DDPM-type schedulers: ε, v or sample prediction."""
    require_vp(scheduler, "FK steering's x0 prediction")
    a = scheduler.alphas_cumprod.to(sample.device)[int(timestep)].to(sample.dtype)
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind == "epsilon":
        return (sample - (1 - a).sqrt() * model_output) / a.sqrt()
    if kind == "v_prediction":
        return a.sqrt() * sample - (1 - a).sqrt() * model_output
    if kind == "sample":
        return model_output
    raise InputError(f"cannot compute x̂0 for prediction_type={kind!r}")


class X0Recorder:
    """A transparent scheduler proxy that remembers the last step's ``pred_original_sample``."""

    def __init__(self, scheduler) -> None:
        self.__dict__["_inner"] = scheduler
        self.__dict__["x0"] = None
        inner_step = scheduler.step

        def step(model_output, timestep, sample, *args, return_dict: bool = True, **kwargs):
            out = inner_step(model_output, timestep, sample, *args, return_dict=True, **kwargs)
            x0 = getattr(out, "pred_original_sample", None)
            self.__dict__["x0"] = x0 if x0 is not None else predict_x0(scheduler, model_output, timestep, sample)
            return out if return_dict else out.to_tuple()

        step.__signature__ = inspect.signature(inner_step)  # the pipeline inspects it for eta / generator
        self.__dict__["step"] = step

    def __getattr__(self, name: str):
        return getattr(self.__dict__["_inner"], name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self.__dict__["_inner"], name, value)


# ------------------------------------------------------------------------------------------------ sampling loop
@torch.no_grad()
def sample_fk(eps_fn: Callable[..., torch.Tensor], x: torch.Tensor, scheduler, system: ParticleSystem,
              reward_fn: Callable[[torch.Tensor], torch.Tensor], events: Sequence[int],
              extra_args: dict | None = None, step_args: dict | None = None, score_final_sample: bool = True,
              callback: Callable[[dict], None] | None = None, family: PipelineFamily | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """FK steering (Singhal et al. 2025, Alg. 1) over a diffusers scheduler; rows are prompt-major ``B·k`` blocks.

    `eps_fn(x, t, **extra_args)` is the model output the scheduler expects; `reward_fn(z)` scores latents (or states)
    ``z``. Events score the parent's x̂0 (free: same model call); the final event scores the returned sample itself
    (textbook, so the product condition holds exactly) unless `score_final_sample=False` (reference timing).
    Runs on `samplers.loop.sample`; `callback` gets its keys plus ``rewards`` and ``ancestors``. With `family`, each
    resampling also reorders the per-particle rows of `extra_args` (`family.reorder_condition`, in place). Returns
    the final particles and their rewards ``[B·k]``.
    """
    events, last = set(events), len(scheduler.timesteps) - 1
    state = {"rewards": torch.zeros(x.shape[0])}
    extra_args = {} if extra_args is None else extra_args

    def resample(info: dict) -> torch.Tensor:
        i, x_new, ancestors = info["i"], info["x"], None
        if i in events:
            denoised = info["denoised"]
            target = x_new if (i == last and score_final_sample) or denoised is None else denoised
            rewards = reward_fn(target)
            ancestors = flat_indices(system.event(rewards, final=i == last))
            x_new, state["rewards"] = x_new[ancestors.to(x_new.device)], rewards[ancestors]
            if family is not None:
                family.reorder_condition(extra_args, ancestors)
        if callback is not None:
            callback({**info, "x": x_new, "rewards": state["rewards"], "ancestors": ancestors})
        return x_new

    x = sample(eps_fn, x, scheduler.timesteps, extra_args, resample, scheduler=scheduler, step_args=step_args)
    return x, state["rewards"]


# ------------------------------------------------------------------------------------------------------ FKSteering
class FKSteering:
    """Call like the pipeline; returns a `SteeringOutput` with all ``B·k`` particles (prompt-major).

    >>> fk = FKSteering(pipe, ClassifierReward(), FKConfig(num_particles=4, resample_start=5, resample_every=5,
    ...                                                        resample_end=20))
    >>> out = fk(["a handwritten digit seven"], num_inference_steps=25, generator=make_generator(0))
    >>> best = out.images[int(out.best()[0])]
    """

    def __init__(self, pipe, reward: Reward | Callable, config: FKConfig | None = None) -> None:
        self.pipe = pipe
        self.reward = as_reward(reward)
        self.config = config or FKConfig()
        self.family = family_for(pipe)
        self.counts = {"vae_decodes": 0, "reward_calls": 0, "reward_items": 0}

    # -- scoring -----------------------------------------------------------------------------------------------
    def _score(self, latents: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        inputs = latents
        if self.reward.input_kind != "latent":
            inputs = self.family.decode(latents)
            self.counts["vae_decodes"] += len(latents)
        self.counts["reward_calls"] += 1
        self.counts["reward_items"] += len(latents)
        return score(self.reward, inputs, prompts, allow_nonfinite=self.config.nan_policy == "drop")

    def _generator(self, generator) -> torch.Generator:
        seed = self.config.resample_seed
        if seed is None and generator is not None:
            g = generator[0] if isinstance(generator, (list, tuple)) else generator
            seed = g.initial_seed() + _RESAMPLE_SEED_OFFSET
        gen = torch.Generator()
        if seed is None:
            gen.seed()
        else:
            gen.manual_seed(int(seed))
        return gen

    def _system(self, groups: int, generator) -> ParticleSystem:
        c = self.config
        return ParticleSystem(groups, c.num_particles, c.potential, c.lmbda, c.adaptive, c.ess_threshold,
                              c.resampler, c.reward_floor, c.compat, self._generator(generator))

    def _output(self, images, latents, rewards, system: ParticleSystem, events, nfe) -> SteeringOutput:
        groups, k = system.groups, system.k
        return SteeringOutput(
            images=images, latents=latents, rewards=rewards.reshape(groups, k).float(),
            log_weights=normalize_log_weights(system.log_weights, warn=False).float(),
            ancestry=torch.stack(system.ancestry), ess=torch.stack(system.ess_trace),
            resampled=torch.stack(system.resampled), events=list(events),
            nfe={"denoiser_calls": nfe.calls, "denoiser_rows": nfe.rows, **self.counts})

    # -- entry point -------------------------------------------------------------------------------------------
    def __call__(self, prompt: str | list[str] | None = None, *, class_labels: Sequence[int] | None = None,
                 num_inference_steps: int = 100, guidance_scale: float | None = None, eta: float = 1.0,
                 generator: torch.Generator | list[torch.Generator] | None = None, output_type: str = "pil",
                 prompts_for_reward: Sequence[str] | None = None, **pipeline_kwargs) -> SteeringOutput:
        self.counts = {"vae_decodes": 0, "reward_calls": 0, "reward_items": 0}
        events = self.config.events(num_inference_steps)
        if self.family.flow_matching:
            return self._run_flow(prompt, num_inference_steps, guidance_scale, eta, generator, output_type, events,
                                  pipeline_kwargs)
        check_sampler(self.pipe.scheduler, eta, self.config)
        if isinstance(self.family, StableDiffusionFamily):
            if prompt is None or (not isinstance(prompt, str) and len(prompt) == 0):
                raise InputError("StableDiffusionPipeline needs `prompt` (a string or a non-empty list)")
            return self._run_sd(prompt, num_inference_steps, self.family.guidance(guidance_scale),
                                eta, generator, output_type, events, pipeline_kwargs)
        if class_labels is None or len(class_labels) == 0:
            raise InputError("DiTPipeline needs `class_labels` (a non-empty list of class indices)")
        classes = getattr(self.pipe.transformer.config, "num_embeds_ada_norm", None)
        bad = [c for c in class_labels if int(c) != c or not 0 <= int(c) < (classes or float("inf"))]
        if bad:
            raise InputError(f"class_labels {bad} are outside the model's classes [0, {classes - 1}]")
        return self._run_dit(list(class_labels), num_inference_steps, self.family.guidance(guidance_scale), eta,
                             generator, output_type, events, prompts_for_reward)

    def _run_sd(self, prompt, steps, guidance_scale, eta, generator, output_type, events, kwargs) -> SteeringOutput:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        k, last = self.config.num_particles, steps - 1
        row_prompts = [p for p in prompts for _ in range(k)]
        system = self._system(len(prompts), generator)
        recorder, original = X0Recorder(self.pipe.scheduler), self.pipe.scheduler
        score_final_sample = self.config.compat == "textbook"
        state = {"rewards": torch.zeros(len(row_prompts))}

        def on_step_end(pipe, i: int, t, callback_kwargs: dict) -> dict:
            if i not in events:
                return {}
            latents = callback_kwargs["latents"]
            target = latents if i == last and score_final_sample else recorder.x0
            rewards = self._score(target, row_prompts)
            rows = flat_indices(system.event(rewards, final=i == last))
            state["rewards"] = rewards[rows]
            reorder_rows(pipe, rows)  # feature caches (if any) follow their particles
            return {"latents": latents[rows.to(latents.device)]}

        self.pipe.scheduler = recorder
        try:
            with count_nfe(self.pipe) as nfe:
                out = self.pipe(prompts, num_images_per_prompt=k, num_inference_steps=steps,
                                guidance_scale=guidance_scale, eta=eta, generator=generator,
                                output_type="latent", callback_on_step_end=on_step_end,
                                callback_on_step_end_tensor_inputs=["latents"], **kwargs)
        finally:
            self.pipe.scheduler = original
        latents = out.images
        images = self._postprocess(latents, output_type)
        return self._output(images, latents, state["rewards"], system, events, nfe)

    def _follow_particles(self, info: dict) -> None:
        if info["ancestors"] is not None:
            reorder_rows(self.pipe, info["ancestors"])  # feature caches (if any) follow their particles

    def _postprocess(self, latents: torch.Tensor, output_type: str):
        if output_type == "latent":
            return latents
        images = self.family.decode(latents)
        self.counts["vae_decodes"] += len(latents)
        if output_type == "pt":
            return images
        if output_type == "np":
            return images.cpu().permute(0, 2, 3, 1).float().numpy()
        return self.pipe.numpy_to_pil(images.cpu().permute(0, 2, 3, 1).float().numpy())

    def _run_dit(self, labels, steps, guidance_scale, eta, generator, output_type, events,
                 prompts_for_reward) -> SteeringOutput:
        fam: DiTFamily = self.family  # type: ignore[assignment]
        k = self.config.num_particles
        names = list(prompts_for_reward) if prompts_for_reward is not None else fam.labels_text(labels)
        row_prompts = [p for p in names for _ in range(k)]
        system = self._system(len(labels), generator)
        scheduler = self.pipe.scheduler
        scheduler.set_timesteps(steps)
        x = fam.init_latents(len(row_prompts), generator)
        with count_nfe(self.pipe) as nfe:
            latents, rewards = sample_fk(fam.eps, x, scheduler, system, lambda z: self._score(z, row_prompts),
                                         events, fam.condition(labels, k, guidance_scale),
                                         step_kwargs(scheduler, eta, generator),
                                         score_final_sample=self.config.compat == "textbook",
                                         callback=self._follow_particles, family=fam)
        images = self._postprocess(latents, output_type)
        return self._output(images, latents, rewards, system, events, nfe)

    def _run_flow(self, prompt, steps, guidance_scale, eta, generator, output_type, events,
                  kwargs) -> SteeringOutput:
        """Flux / SD3: our loop on `FlowMatchSDEScheduler` (the pipeline's FlowMatch-Euler made stochastic by `eta`,
        same sigma grid); the stock pipeline with that scheduler and `noise_generator` set to the call's generator
        draws the same numbers, so k = 1 reproduces it."""
        fam = self.family
        if prompt is None or (not isinstance(prompt, str) and len(prompt) == 0):
            raise InputError(f"{type(self.pipe).__name__} needs `prompt` (a string or a non-empty list)")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        check_eta(eta)
        scheduler = stochastic_counterpart(self.pipe.scheduler)
        check_sampler(scheduler, eta, self.config, flow=True)
        k = self.config.num_particles
        row_prompts = [p for p in prompts for _ in range(k)]
        system = self._system(len(prompts), generator)
        with fam.own_loop_call(kwargs):
            fam.set_timesteps(scheduler, steps)
            cond = fam.condition(prompts, k, guidance_scale)
            x = fam.init_latents(len(row_prompts), generator)
            with count_nfe(self.pipe) as nfe:
                latents, rewards = sample_fk(fam.eps, x, scheduler, system, lambda z: self._score(z, row_prompts),
                                             events, cond, step_kwargs(scheduler, eta, generator),
                                             score_final_sample=self.config.compat == "textbook",
                                             callback=self._follow_particles, family=fam)
            images = self._postprocess(latents, output_type)
        return self._output(images, latents, rewards, system, events, nfe)

