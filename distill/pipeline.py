"""`RectifiedFlowPipeline`: text-to-image sampling of a rectified-flow UNet with Euler steps (2-RF or one-step student).

Sampling solves dz/ds = v(z, s | c) from s = 0 (noise) to s = 1 (latent) with N Euler steps, z ← z + v/N, the UNet
seeing τ = 1000·(1 − s) (Liu et al. 2022, arXiv 2209.03003, Eq. 1; InstaFlow, arXiv 2309.06380). A one-step student
computes ẑ1 = z0 + v(z0, τ = 1000 | c). Classifier-free guidance is optional (Imagen form, w = 1 is off).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..core.errors import InputError
from .objectives import rf_time_to_unet_timestep


class RectifiedFlowEulerScheduler(SchedulerMixin, ConfigMixin):
    """Euler steps in RF time: `timesteps` are the UNet times τ(s_i) for s_i = i/N, and `step` adds v·(s_{i+1} − s_i).

    Not interchangeable with diffusers' `FlowMatchEulerDiscreteScheduler`, which integrates σ = 1 − s downwards on
    a model output of noise − x0 (the opposite sign)."""

    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000):
        self.sigmas = None
        self.s = torch.tensor([0.0, 1.0])
        self.timesteps = rf_time_to_unet_timestep(self.s[:-1])
        self.num_inference_steps = 1
        self._index = 0

    @property
    def init_noise_sigma(self) -> float:
        return 1.0

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        if int(num_inference_steps) < 1:
            raise InputError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        self.num_inference_steps = int(num_inference_steps)
        self.s = torch.linspace(0.0, 1.0, self.num_inference_steps + 1, device=device)
        self.timesteps = rf_time_to_unet_timestep(self.s[:-1]) * (self.config.num_train_timesteps / 1000.0)
        self._index = 0

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True, **kwargs):
        """z_{i+1} = z_i + (s_{i+1} − s_i)·v(z_i, s_i)."""
        i = self._index
        if i >= self.num_inference_steps:
            raise RuntimeError("step() called more often than set_timesteps() allowed; call set_timesteps() again")
        ds = (self.s[i + 1] - self.s[i]).to(sample.dtype)
        prev = sample + ds * model_output.to(sample.dtype)
        self._index += 1
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)


@dataclass
class RectifiedFlowPipelineOutput(BaseOutput):
    images: list | np.ndarray | torch.Tensor


class RectifiedFlowPipeline(DiffusionPipeline):
    """A rectified-flow text-to-image pipeline: CLIP text encoder, velocity UNet, Euler in RF time, VAE decode.

    ``distilled_steps`` (stored in `model_index.json`) is K for a K-step student: asking for more steps warns, since a
    distilled student gets worse with more steps (InstaFlow authors). None for a 2-RF, which improves with steps.

    >>> pipe = RectifiedFlowPipeline.from_pretrained(folder)
    >>> images = pipe(["a handwritten digit seven"], num_inference_steps=1, output_type="np").images
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, distilled_steps: int | None = None):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
        self.register_to_config(distilled_steps=distilled_steps)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @classmethod
    def from_components(cls, pipe, unet=None, distilled_steps: int | None = None) -> RectifiedFlowPipeline:
        """Build from any pipeline holding vae/text_encoder/tokenizer/unet (e.g. the SD teacher), optionally with
        another UNet."""
        return cls(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=unet or pipe.unet,
                   scheduler=RectifiedFlowEulerScheduler(), distilled_steps=distilled_steps)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], device: torch.device | None = None) -> torch.Tensor:
        """CLIP last hidden states of prompts padded to the tokenizer's max length (as Stable Diffusion)."""
        device = device or self._execution_device
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(device))[0].to(self.unet.dtype)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (times the scaling factor) → images in [-1, 1]."""
        latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
        return self.vae.decode(latents, return_dict=False)[0]

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], num_inference_steps: int | None = None, guidance_scale: float = 1.0,
                 negative_prompt: str | list[str] | None = None, num_images_per_prompt: int = 1,
                 height: int | None = None, width: int | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 latents: torch.Tensor | None = None, output_type: str = "pil", return_dict: bool = True):
        """Generate images. `num_inference_steps` defaults to `distilled_steps` (1 for the one-step student) or 25.

        `guidance_scale` w > 1 turns on classifier-free guidance v_u + w·(v_c − v_u) (two UNet rows per step);
        w must be > 0. `latents` are the noise z0 (as drawn by Stable Diffusion from the same generators)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise InputError("prompt is empty: give at least one prompt")
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        k = self.config.distilled_steps
        steps = int(num_inference_steps if num_inference_steps is not None else (k or 25))
        if steps < 1:
            raise InputError(f"num_inference_steps must be >= 1, got {steps}")
        if k is not None and steps > k:
            warnings.warn(f"this model was distilled for {k} step(s) and gets worse with more; asked for {steps}",
                          stacklevel=2)
        if not guidance_scale > 0:
            raise InputError(f"guidance_scale must be > 0 (1.0 turns guidance off), got {guidance_scale}")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise InputError(f"output_type must be one of pil, np, pt, latent; got {output_type!r}")
        do_cfg = guidance_scale > 1.0
        if negative_prompt is not None and not do_cfg:
            raise InputError("negative_prompt needs guidance_scale > 1 (it is the unconditional branch of CFG)")
        device = self._execution_device
        n = len(prompts)
        cond = self.encode_prompt(prompts, device)
        if do_cfg:
            neg = negative_prompt if negative_prompt is not None else ""
            negs = [neg] * n if isinstance(neg, str) else [q for q in neg for _ in range(num_images_per_prompt)]
            if len(negs) != n:
                raise InputError(f"negative_prompt has {len(negs) // num_images_per_prompt} entries but prompt has "
                                 f"{n // num_images_per_prompt}")
            cond = torch.cat([self.encode_prompt(negs, device), cond])

        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        shape = (n, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        elif tuple(latents.shape) != shape:
            raise InputError(f"latents have shape {tuple(latents.shape)}, expected {shape} for {n} image(s) "
                             f"at {height}x{width}")
        latents = latents.to(device, self.unet.dtype)

        self.scheduler.set_timesteps(steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            x = torch.cat([latents, latents]) if do_cfg else latents
            v = self.unet(x, t.expand(x.shape[0]), encoder_hidden_states=cond, return_dict=False)[0]
            if do_cfg:
                v_u, v_c = v.chunk(2)
                v = v_u + guidance_scale * (v_c - v_u)
            latents = self.scheduler.step(v, t, latents, return_dict=False)[0]

        if output_type == "latent":
            images = latents
        else:
            images = self.image_processor.postprocess(self.decode_latents(latents), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return RectifiedFlowPipelineOutput(images=images)
