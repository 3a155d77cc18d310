"""The stage → objective table: what each `diffaccel distill` stage makes or optimises, in one place.

==========  ==============================================================================  ==================
stage       objective (Liu et al. 2022, arXiv 2209.03003; InstaFlow, arXiv 2309.06380)      trains
==========  ==============================================================================  ==================
pairs       couplings z1 = ODE_teacher(z0 | c) (no loss: `pairs.PairWriter`)                 nothing
reflow      E_s ‖v(z_s, τ(s), c) − (z1 − z0)‖², s ~ U(ε, 1) (RF Eq. 1)                      the whole denoiser
one-step    ‖z0 + v(z0, τ = 1000, c) − z1ᵀ‖² (or features / Huber); k > 1: s ∈ {0, 1/k, …}  the whole denoiser
guidance    ‖o_φ(x_t, t, c) − (o(∅) + w·(o(c) − o(∅)))‖² (Meng et al. 2023)                 LoRA adapters only
==========  ==============================================================================  ==================

`train.py` runs the loop (batches, accelerate, checkpoints, resume) and asks the table for the loss of each
micro-batch; a new stage is one `Stage` entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import DistillConfig, DistillInputError


@dataclass
class TrainState:
    """What an objective reads, built once per run by the training loop (`setup` may fill `extras`)."""

    cfg: DistillConfig
    model: torch.nn.Module  # the student as called for the loss (accelerate-prepared)
    raw_model: torch.nn.Module  # the same student, unwrapped (LoRA adapters are toggled on it)
    base: Any  # the pipeline the student came from (its text encoder and VAE, frozen)
    is_rf_base: bool  # the base is a velocity (rectified-flow) model rather than an ε-model
    device: torch.device
    embed: Callable[[list[str]], Any]  # prompts -> the conditioning the student takes
    pairs_guidance_scale: float  # the guidance the pairs were made with (Imagen form)
    guidance_scale: float | None = None  # the guidance stage's w (Imagen form)
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MicroBatch:
    """One micro-step's couplings, their conditioning and the step's own generator (times, noise)."""

    z0: torch.Tensor
    z1: torch.Tensor
    cond: Any
    prompts: list[str]
    generator: torch.Generator


def _no_setup(state: TrainState) -> None:
    return None


def reflow_loss(state: TrainState, b: MicroBatch) -> torch.Tensor:
    from .objectives import rf_loss

    cfg = state.cfg
    return rf_loss(state.model, b.z0, b.z1, b.cond, time_sampler=cfg.time_sampler, eps=cfg.time_eps,
                   generator=b.generator)


def one_step_setup(state: TrainState) -> None:
    """`--loss_type features*`: decode with the base's VAE, embed with the zoo's digits-features network."""
    if not state.cfg.loss_type.startswith("features"):
        return
    from ..zoo import load as zoo_load

    clf = zoo_load("digits-features", device=state.device).requires_grad_(False).eval()
    vae = state.base.vae
    sf, shift = vae.config.scaling_factor, getattr(vae.config, "shift_factor", None)

    def decode(z: torch.Tensor) -> torch.Tensor:  # pair latents are (vae latent − shift) · scale
        return vae.decode(z / sf + shift if shift else z / sf).sample

    def features(x: torch.Tensor) -> torch.Tensor:
        if x.shape[1:] != (1, 32, 32):
            raise DistillInputError(f"--loss_type features needs 1x32x32 digit images, the VAE decodes to "
                                    f"{tuple(x.shape[1:])}")
        return clf.features_from_normalized(x.clamp(-1, 1))

    state.extras.update(decode=decode, features=features)


def one_step_loss(state: TrainState, b: MicroBatch) -> torch.Tensor:
    from .objectives import one_step_distill_loss, rf_loss

    cfg = state.cfg
    if cfg.distill_k == 1:
        return one_step_distill_loss(state.model, b.z0, b.z1, b.cond, loss=cfg.loss_type,
                                     decode=state.extras.get("decode"), features=state.extras.get("features"),
                                     huber_c=cfg.huber_c)
    k = cfg.distill_k  # the k-step variant: the chord velocity at s on the grid {0, 1/k, ...}
    s = torch.randint(0, k, (b.z0.shape[0],), generator=b.generator).float() / k
    return rf_loss(state.model, b.z0, b.z1, b.cond, s=s)


def guidance_setup(state: TrainState) -> None:
    """w: --guidance_scale, else 1.5 on a rectified-flow base (InstaFlow) or the pairs' scale on an ε-model; an
    ε-model base gets its DDPM forward process for x_t."""
    w = state.cfg.guidance_scale
    if w is None:
        w = 1.5 if state.is_rf_base else float(state.pairs_guidance_scale)
    state.guidance_scale = w
    if not state.is_rf_base:
        from diffusers import DDPMScheduler

        state.extras["ddpm"] = DDPMScheduler.from_config(state.base.scheduler.config)


def guidance_loss(state: TrainState, b: MicroBatch) -> torch.Tensor:
    from .objectives import guidance_distill_loss, rf_interpolate, rf_time_to_unet_timestep, sample_time

    z0, z1, gen, device = b.z0, b.z1, b.generator, state.device
    uncond = state.embed([""] * len(b.prompts))
    if state.is_rf_base:
        s = sample_time(z0.shape[0], eps=state.cfg.time_eps, generator=gen)
        x_t, t = rf_interpolate(z0, z1, s.to(device)), rf_time_to_unet_timestep(s).to(device)
    else:
        ddpm = state.extras["ddpm"]
        t = torch.randint(0, ddpm.config.num_train_timesteps, (z0.shape[0],), generator=gen)
        noise = torch.randn(z0.shape, generator=gen).to(device)
        x_t, t = ddpm.add_noise(z1, noise, t.to(device)), t.to(device)
    return guidance_distill_loss(state.raw_model, x_t, t, b.cond, uncond, state.guidance_scale, student=state.model)


def all_parameters(cfg: DistillConfig, model: torch.nn.Module) -> list[torch.nn.Parameter]:
    model.requires_grad_(True)
    return list(model.parameters())


def lora_parameters(cfg: DistillConfig, model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Freeze the base weights and add LoRA adapters (rank --lora_rank on --lora_target_modules)."""
    from peft import LoraConfig

    targets = [t.strip() for t in cfg.lora_target_modules.split(",") if t.strip()]
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, init_lora_weights=True,
                                 target_modules=targets))
    return [p for p in model.parameters() if p.requires_grad]


