"""Noise search: inference-time scaling by searching the sampler's noise (Ma et al. 2025, §3.2).

Three algorithms share the reward/verifier protocol and NFE accounting, and run a *deterministic* sampler (DDIM
with eta = 0, any ODE scheduler) so that the returned noise reproduces the winning image:

* `best_of_n` (random search): N initial noises, keep the verifier's best;
* `zero_order_search`: neighbours of a pivot noise at cosine ρ with the pivot's norm; move to the best neighbour
  when it beats the pivot;
* `path_search` (search over paths): N chains to an intermediate level, then repeatedly re-noise each by Δf steps
  with M fresh noises, integrate Δb > Δf steps back, keep the top N by the reward of x̂0.

NFE is counted in *image-step evaluations* (one denoiser evaluation of one sample; CFG's doubled batch counts once),
so a base sample with T steps costs T and ``budget_nfe`` is comparable with FK's ``k·T``.
The loops drive the pipeline's own components through `core.families` (`StableDiffusionPipeline`, `DiTPipeline`,
and the flow-matching `FluxPipeline` and `StableDiffusion3Pipeline` with FlowMatch-Euler, their ODE sampler; the
noise is drawn as the pipeline draws it, so `SearchOutput.noise` replays through ``pipe(..., latents=noise)``).
Path search re-noises along the model's own forward process: VP `x_t = √ᾱ x0 + √(1−ᾱ) ε` or flow
`x_σ = (1 − σ) x0 + σ ε`.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor

from ...core import count_nfe
from ...core.errors import InputError
from ...core.families import DiTFamily, family_for, step_kwargs
from ...core.schedulers import is_stochastic
from ..flow import is_flow_scheduler, require_vp
from ..loop import sample
from .rewards import Reward, as_reward, score


@dataclass
class SearchOutput:
    """The winner of a search: its image, reward and the noise that reproduces it; history of every round."""

    image: torch.Tensor  # [1, C, H, W] in [0, 1]
    latents: torch.Tensor
    noise: torch.Tensor  # initial noise (unscaled N(0, I)); pass as `latents=` to the stock pipeline to replay
    reward: float
    history: list[list[float]] = field(default_factory=list)  # rewards of the candidates of each round
    path_noises: list[torch.Tensor] = field(default_factory=list)  # path search: the re-noising draws of the winner
    nfe: dict[str, int] = field(default_factory=dict)


class _Runner:
    """Deterministic sampling of one prompt's candidates with the pipeline's components; counts NFE and rewards."""

    def __init__(self, pipe, reward: Reward, prompt, steps: int, guidance_scale: float | None, eta: float,
                 call_kwargs: dict | None = None) -> None:
        self.pipe, self.family, self.reward = pipe, family_for(pipe), as_reward(reward)
        self.call_kwargs = dict(call_kwargs or {})
        if self.call_kwargs and not self.family.flow_matching:
            raise InputError(f"noise search on {type(pipe).__name__} takes no extra call arguments; got "
                             f"{', '.join(sorted(self.call_kwargs))}")
        if isinstance(self.family, DiTFamily):
            self.cond_key = [int(prompt)]
            self.text = self.family.labels_text(self.cond_key)[0]
        else:
            self.cond_key, self.text = [str(prompt)], str(prompt)
        self.guidance = self.family.guidance(guidance_scale)
        self.steps, self.eta = steps, eta
        self.scheduler = pipe.scheduler
        if self.family.flow_matching and not is_flow_scheduler(self.scheduler):
            raise InputError(f"noise search: {type(pipe).__name__} is a flow-matching pipeline but its "
                             f"{type(self.scheduler).__name__} steps variance-preserving levels; use "
                             "FlowMatchEulerDiscreteScheduler")
        with self.sized():
            self.family.set_timesteps(self.scheduler, steps)
        if is_stochastic(self.scheduler, eta) is not False:
            fix = "FlowMatchEulerDiscreteScheduler (or eta=0)" if self.family.flow_matching else "DDIMScheduler, eta=0"
            raise InputError(f"noise search needs a deterministic sampler (the noise must determine the image); "
                             f"{type(self.scheduler).__name__} with eta={eta} injects noise. Use {fix}")
        self.per_row = self.family.cfg_rows(self.guidance)
        self.counts = {"nfe": 0, "reward_calls": 0, "vae_decodes": 0}
        self._cond: dict[int, dict[str, Any]] = {}

    def cond(self, n: int) -> dict[str, Any]:
        if n not in self._cond:
            self._cond[n] = self.family.condition(self.cond_key, n, self.guidance)
        return self._cond[n]

    def sized(self):
        """The call's image size around a flow family's loop (`MMDiTTextFamily.own_loop_call`); no-op otherwise."""
        return self.family.own_loop_call(self.call_kwargs) if self.family.flow_matching else nullcontext()

    def noise(self, n: int, generator) -> torch.Tensor:
        if self.family.flow_matching:  # drawn (and for Flux packed) as the pipeline draws it; unit variance
            with self.sized():
                return self.family.init_latents(n, generator)
        return randn_tensor(self.family.noise_shape(n), generator=generator, device=self.family.device,
                            dtype=self.pipe.dtype)

    def integrate(self, x: torch.Tensor, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """DDIM/ODE steps ``start..stop-1`` (indices into the timesteps); returns the state and the last x̂0."""
        with self.sized():
            return self._integrate(x, start, stop)

    def _integrate(self, x: torch.Tensor, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        if start == 0:
            self.family.set_timesteps(self.scheduler, self.steps)  # resets schedulers that keep a step index
            x = x * getattr(self.scheduler, "init_noise_sigma", 1.0)  # FlowMatch schedulers have none (1)
        elif hasattr(self.scheduler, "set_begin_index"):  # FlowMatch: its step index must start at `start`
            self.family.set_timesteps(self.scheduler, self.steps)
            self.scheduler.set_begin_index(start)
        last = {"x0": x}

        def keep_x0(info: dict) -> None:
            last["x0"] = info["x"] if info["denoised"] is None else info["denoised"]

        with count_nfe(self.pipe) as calls:
            x = sample(self.family.eps, x, self.scheduler.timesteps[start:stop], self.cond(len(x)), keep_x0,
                       scheduler=self.scheduler, step_args=step_kwargs(self.scheduler, self.eta, None))
        x0 = last["x0"]
        self.counts["nfe"] += calls.rows // self.per_row
        return x, x0

    def score(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self.sized():
            images = self.family.decode(latents)
        self.counts["vae_decodes"] += len(latents)
        self.counts["reward_calls"] += 1
        inputs = latents if self.reward.input_kind == "latent" else images
        return score(self.reward, inputs, [self.text] * len(latents)), images

    def sample_and_score(self, noise: torch.Tensor, batch_size: int | None = None):
        step = batch_size or len(noise)
        parts = [self.integrate(noise[i:i + step], 0, self.steps)[0] for i in range(0, len(noise), step)]
        latents = torch.cat(parts)
        rewards, images = self.score(latents)
        return latents, rewards, images

    def cost(self) -> int:
        return self.steps


#: single-step deterministic schedulers path search can restart mid-grid (VP: DDIM; flow: FlowMatch-Euler, or
#: diffaccel's FlowMatchSDEScheduler, which the search steps with eta = 0)
PATH_SCHEDULERS = ("DDIMScheduler", "FlowMatchEulerDiscreteScheduler", "FlowMatchSDEScheduler")


def _check_budget(budget_nfe: int | None, unit: int, what: str) -> int | None:
    if budget_nfe is None:
        return None
    if budget_nfe < unit:
        raise InputError(f"budget_nfe={budget_nfe} is below the cost of one {what} ({unit} NFE)")
    return int(budget_nfe)


@torch.no_grad()
def best_of_n(pipe, prompt: str | int, reward: Reward | Callable, n: int = 4, *, budget_nfe: int | None = None,
              num_inference_steps: int = 50, guidance_scale: float | None = None, eta: float = 0.0,
              generator: torch.Generator | None = None, batch_size: int | None = None,
              **pipeline_kwargs) -> SearchOutput:
    """Random search (Ma et al. 2025, §3.2): sample N noises, return the argmax of the verifier. Cost N·T NFE.

    `budget_nfe` caps N at ``budget_nfe // T``. `prompt` is a text prompt (SD, Flux, SD3) or a class label (DiT);
    `pipeline_kwargs`: ``height``/``width``/``max_sequence_length`` of a Flux or SD3 call.
    """
    if n < 1:
        raise InputError(f"n must be >= 1, got {n}")
    run = _Runner(pipe, reward, prompt, num_inference_steps, guidance_scale, eta, pipeline_kwargs)
    budget = _check_budget(budget_nfe, run.cost(), "sample")
    n = n if budget is None else min(n, budget // run.cost())
    noise = run.noise(n, generator)
    latents, rewards, images = run.sample_and_score(noise, batch_size)
    best = int(torch.argmax(rewards))
    return SearchOutput(images[best:best + 1], latents[best:best + 1], noise[best:best + 1], float(rewards[best]),
                        [rewards.tolist()], nfe=dict(run.counts))


def zero_order_neighbours(pivot: torch.Tensor, m: int, rho: float, generator=None) -> torch.Tensor:
    """``n' = ‖n‖·(ρ·u + √(1−ρ²)·w)``, u = n/‖n‖, w a random unit vector ⊥ u: same norm, cosine exactly ρ."""
    flat = pivot.reshape(1, -1).double()
    norm = flat.norm()
    u = flat / norm
    w = torch.randn(m, flat.shape[1], generator=generator, dtype=torch.float64)
    w = w - (w @ u.T) * u
    w = w / w.norm(dim=1, keepdim=True)
    out = norm * (rho * u + (1 - rho**2) ** 0.5 * w)
    return out.to(pivot.dtype).reshape(m, *pivot.shape[1:])


