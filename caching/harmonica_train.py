"""HarmoniCa router training: Step-wise Denoising Training (SDT) with the Image-Error-Proxy-guided Objective (IEPO).

Huang et al., ICML 2025 (arXiv 2410.01723), §4. Image-free: only noise and class ids (DiT) or
prompts (Flux).

SDT (paper §4.1): every trajectory starts from fresh noise, resets the unit caches, runs step 0 fully,
and for s = 1..N-1 computes the teacher prediction ε_T = f(x_s) (no cache access), the student prediction ε_S with
the soft forward of row s (y = r f + (1 - r) c, cache written with the blended value when r > τ), takes one AdamW
step on Θ[s] for

    L_s = λ_s · mean((ε_T - ε_S)²) + β · Σ_u sigmoid(Θ[s, u])

and advances x_{s+1} with the sampler using ε_S — the trajectory follows the cached model, as inference will.

IEPO (paper §4.2): λ_s is an image-error proxy, refreshed every `lambda_every` trajectories on the
current trajectory's noise and classes with no gradient. We implement both forms and default to the **released
code's** incremental one, because it is what the published numbers were produced with: x_0^{[0]} = every row
computing; x_0^{[s]} = soft router on rows 1..s, later rows computing;
λ_s = batch mean of the per-sample mean squared difference between x_0^{[s]} and x_0^{[s-1]}.
The paper's form (`lambda_mode="paper"`) compares the generation with the router everywhere against the same
generation with row s forced to compute; we use the same per-sample mean (not the Frobenius sum) so that the two
coincide when only one row caches and β has one scale.

Extension (not in the paper, off by default): `cost_weighted=True` multiplies each unit's β term by its FLOPs
relative to the mean unit, so that the reuse incentive follows what a reuse saves (the paper's β term counts all
units alike, so a router happily caches cheap attention units first).

Ablations: `sdt=False` (Learning-to-Cache-like "prior timestep disregard": the trajectory follows the teacher and
the cache holds the teacher's exact features of the previous step), `iepo=False` (λ_s ≡ 1, L2C's objective).

CFG convention: diffusers' `DiTPipeline` — guidance on all latent channels, at the guidance
scale the plan will be used with (default 4.0 for `digits-dit`), `[cond; null]` rows with the null class 1000.
`FluxPipeline` (a diffaccel extension; the paper trains DiT and PixArt): one row per image with the embedded
guidance the model has (none for `digits-flux`); true CFG's second call is not trained. Training prompts play the
role of the class ids: drawn uniformly from a prompt list, by default the zoo's ten digit captions.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..core.errors import InputError
from ..core.families import DiTFamily, FluxFamily, family_class
from ..core.files import atomic_save
from ..samplers.loop import sample
from ..zoo.data import caption
from .harmonica import DEFAULT_THRESHOLD, CacheMode, CachePlan, Router, attach_router, remove_cache_plan


@dataclass
class TrainConfig:
    """Router training settings (defaults: the runs shipped for `digits-dit` at 20 DDIM steps)."""

    num_steps: int = 20
    trajectories: int = 120
    batch_size: int = 16  # images per trajectory; the transformer sees 2x rows with CFG
    guidance_scale: float = 4.0
    beta: float = 1e-4
    lr: float = 0.05
    threshold: float = DEFAULT_THRESHOLD
    lambda_every: int = 10  # trajectories between λ refreshes (released DiT: every 50)
    lambda_mode: str = "released"
    sdt: bool = True
    iepo: bool = True
    seed: int = 0
    init_std: float = 1.0
    num_classes: int = 10
    cost_weighted: bool = False  # diffaccel extension: β term weighted by each unit's FLOPs share (not the paper)
    prompts: list[str] | None = None  # text pipelines: training prompts (None: the zoo's digit captions)

    def __post_init__(self) -> None:
        if self.lambda_mode not in ("released", "paper"):
            raise InputError(f"lambda_mode must be 'released' or 'paper', got {self.lambda_mode!r}")
        for name in ("num_steps", "trajectories", "batch_size", "lambda_every", "num_classes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (2 if name == "num_steps" else 1):
                raise InputError(f"{name} must be an int >= {2 if name == 'num_steps' else 1}, got {v!r}")
        if not (math.isfinite(self.beta) and self.beta >= 0):
            raise InputError(f"beta must be a finite number >= 0, got {self.beta}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise InputError(f"lr must be > 0, got {self.lr}")
        if not 0.0 < self.threshold < 1.0:
            raise InputError(f"threshold must be in (0, 1), got {self.threshold}")


@dataclass
class TrainResult:
    router: Router
    plan: CachePlan
    history: list[dict[str, float]] = field(default_factory=list)
    lambdas: list[float] = field(default_factory=list)
    lambda_refreshes: int = 0
    seconds: float = 0.0


class TrajectorySampler:
    """The target pipeline's denoising loop with per-step control, through its family adapter.

    `DiTPipeline`: class labels, CFG rows `[cond; null]` and guidance on all latent channels, as the pipeline forms
    them. `FluxPipeline`: packed latents, prompts drawn from `prompts` (default: the zoo's digit captions, one per
    class), embedded guidance only (no true CFG), the pipeline's shifted sigma grid.
    """

    def __init__(self, pipe: Any, num_steps: int, guidance_scale: float,
                 prompts: list[str] | None = None) -> None:
        cls = family_class(pipe)
        if cls not in (DiTFamily, FluxFamily):
            raise InputError(f"router training supports DiTPipeline and FluxPipeline, got {type(pipe).__name__} "
                             f"with denoiser {type(getattr(pipe, 'transformer', None)).__name__}")
        self.family = cls(pipe)
        self.pipe = pipe
        self.transformer = pipe.transformer
        self.num_steps = num_steps
        self.guidance = guidance_scale
        self.prompts = list(prompts) if prompts else None
        self.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        self.family.set_timesteps(self.scheduler, num_steps)
        self.timesteps = self.scheduler.timesteps
        if len(self.timesteps) != num_steps:
            raise InputError(f"{type(self.scheduler).__name__} gives {len(self.timesteps)} timesteps for "
                             f"num_inference_steps={num_steps}")

    @property
    def text(self) -> bool:
        return isinstance(self.family, FluxFamily)

    def draw(self, batch: int, num_classes: int, generator: torch.Generator) -> tuple[torch.Tensor, Any]:
        """Noise x_T and the conditioning of one trajectory (class ids, or text embeddings of prompts drawn
        uniformly); deterministic given the generator."""
        if not self.text:
            cfg = self.transformer.config
            x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=generator)
            labels = torch.randint(0, num_classes, (batch,), generator=generator)
            return x.to(self.transformer.device, self.transformer.dtype), labels.to(self.transformer.device)
        x = self.family.init_latents(batch, generator)
        prompts = self.prompts or [caption(c) for c in range(min(num_classes, 10))]
        picks = torch.randint(0, len(prompts), (batch,), generator=generator).tolist()
        return x, self.family.condition([prompts[i] for i in picks], 1, self.guidance)

    def fresh_scheduler(self) -> Any:
        sched = type(self.scheduler).from_config(self.scheduler.config)
        self.family.set_timesteps(sched, self.num_steps)
        return sched

    def eps(self, x: torch.Tensor, t: torch.Tensor, cond: Any, scheduler: Any) -> torch.Tensor:
        """The model output the pipeline hands its scheduler, formed as the pipeline's own call forms it."""
        if self.text:
            return self.family.eps(x, t, **cond)
        labels = cond
        if self.guidance > 1:
            labels = torch.cat([labels, torch.full_like(labels, DiTFamily.NULL_CLASS)])
        return self.family.eps(x, t, labels=labels, guidance_scale=self.guidance, scheduler=scheduler)

    def step(self, scheduler: Any, eps: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return scheduler.step(eps, t, x).prev_sample


@torch.no_grad()
def generate(sampler: TrajectorySampler, state: Any, x: torch.Tensor, cond: Any,
             gates: Callable[[int], torch.Tensor | None]) -> torch.Tensor:
    """One no-grad generation with the soft forward and the given per-row gates; returns the final latent x_0."""
    sched = sampler.fresh_scheduler()
    state.clear()
    state.mode, state.gates = CacheMode.SOFT, gates
    x = sample(lambda z, t: sampler.eps(z, t, cond, sched), x, sched.timesteps, scheduler=sched)
    state.gates = None
    return x


def _per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).flatten(1).mean(1).mean())


