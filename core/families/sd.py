"""Stable Diffusion family (`StableDiffusionPipeline`): text prompts, `UNet2DConditionModel`, CFG batched as
[unconditional; conditional], `callback_on_step_end`, VAE latents."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .base import PipelineFamily


class StableDiffusionFamily(PipelineFamily):
    name, pipeline_classes, denoiser_attr = "sd", ("StableDiffusionPipeline",), "unet"
    conditioning_kind, cond_kwarg, default_guidance = "text", "prompt", 7.5
    row_keys = ("embeds",)
    has_step_callback = forwards_step_kwargs = True

    def condition(self, conds: Sequence[str], k: int, guidance_scale: float,
                  negative_prompt: str | list[str] | None = None) -> dict[str, Any]:
        cfg = guidance_scale > 1.0
        pos, neg = self.pipe.encode_prompt(list(conds), self.device, k, cfg, negative_prompt)
        return {"embeds": torch.cat([neg, pos]) if cfg else pos, "guidance_scale": guidance_scale}

    def text_rows(self, prompts: Sequence[str]) -> torch.Tensor:
        """CLIP hidden states without CFG rows (the student's `encoder_hidden_states`)."""
        return self.pipe.encode_prompt(list(prompts), self.device, 1, False)[0]

    def eps(self, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor = None,
            guidance_scale: float = 1.0) -> torch.Tensor:
        cfg = guidance_scale > 1.0
        # the pipeline's own __call__ records its guidance before its loop; hooks on the denoiser that read
        # `do_classifier_free_guidance` (the one-step student's, cfg-parallel's) must see this loop's, not a stale one
        self.pipe._guidance_scale = guidance_scale
        xin = self.pipe.scheduler.scale_model_input(torch.cat([x, x]) if cfg else x, t)
        return self.guide(self.pipe.unet(xin, t, encoder_hidden_states=embeds, return_dict=False)[0], guidance_scale)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type="pt", do_denormalize=[True] * len(image))

    def init_latents(self, n: int, generator: Any) -> torch.Tensor:
        pipe = self.pipe
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        return pipe.prepare_latents(n, pipe.unet.config.in_channels, size, size, pipe.unet.dtype, self.device,
                                    generator)
