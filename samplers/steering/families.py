"""Per-family access to a stock pipeline's components for the sampling loops we own (one class per family).

Each adapter exposes the same four operations on the pipeline's *own* modules — no copy of the pipeline:
`conditioning` (prompt/class encoding, CFG-ready), `init_latents`, `eps` (one denoiser call with CFG, the ε the
pipeline would hand to its scheduler) and `decode` (latents -> float images in [0, 1], what the pipeline returns with
``output_type="pt"``). `StableDiffusionPipeline` and `DiTPipeline` are supported.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor


class SDFamily:
    """`StableDiffusionPipeline`: text prompts, UNet with batched CFG (uncond first, as the pipeline)."""

    def __init__(self, pipe) -> None:
        self.pipe = pipe

    @property
    def device(self) -> torch.device:
        return self.pipe._execution_device

    def conditioning(self, prompts: Sequence[str], k: int, guidance_scale: float,
                     negative_prompt: str | list[str] | None = None) -> dict[str, Any]:
        cfg = guidance_scale > 1.0
        pos, neg = self.pipe.encode_prompt(list(prompts), self.device, k, cfg, negative_prompt)
        return {"embeds": torch.cat([neg, pos]) if cfg else pos, "guidance_scale": guidance_scale}

    def init_latents(self, n: int, generator, height: int | None = None, width: int | None = None) -> torch.Tensor:
        pipe = self.pipe
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        return pipe.prepare_latents(n, pipe.unet.config.in_channels, height or size, width or size,
                                    pipe.unet.dtype, self.device, generator)

    def noise_shape(self, n: int) -> tuple[int, ...]:
        cfg = self.pipe.unet.config
        return (n, cfg.in_channels, cfg.sample_size, cfg.sample_size)

    def eps(self, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, guidance_scale: float) -> torch.Tensor:
        cfg = guidance_scale > 1.0
        xin = self.pipe.scheduler.scale_model_input(torch.cat([x, x]) if cfg else x, t)
        out = self.pipe.unet(xin, t, encoder_hidden_states=embeds, return_dict=False)[0]
        if cfg:
            uncond, cond = out.chunk(2)
            out = uncond + guidance_scale * (cond - uncond)
        return out

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type="pt", do_denormalize=[True] * len(image))


class DiTFamily:
    """`DiTPipeline`: class labels, null class 1000 for CFG and ε taken from the first `in_channels` outputs."""

    NULL_CLASS = 1000  # what DiTPipeline uses

    def __init__(self, pipe) -> None:
        self.pipe = pipe

    @property
    def device(self) -> torch.device:
        return self.pipe._execution_device

    def prompts_for(self, class_labels: Sequence[int]) -> list[str]:
        names = {int(v): k for k, v in getattr(self.pipe, "labels", {}).items()}
        return [names.get(int(c), str(int(c))) for c in class_labels]

    def conditioning(self, class_labels: Sequence[int], k: int, guidance_scale: float) -> dict[str, Any]:
        labels = torch.tensor([int(c) for c in class_labels for _ in range(k)], device=self.device)
        if guidance_scale > 1:
            labels = torch.cat([labels, torch.full_like(labels, self.NULL_CLASS)])
        return {"labels": labels, "guidance_scale": guidance_scale}

    def init_latents(self, n: int, generator, height: int | None = None, width: int | None = None) -> torch.Tensor:
        cfg = self.pipe.transformer.config
        size = cfg.sample_size
        return randn_tensor((n, cfg.in_channels, size, size), generator=generator, device=self.device,
                            dtype=self.pipe.transformer.dtype)

    def noise_shape(self, n: int) -> tuple[int, ...]:
        cfg = self.pipe.transformer.config
        return (n, cfg.in_channels, cfg.sample_size, cfg.sample_size)

    def eps(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, guidance_scale: float) -> torch.Tensor:
        c = self.pipe.transformer.config.in_channels
        cfg = guidance_scale > 1
        xin = self.pipe.scheduler.scale_model_input(torch.cat([x, x]) if cfg else x, t)
        ts = torch.as_tensor(t, device=x.device).reshape(-1).expand(xin.shape[0])
        out = self.pipe.transformer(xin, timestep=ts, class_labels=labels).sample[:, :c]
        if cfg:
            cond, uncond = out.chunk(2)
            out = uncond + guidance_scale * (cond - uncond)
        return out

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        return (vae.decode(latents / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)


def family_for(pipe) -> SDFamily | DiTFamily:
    """The adapter for `pipe`; other pipelines raise (add one class per family)."""
    from diffusers import DiTPipeline, StableDiffusionPipeline

    if isinstance(pipe, StableDiffusionPipeline):
        return SDFamily(pipe)
    if isinstance(pipe, DiTPipeline):
        return DiTFamily(pipe)
    raise TypeError(f"{type(pipe).__name__} is not supported; supported: StableDiffusionPipeline, DiTPipeline")


def step_kwargs(scheduler, eta: float, generator) -> dict[str, Any]:
    """`eta` and `generator` for `scheduler.step` where it accepts them (as diffusers' prepare_extra_step_kwargs)."""
    params = inspect.signature(scheduler.step).parameters
    out: dict[str, Any] = {}
    if "eta" in params:
        out["eta"] = eta
    if "generator" in params:
        out["generator"] = generator
    return out
