"""DDPM family (`DDPMPipeline`): an unconditional pixel-space `UNet2DModel`; no guidance, no step callback; the
pipeline passes `generator` to `scheduler.step`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .base import PipelineFamily


class DDPMFamily(PipelineFamily):
    name = "ddpm"
    pipeline_classes = ("DDPMPipeline",)
    denoiser_attr = "unet"
    conditioning_kind = "none"
    default_guidance = None
    forwards_step_kwargs = True

    def condition(self, conds: Sequence[Any], k: int, guidance_scale: float) -> dict[str, Any]:
        return {}

    def init_latents(self, n: int, generator: Any) -> torch.Tensor:
        from diffusers.utils.torch_utils import randn_tensor

        # DDPMPipeline draws its image noise without multiplying by init_noise_sigma
        return randn_tensor(self.noise_shape(n), generator=generator, device=self.device, dtype=self.denoiser.dtype)

    def eps(self, x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        return self.pipe.unet(self.pipe.scheduler.scale_model_input(x, t), t).sample

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents / 2 + 0.5).clamp(0, 1)