@dataclass(frozen=True)
class Stage:
    """One row of the table. `loss` is None for `pairs`, which writes couplings instead of training."""

    name: str
    help: str
    loss: Callable[[TrainState, MicroBatch], torch.Tensor] | None = None
    setup: Callable[[TrainState], None] = _no_setup
    trainable: Callable[[DistillConfig, torch.nn.Module], list[torch.nn.Parameter]] = all_parameters
    #: the saved model's use, for its README: (config, guidance w, pipeline class name) -> text
    usage: Callable[[DistillConfig, float | None, str], str] = lambda cfg, w, kind: ""
    #: the student's steps in validation images
    sample_steps: Callable[[DistillConfig], int] = lambda cfg: 25


STAGE_TABLE: dict[str, Stage] = {s.name: s for s in (
    Stage("pairs", "write teacher couplings (z0, z1, prompt) as atomic shards with a manifest (resumable)"),
    Stage("reflow", "train a rectified flow (2-RF) on the couplings, initialised from the teacher",
          loss=reflow_loss,
          usage=lambda cfg, w, kind: f"{kind}, Euler, e.g. 25/4/1 steps"),
    Stage("one-step", "distil a reflowed model into a one-step student",
          loss=one_step_loss, setup=one_step_setup,
          usage=lambda cfg, w, kind: f"{kind}, {cfg.distill_k} Euler step(s) (num_inference_steps="
                                     f"{cfg.distill_k}), without classifier-free guidance",
          sample_steps=lambda cfg: cfg.distill_k),
    Stage("guidance", "LoRA guidance distillation: one conditional pass gives the CFG output",
          loss=guidance_loss, setup=guidance_setup, trainable=lora_parameters,
          usage=lambda cfg, w, kind: f"{kind} at guidance_scale 1.0 (distilled w = {w})"),
)}
