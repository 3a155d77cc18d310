"""Flux family (`FluxPipeline`): CLIP pooled + T5 text, `FluxTransformer2DModel` (double- and single-stream MMDiT
blocks) on packed 2x2 latent patches, flow matching (`FlowMatchEulerDiscreteScheduler` with dynamic shift).

Guidance is FLUX.1-dev's embedded (distilled) `guidance_scale`: one denoiser row per image. True classifier-free
guidance (`true_cfg_scale` with a negative prompt) is a second, separate denoiser call per step, in diffusers'
"uncond" cache context."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from .base import PipelineFamily

T5_DEFAULT_LENGTH = 512  # FluxPipeline's default max_sequence_length


class MMDiTTextFamily(PipelineFamily):
    """Text-to-image flow-matching MMDiT pipelines (SD3, Flux): prompts, a `transformer`, `callback_on_step_end`,
    and a T5 encoder whose tokenizer may declare a shorter length than the pipeline's default."""

    denoiser_attr = "transformer"
    conditioning_kind, cond_kwarg = "text", "prompt"
    has_step_callback = flow_matching = True
    #: the pipeline attribute holding the T5 tokenizer
    t5_tokenizer_attr: ClassVar[str] = ""

    def call_kwargs(self, cond: str | int | None, n: int, steps: int, guidance_scale: float | None = None,
                    **extra: Any) -> dict[str, Any]:
        kw = super().call_kwargs(cond, n, steps, guidance_scale)
        return {**kw, **text_length_kwargs(getattr(self.pipe, self.t5_tokenizer_attr, None)), **extra}


class FluxFamily(MMDiTTextFamily):
    name = "flux"
    pipeline_classes = ("FluxPipeline",)
    default_guidance = 3.5
    t5_tokenizer_attr = "tokenizer_2"

    def cfg_rows(self, guidance_scale: float | None) -> int:
        return 1

    # ------------------------------------------------------------------ the loops diffaccel owns (router training)
    # They reproduce `FluxPipeline.__call__` at its default size (`default_sample_size * vae_scale_factor`) with
    # embedded guidance only (no true CFG): packed 2x2 latent patches, timesteps divided by 1000, the sigma grid
    # linspace(1, 1/N, N) shifted by mu from the packed sequence length.
    @property
    def image_size(self) -> int:
        return int(self.pipe.default_sample_size * self.pipe.vae_scale_factor)

    def _latent_hw(self) -> tuple[int, int]:
        side = 2 * (self.image_size // (self.pipe.vae_scale_factor * 2))
        return side, side

    def set_timesteps(self, scheduler: Any, steps: int) -> None:
        """`scheduler.set_timesteps` as `FluxPipeline` calls it: sigmas linspace(1, 1/N, N) and the resolution shift."""
        import numpy as np
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        h, w = self._latent_hw()
        c = scheduler.config
        mu = calculate_shift((h // 2) * (w // 2), c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                             c.get("base_shift", 0.5), c.get("max_shift", 1.15))
        sigmas = None if c.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / steps, steps)
        accepted = inspect.signature(scheduler.set_timesteps).parameters
        extra = {k: v for k, v in (("sigmas", sigmas), ("mu", mu)) if k in accepted and v is not None}
        scheduler.set_timesteps(steps if "sigmas" not in extra else None, device=self.device, **extra)

    def condition(self, conds: Sequence[str], k: int, guidance_scale: float | None = None) -> dict[str, Any]:
        """Text embeddings of `k` rows per prompt (prompt-major) and the embedded guidance (when the model has it)."""
        pipe = self.pipe
        prompts = [str(c) for c in conds for _ in range(k)]
        with torch.no_grad():
            embeds, pooled, text_ids = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=self.device,
                                                          **text_length_kwargs(getattr(pipe, "tokenizer_2", None)))
        guidance = None
        if self.denoiser.config.guidance_embeds:
            guidance = torch.full((len(prompts),), self.guidance(guidance_scale), device=self.device,
                                  dtype=torch.float32)
        h, w = self._latent_hw()
        img_ids = pipe._prepare_latent_image_ids(len(prompts), h // 2, w // 2, self.device, embeds.dtype)
        return {"embeds": embeds, "pooled": pooled, "text_ids": text_ids, "img_ids": img_ids, "guidance": guidance}

    def noise_shape(self, n: int) -> tuple[int, ...]:
        h, w = self._latent_hw()
        return (n, (h // 2) * (w // 2), self.denoiser.config.in_channels)

    def init_latents(self, n: int, generator: Any) -> torch.Tensor:
        """Packed initial noise, drawn exactly as `FluxPipeline.prepare_latents` draws it."""
        pipe = self.pipe
        size = self.image_size
        latents, _ = pipe.prepare_latents(n, self.denoiser.config.in_channels // 4, size, size, self.denoiser.dtype,
                                          self.device, generator)
        return latents

    def eps(self, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor = None, pooled: torch.Tensor = None,
            text_ids: torch.Tensor = None, img_ids: torch.Tensor = None, guidance: torch.Tensor | None = None,
            scheduler: Any = None) -> torch.Tensor:
        """The velocity `FluxPipeline` hands to its scheduler for the packed latents `x` (`scheduler` unused: the
        flow schedulers need no input scaling)."""
        ts = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0]).to(x.dtype)
        return self.denoiser(hidden_states=x, timestep=ts / 1000, guidance=guidance, pooled_projections=pooled,
                             encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=img_ids,
                             return_dict=False)[0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        pipe, vae = self.pipe, self.pipe.vae
        z = pipe._unpack_latents(latents, self.image_size, self.image_size, pipe.vae_scale_factor)
        image = vae.decode(z / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type="pt")


def text_length_kwargs(t5_tokenizer: Any) -> dict[str, Any]:
    """`max_sequence_length` when the pipeline's T5 tokenizer declares a shorter length than the pipeline default
    (the zoo's digits-flux was trained with 16 T5 tokens and says so in its tokenizer config)."""
    limit = getattr(t5_tokenizer, "model_max_length", T5_DEFAULT_LENGTH) if t5_tokenizer is not None else None
    return {"max_sequence_length": int(limit)} if limit is not None and limit < T5_DEFAULT_LENGTH else {}
