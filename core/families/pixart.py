"""PixArt family (`PixArtAlphaPipeline`, `PixArtSigmaPipeline`): T5 text prompts with attention masks,
`PixArtTransformer2DModel` with learned sigma, CFG batched as [unconditional; conditional], `callback_on_step_end`
absent (the pipelines take the legacy `callback`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .base import PipelineFamily


class PixArtFamily(PipelineFamily):
    name = "pixart"
    pipeline_classes = ("PixArtAlphaPipeline", "PixArtSigmaPipeline")
    denoiser_attr = "transformer"
    conditioning_kind = "text"
    default_guidance = 4.5
    forwards_step_kwargs = True
    cond_kwarg = "prompt"
    call_defaults = {"use_resolution_binning": False, "clean_caption": False}

    def condition(self, conds: Sequence[str], k: int, guidance_scale: float) -> dict[str, Any]:
        cfg = guidance_scale > 1.0
        embeds, mask, neg, neg_mask = self.pipe.encode_prompt(list(conds), cfg, num_images_per_prompt=k,
                                                              device=self.device, clean_caption=False)
        if cfg:
            embeds, mask = torch.cat([neg, embeds]), torch.cat([neg_mask, mask])
        return {"embeds": embeds, "mask": mask, "guidance_scale": guidance_scale}

    def eps(self, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor = None, mask: torch.Tensor = None,
            guidance_scale: float = 1.0) -> torch.Tensor:
        cfg = guidance_scale > 1.0
        xin = self.pipe.scheduler.scale_model_input(torch.cat([x, x]) if cfg else x, t)
        ts = torch.as_tensor(t, device=x.device).reshape(-1).expand(xin.shape[0])
        out = self.pipe.transformer(xin, encoder_hidden_states=embeds, encoder_attention_mask=mask, timestep=ts,
                                    added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                                    return_dict=False)[0]
        out = self.guide(out, guidance_scale)
        if self.denoiser.config.out_channels // 2 == x.shape[1]:  # learned sigma: keep the ε half
            out = out.chunk(2, dim=1)[0]
        return out

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        image = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type="pt")