@torch.no_grad()
def zero_order_search(pipe, prompt: str | int, reward: Reward | Callable, *, neighbours: int = 4, rounds: int = 3,
                      rho: float = 0.95, budget_nfe: int | None = None, num_inference_steps: int = 50,
                      guidance_scale: float | None = None, eta: float = 0.0,
                      generator: torch.Generator | None = None, **pipeline_kwargs) -> SearchOutput:
    """Zero-order search (Ma et al. 2025, §3.2): hill-climb on the noise; cost ``(1 + R·M)·T`` NFE.

    The pivot starts at a random noise; each round samples M neighbours at cosine `rho`; the pivot moves to the best
    neighbour if it beats the pivot. `budget_nfe` stops at the last complete round within budget.
    """
    if neighbours < 1 or rounds < 0:
        raise InputError(f"need neighbours >= 1 and rounds >= 0, got {neighbours}, {rounds}")
    if not 0 < rho < 1:
        raise InputError(f"rho must be in (0, 1), got {rho}")
    run = _Runner(pipe, reward, prompt, num_inference_steps, guidance_scale, eta, pipeline_kwargs)
    budget = _check_budget(budget_nfe, run.cost(), "sample")
    if budget is not None:
        rounds = min(rounds, (budget // run.cost() - 1) // neighbours)
    pivot = run.noise(1, generator)
    lat, r, img = run.sample_and_score(pivot)
    best = (pivot, lat, img, float(r[0]))
    history = [[best[3]]]
    for _ in range(rounds):
        cand = zero_order_neighbours(best[0], neighbours, rho, generator)
        lat, r, img = run.sample_and_score(cand)
        history.append(r.tolist())
        j = int(torch.argmax(r))
        if float(r[j]) > best[3]:
            best = (cand[j:j + 1], lat[j:j + 1], img[j:j + 1], float(r[j]))
    return SearchOutput(best[2], best[1], best[0], best[3], history, nfe=dict(run.counts))


def _renoise(run: _Runner, x: torch.Tensor, i: int, back: int, eps: torch.Tensor) -> torch.Tensor:
    """Forward diffusion from the level of timesteps[i] to timesteps[i − back] (Ma et al. path search step (a)).

    Flow: the forward transition of the interpolation `x_σ = α_σ x0 + σ ε` (α_σ = 1 − σ) from σ to σ_b > σ is
    `x_b = (α_b / α) x + sqrt(σ_b² − (α_b σ / α)²) ε` (Kingma et al. 2021, "Variational Diffusion Models", Eq. 33)."""
    if run.family.flow_matching:
        sig = run.scheduler.sigmas.to(torch.float64)
        s, s_b = float(sig[i]), float(sig[i - back])
        ratio = (1.0 - s_b) / (1.0 - s)
        std = max(0.0, s_b**2 - (ratio * s) ** 2) ** 0.5
        return (ratio * x.to(torch.float32) + std * eps.to(torch.float32)).to(x.dtype)
    require_vp(run.scheduler, "path search's re-noising")
    ac = run.scheduler.alphas_cumprod.to(x.device)
    ts = run.scheduler.timesteps
    a_from, a_to = ac[int(ts[i])], ac[int(ts[i - back])]
    ratio = (a_to / a_from).to(x.dtype)
    return ratio.sqrt() * x + (1 - ratio).sqrt() * eps


@torch.no_grad()
def path_search(pipe, prompt: str | int, reward: Reward | Callable, *, n: int = 2, m: int = 2, start: int = 10,
                delta_f: int = 2, delta_b: int = 4, budget_nfe: int | None = None, num_inference_steps: int = 50,
                guidance_scale: float | None = None, generator: torch.Generator | None = None,
                **pipeline_kwargs) -> SearchOutput:
    """Search over paths (Ma et al. 2025, §3.2) with DDIM (eta = 0); x̂0 rewards come free from the last step.

    N chains run to step `start`; each round re-noises every chain by `delta_f` steps with M fresh noises,
    integrates `delta_b` steps back and keeps the top N by the reward of x̂0. The last round ends at x0; the best
    final sample wins. A round costs ``N·M·Δb`` NFE; with `budget_nfe` the search stops at the last round that
    leaves enough to finish the best chain with plain ODE steps. `path_noises` hold the winner's re-noising draws
    (`replay_path` regenerates it).
    """
    if type(pipe.scheduler).__name__ not in PATH_SCHEDULERS:
        raise InputError(f"path_search re-noises between grid levels and needs one of {', '.join(PATH_SCHEDULERS)}; "
                         f"got {type(pipe.scheduler).__name__}")
    if not (n >= 1 and m >= 1 and 1 <= delta_f < delta_b and 0 < start < num_inference_steps):
        raise InputError(f"need n, m >= 1, 1 <= delta_f < delta_b, 0 < start < steps; got n={n}, m={m}, "
                         f"delta_f={delta_f}, delta_b={delta_b}, start={start}")
    if start < delta_f:
        raise InputError(f"start ({start}) must be >= delta_f ({delta_f}) to re-noise")
    run = _Runner(pipe, reward, prompt, num_inference_steps, guidance_scale, 0.0, pipeline_kwargs)
    steps = num_inference_steps
    budget = _check_budget(budget_nfe, n * start + (steps - start), "path search start")
    noise = run.noise(n, generator)
    x, _ = run.integrate(noise, 0, start)
    paths: list[list[torch.Tensor]] = [[] for _ in range(n)]
    origin = list(range(n))
    history: list[list[float]] = []
    i = start
    while i < steps:
        stop = min(i - delta_f + delta_b, steps)
        if budget is not None and run.counts["nfe"] + n * m * (stop - i + delta_f) + (steps - stop) > budget:
            break
        eps = run.noise(n * m, generator)
        cand = _renoise(run, x.repeat_interleave(m, dim=0), i, delta_f, eps)
        cand, x0 = run.integrate(cand, i - delta_f, stop)
        r, _ = run.score(cand if stop == steps else x0)
        history.append(r.tolist())
        keep = torch.topk(r, min(n, len(r))).indices
        x = cand[keep]
        paths = [paths[int(j) // m] + [eps[int(j):int(j) + 1]] for j in keep]
        origin = [origin[int(j) // m] for j in keep]
        i = stop
    if i < steps:  # budget exhausted: finish the best chain without search
        x, _ = run.integrate(x[:1], i, steps)
        paths, origin = paths[:1], origin[:1]
    r, images = run.score(x)
    b = int(torch.argmax(r))
    return SearchOutput(images[b:b + 1], x[b:b + 1], noise[origin[b]:origin[b] + 1], float(r[b]), history,
                        path_noises=paths[b], nfe=dict(run.counts))


@torch.no_grad()
def replay_path(pipe, prompt: str | int, noise: torch.Tensor, path_noises: list[torch.Tensor], *, start: int,
                delta_f: int, delta_b: int, num_inference_steps: int = 50,
                guidance_scale: float | None = None, **pipeline_kwargs) -> torch.Tensor:
    """Regenerate a `path_search` winner from its initial noise and re-noising draws; returns images in [0, 1]."""
    run = _Runner(pipe, lambda im, p: torch.zeros(len(im)), prompt, num_inference_steps, guidance_scale, 0.0,
                  pipeline_kwargs)
    x, _ = run.integrate(noise, 0, start)
    i = start
    for eps in path_noises:
        stop = min(i - delta_f + delta_b, num_inference_steps)
        x, _ = run.integrate(_renoise(run, x, i, delta_f, eps), i - delta_f, stop)
        i = stop
    if i < num_inference_steps:
        x, _ = run.integrate(x, i, num_inference_steps)
    with run.sized():
        return run.family.decode(x)
