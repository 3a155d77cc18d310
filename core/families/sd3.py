"""Stable Diffusion 3 family (`StableDiffusion3Pipeline`): two CLIP encoders and an optional T5, joint-attention
`SD3Transformer2DModel` (MMDiT: image and text streams in every block), flow matching, classifier-free guidance
batched as [unconditional; conditional]."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch

from .flux import MMDiTTextFamily, text_length_kwargs


class StableDiffusion3Family(MMDiTTextFamily):
    name = "sd3"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    default_guidance = 7.0
    t5_tokenizer_attr = "tokenizer_3"
    row_keys = ("embeds", "pooled")

    # ------------------------------------------------------------------ the loops diffaccel owns (FK, noise search)
    # They reproduce `StableDiffusion3Pipeline.__call__` at its default size (`default_sample_size *
    # vae_scale_factor`), with the empty negative prompt for guidance and no skip-layer guidance.
    def _latent_hw(self) -> tuple[int, int]:
        side = int(self.pipe.default_sample_size)
        return side, side

    def set_timesteps(self, scheduler: Any, steps: int) -> None:
        """`scheduler.set_timesteps` as the pipeline calls it (with mu from the token count under dynamic shift)."""
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        c = scheduler.config
        extra = {}
        if c.get("use_dynamic_shifting", None) and "mu" in inspect.signature(scheduler.set_timesteps).parameters:
            h, w = self._latent_hw()
            p = self.denoiser.config.patch_size
            extra["mu"] = calculate_shift((h // p) * (w // p), c.get("base_image_seq_len", 256),
                                          c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5),
                                          c.get("max_shift", 1.16))
        scheduler.set_timesteps(steps, device=self.device, **extra)

    def condition(self, conds: Sequence[str], k: int, guidance_scale: float | None = None) -> dict[str, Any]:
        """Joint text embeddings and pooled embeddings of `k` rows per prompt, [empty prompt; prompt] under CFG."""
        g = self.guidance(guidance_scale)
        cfg = g > 1.0
        with torch.no_grad():
            pos, neg, pooled, neg_pooled = self.pipe.encode_prompt(
                prompt=[str(c) for c in conds], prompt_2=None, prompt_3=None, device=self.device,
                num_images_per_prompt=k, do_classifier_free_guidance=cfg,
                **text_length_kwargs(getattr(self.pipe, self.t5_tokenizer_attr, None)))
        if cfg:
            pos, pooled = torch.cat([neg, pos]), torch.cat([neg_pooled, pooled])
        return {"embeds": pos, "pooled": pooled, "guidance_scale": g}

    def noise_shape(self, n: int) -> tuple[int, ...]:
        h, w = self._latent_hw()
        return (n, self.denoiser.config.in_channels, h, w)

    def init_latents(self, n: int, generator: Any) -> torch.Tensor:
        pipe = self.pipe
        size = int(pipe.default_sample_size * pipe.vae_scale_factor)
        return pipe.prepare_latents(n, self.denoiser.config.in_channels, size, size, self.denoiser.dtype,
                                    self.device, generator)

    def eps(self, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor = None, pooled: torch.Tensor = None,
            guidance_scale: float = 1.0, scheduler: Any = None) -> torch.Tensor:
        """The guided velocity the pipeline hands to its scheduler (`scheduler` unused: no input scaling)."""
        cfg = guidance_scale > 1.0
        self.pipe._guidance_scale = guidance_scale  # as the pipeline's __call__ records it (see the SD family)
        xin = torch.cat([x, x]) if cfg else x
        ts = torch.as_tensor(t, device=x.device).reshape(-1).expand(xin.shape[0])
        out = self.denoiser(hidden_states=xin, timestep=ts, encoder_hidden_states=embeds, pooled_projections=pooled,
                            return_dict=False)[0]
        return self.guide(out, guidance_scale)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        z = latents / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(z, return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type="pt")