@torch.no_grad()
def image_error_proxy(sampler: TrajectorySampler, state: Any, router: Router, x: torch.Tensor, cond: Any,
                      mode: str = "released") -> list[float]:
    """λ_0..λ_{N-1} (λ_0 = 0, never used): N no-grad generations (module docstring)."""
    n = sampler.num_steps
    scores = router.scores().detach()
    lam = [0.0] * n
    if mode == "released":
        prev = generate(sampler, state, x, cond, lambda k: None)
        for s in range(1, n):
            cur = generate(sampler, state, x, cond, lambda k, s=s: scores[k] if 1 <= k <= s else None)
            lam[s] = _per_sample_mse(cur, prev)
            prev = cur
    elif mode == "paper":
        full = generate(sampler, state, x, cond, lambda k: scores[k] if k >= 1 else None)
        for s in range(1, n):
            forced = generate(sampler, state, x, cond, lambda k, s=s: scores[k] if k >= 1 and k != s else None)
            lam[s] = _per_sample_mse(full, forced)
    else:
        raise InputError(f"lambda mode must be 'released' or 'paper', got {mode!r}")
    return lam


def _save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    atomic_save(path, lambda tmp: torch.save(payload, tmp))


def train_router(pipe: Any, config: TrainConfig, *, checkpoint: str | os.PathLike | None = None,
                 resume: bool = False, checkpoint_every: int = 10, progress: bool = True,
                 on_trajectory: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Train a HarmoniCa router for `pipe` (a `DiTPipeline` or `FluxPipeline`); returns it with its plan and loss
    history.

    Model weights are frozen (their `requires_grad` flags are restored afterwards). `checkpoint` is written
    atomically every `checkpoint_every` trajectories and at the end; `resume=True` continues from it (the config
    must match, except `trajectories`, which may grow). Deterministic given `config.seed` and the thread count.
    """
    sampler = TrajectorySampler(pipe, config.num_steps, config.guidance_scale, config.prompts)
    transformer = sampler.transformer
    unit_cost = None
    if config.cost_weighted:
        from .harmonica import example_inputs, unit_flops

        per_unit = torch.tensor(unit_flops(transformer, **example_inputs(transformer, batch=2))[1], dtype=torch.float)
        unit_cost = per_unit / per_unit.mean()
    router = Router.for_model(pipe, config.num_steps, init_std=config.init_std, seed=config.seed)
    opt = torch.optim.AdamW(router.parameters(), lr=config.lr, weight_decay=0.0)
    start, history, lam, refreshes, seconds = 0, [], None, 0, 0.0
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if resume:
        if ckpt is None or not ckpt.exists():
            raise InputError(f"--resume given but no checkpoint at {ckpt}")
        payload = torch.load(ckpt, weights_only=False)
        defaults = dataclasses.asdict(TrainConfig())  # keys added after a checkpoint was written take the default
        saved = {k: payload["config"].get(k, defaults[k]) for k in defaults if k != "trajectories"}
        mine = {k: v for k, v in dataclasses.asdict(config).items() if k != "trajectories"}
        if saved != mine:
            diff = {k: (saved.get(k), mine.get(k)) for k in mine if saved.get(k) != mine.get(k)}
            raise InputError(f"checkpoint {ckpt} was made with other settings (checkpoint, now): {diff}")
        router.load_state_dict(payload["router"])
        opt.load_state_dict(payload["optimizer"])
        start, history, lam = payload["trajectory"], payload["history"], payload["lambdas"]
        refreshes, seconds = payload["lambda_refreshes"], payload["seconds"]

    flags = [p.requires_grad for p in transformer.parameters()]
    transformer.requires_grad_(False)
    was_training = transformer.training
    transformer.eval()
    state = attach_router(transformer, router, threshold=config.threshold)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.trajectories, initial=start, desc="train-router", file=sys.stderr, dynamic_ncols=True)
    t_start = time.perf_counter() - seconds

    def snapshot(done: int) -> dict[str, Any]:
        return {"config": dataclasses.asdict(config), "router": router.state_dict(), "optimizer": opt.state_dict(),
                "trajectory": done, "history": history, "lambdas": lam, "lambda_refreshes": refreshes,
                "seconds": time.perf_counter() - t_start}

    try:
        for traj in range(start, config.trajectories):
            g = torch.Generator().manual_seed(config.seed * 1_000_003 + traj)
            x, cond = sampler.draw(config.batch_size, config.num_classes, g)
            if config.iepo and (lam is None or traj % config.lambda_every == 0):
                lam = image_error_proxy(sampler, state, router, x, cond, config.lambda_mode)
                refreshes += 1
            weights = lam if config.iepo else [1.0] * config.num_steps
            record = _trajectory(sampler, state, router, opt, x, cond, weights, config, unit_cost)
            record["usage_ratio"] = router.to_plan(config.threshold).usage_ratio
            history.append(record)
            if on_trajectory is not None:
                on_trajectory(traj, record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.3g}", cur=f"{record['usage_ratio']:.2f}")
            done = traj + 1
            if ckpt is not None and (done % checkpoint_every == 0 or done == config.trajectories):
                _save_checkpoint(ckpt, snapshot(done))
    finally:
        if bar is not None:
            bar.close()
        remove_cache_plan(transformer)
        for p, f in zip(transformer.parameters(), flags, strict=True):
            p.requires_grad_(f)
        transformer.train(was_training)
    plan = router.to_plan(config.threshold)
    plan.metadata.update({"steps": str(config.num_steps), "guidance_scale": str(config.guidance_scale),
                          "beta": repr(config.beta), "sdt": str(config.sdt), "iepo": str(config.iepo),
                          "lambda_mode": config.lambda_mode, "trajectories": str(config.trajectories),
                          "batch_size": str(config.batch_size), "seed": str(config.seed),
                          "cost_weighted": str(config.cost_weighted)})
    return TrainResult(router, plan, history, list(lam or []), refreshes, time.perf_counter() - t_start)


def _trajectory(sampler: TrajectorySampler, state: Any, router: Router, opt: torch.optim.Optimizer, x: torch.Tensor,
                cond: Any, weights: list[float], config: TrainConfig,
                unit_cost: torch.Tensor | None = None) -> dict[str, float]:
    """One SDT trajectory (or its no-SDT ablation): N-1 optimiser steps, one per row."""
    sched = sampler.fresh_scheduler()
    state.clear()
    totals = {"loss": 0.0, "mse": 0.0, "weighted_mse": 0.0, "reg": 0.0}
    for s, t in enumerate(sched.timesteps):
        if s == 0:
            with torch.no_grad():
                state.mode, state.gates = (CacheMode.SOFT if config.sdt else CacheMode.TEACHER_WRITE), (lambda k: None)
                eps = sampler.eps(x, t, cond, sched)
            x = sampler.step(sched, eps, t, x)
            continue
        scores = router.row_scores(s)
        if config.sdt:
            with torch.no_grad():
                state.mode = CacheMode.TEACHER
                eps_t = sampler.eps(x, t, cond, sched)
            state.mode, state.gates = CacheMode.SOFT, (lambda k, r=scores: r)
            eps_s = sampler.eps(x, t, cond, sched)
        else:  # L2C-like: blend with the teacher's exact features of step s-1, then cache the teacher's features
            state.mode, state.gates = CacheMode.SOFT_READONLY, (lambda k, r=scores: r)
            eps_s = sampler.eps(x, t, cond, sched)
            with torch.no_grad():
                state.mode = CacheMode.TEACHER_WRITE
                eps_t = sampler.eps(x, t, cond, sched)
        state.gates = None
        mse = torch.mean((eps_t - eps_s) ** 2)
        reg = scores.sum() if unit_cost is None else (unit_cost * scores).sum()
        loss = weights[s] * mse + config.beta * reg
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        router.clamp_()
        x = sampler.step(sched, (eps_s if config.sdt else eps_t).detach(), t, x)
        totals["loss"] += loss.item()
        totals["mse"] += mse.item()
        totals["weighted_mse"] += weights[s] * mse.item()
        totals["reg"] += reg.item()
    rows = config.num_steps - 1
    return {k: v / rows for k, v in totals.items()}


def write_card(path: Path, result: TrainResult, config: TrainConfig, command: str, model: str,
               extra: dict[str, Any] | None = None) -> None:
    """A small JSON card beside a shipped plan: the exact command, settings, cost and final numbers."""
    card = {"model": model, "command": command, "config": dataclasses.asdict(config),
            "train_seconds": round(result.seconds, 1), "lambda_refreshes": result.lambda_refreshes,
            "usage_ratio": result.plan.usage_ratio, "final_lambdas": result.lambdas,
            "first_loss": result.history[0]["loss"] if result.history else None,
            "last_loss": result.history[-1]["loss"] if result.history else None,
            "machine": f"{os.uname().machine} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}",
            **(extra or {})}
    atomic_save(path, lambda tmp: tmp.write_text(json.dumps(card, indent=1) + "\n"))
