"""Flux family (`FluxPipeline`): CLIP pooled + T5 text, `FluxTransformer2DModel` (double- and single-stream MMDiT
blocks) on packed 2x2 latent patches, flow matching (`FlowMatchEulerDiscreteScheduler` with dynamic shift).

Guidance is FLUX.1-dev's embedded (distilled) `guidance_scale`: one denoiser row per image. True classifier-free
guidance (`true_cfg_scale` with a negative prompt) is a second, separate denoiser call per step, in diffusers'
"uncond" cache context."""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
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

    #: call arguments of the pipeline that diffaccel's own loops honour (`own_loop_call`)
    OWN_LOOP_KWARGS: ClassVar[tuple[str, ...]] = ("height", "width", "max_sequence_length")

    @contextmanager
    def own_loop_call(self, kwargs: dict[str, Any]) -> Iterator[None]:
        """Run one of diffaccel's loops (FK steering, noise search) at the call's ``height``/``width`` (square; set
        through the pipeline's `default_sample_size` for the duration). Call arguments those loops would silently
        drop are refused, as is a T5 length other than the one `condition` encodes with."""
        from ..errors import InputError

        pipe, name = self.pipe, type(self.pipe).__name__
        extra = sorted(set(kwargs) - set(self.OWN_LOOP_KWARGS))
        if extra:
            raise InputError(f"{name}: diffaccel's own sampling loop takes {', '.join(self.OWN_LOOP_KWARGS)} besides "
                             f"the prompt, steps, guidance_scale, eta and generator; got also {', '.join(extra)}")
        length = text_length_kwargs(getattr(pipe, self.t5_tokenizer_attr, None)).get("max_sequence_length")
        asked = kwargs.get("max_sequence_length")
        if asked is not None and asked != length:
            raise InputError(f"max_sequence_length={asked}: the {self.name} loop encodes prompts with "
                             f"{length or 'the pipeline default'} T5 tokens (the T5 tokenizer's declared length)")
        height, width = kwargs.get("height"), kwargs.get("width")
        size = height if height is not None else width
        original = pipe.default_sample_size
        if size is not None:
            unit = pipe.vae_scale_factor * (2 if self.name == "flux" else 1)
            if (height is not None and width is not None and height != width) or int(size) % unit:
                raise InputError(f"height={height}, width={width}: the {self.name} loop samples square images whose "
                                 f"side is a multiple of {unit}")
            pipe.default_sample_size = int(size) // pipe.vae_scale_factor
        try:
            yield
        finally:
            pipe.default_sample_size = original


class FluxFamily(MMDiTTextFamily):
    name = "flux"
    pipeline_classes = ("FluxPipeline",)
    default_guidance = 3.5
    t5_tokenizer_attr = "tokenizer_2"
    prediction = "flow"
    row_keys = ("embeds", "pooled", "guidance")

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
        """Text embeddings of `k` rows per prompt (prompt-major; each prompt encoded once and repeated, as the
        pipeline's `num_images_per_prompt`) and the embedded guidance (when the model has it)."""
        pipe = self.pipe
        with torch.no_grad():
            embeds, pooled, text_ids = pipe.encode_prompt(prompt=[str(c) for c in conds], prompt_2=None,
                                                          device=self.device, num_images_per_prompt=k,
                                                          **text_length_kwargs(getattr(pipe, "tokenizer_2", None)))
        n = len(embeds)
        guidance = None
        if self.denoiser.config.guidance_embeds:
            guidance = torch.full((n,), self.guidance(guidance_scale), device=self.device, dtype=torch.float32)
        h, w = self._latent_hw()
        img_ids = pipe._prepare_latent_image_ids(n, h // 2, w // 2, self.device, embeds.dtype)
        return {"embeds": embeds, "pooled": pooled, "text_ids": text_ids, "img_ids": img_ids, "guidance": guidance}

    def condition_rows(self, cond: dict[str, Any]) -> tuple[str, ...]:
        """Embeddings and guidance rows; position ids only where they carry a batch dimension (older diffusers)."""
        ids = tuple(k for k in ("img_ids", "text_ids") if isinstance(cond.get(k), torch.Tensor) and cond[k].ndim == 3)
        return super().condition_rows(cond) + ids

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


    # ------------------------------------------------------------------ distillation (diffaccel.distill)
    # Couplings hold unpacked latents (C, H, W); the teacher and the student pack them as FluxPipeline does. The
    # "teacher guidance" of distillation is true classifier-free guidance against the empty prompt (a second
    # transformer call per step); FLUX.1-dev's embedded guidance, where the transformer has it, stays at the
    # pipeline default in both the teacher and the student.
    def use_vae_resolution(self) -> None:
        """Default size = the VAE's `sample_size` (digits-flux 32 px, FLUX.1 1024 px): a FluxPipeline loaded from a
        folder otherwise defaults to 1024 px whatever it was trained at."""
        self.pipe.default_sample_size = int(self.pipe.vae.config.sample_size) // self.pipe.vae_scale_factor

    def latent_shape(self) -> tuple[int, ...]:
        h, w = self._latent_hw()
        return (self.denoiser.config.in_channels // 4, h, w)

    def pack(self, z: torch.Tensor) -> torch.Tensor:
        return pack_latents(z)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self._latent_hw()
        return unpack_latents(x, h, w)

    def guided_kwargs(self, guidance_scale: float, n: int) -> dict[str, Any]:
        """True CFG against the empty prompt when `guidance_scale` > 1 (FluxPipeline's `true_cfg_scale`)."""
        w = float(guidance_scale)
        return {"true_cfg_scale": w, "negative_prompt": [""] * n} if w > 1.0 else {}

    def unguided_kwargs(self) -> dict[str, Any]:
        return text_length_kwargs(self.pipe.tokenizer_2)

    def text_rows(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """T5 hidden states and the pooled CLIP embedding of each prompt, computed as the pipeline's call does
        (without autograd, whose kernels round differently)."""
        with torch.no_grad():
            embeds, pooled, _ = self.pipe.encode_prompt(prompt=list(prompts), prompt_2=None, device=self.device,
                                                        **text_length_kwargs(self.pipe.tokenizer_2))
        return {"embeds": embeds, "pooled": pooled}

    def rf_velocity_model(self) -> torch.nn.Module:
        g = self.guidance(None) if self.denoiser.config.guidance_embeds else None
        return FluxRFVelocity(self.denoiser, guidance=g)

    def with_denoiser(self, denoiser: torch.nn.Module) -> Any:
        pipe = super().with_denoiser(denoiser)
        pipe.default_sample_size = self.pipe.default_sample_size
        return pipe


def pack_latents(z: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 · W/2, 4C): FluxPipeline's 2x2 patch packing."""
    from diffusers import FluxPipeline

    b, c, h, w = z.shape
    return FluxPipeline._pack_latents(z, b, c, h, w)


def unpack_latents(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of `pack_latents` for an (h, w) latent."""
    b, _, c4 = x.shape
    x = x.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)


class FluxRFVelocity(torch.nn.Module):
    """A Flux transformer as a rectified-flow velocity model on unpacked latents, the form distillation trains.

    Flow matching writes x_σ = (1 − σ)·x0 + σ·ε and regresses noise − x0; rectified flow writes z_s = s·z1 +
    (1 − s)·z0 with velocity z1 − z0 (Liu et al. 2022, arXiv 2209.03003, Eq. 1). With z0 = ε, z1 = x0 and σ = 1 − s
    the two are the same path and the velocities differ only in sign, so ``m(z, τ) = −T(pack(z), σ = τ/1000)``,
    with τ = 1000·(1 − s) as every student sees it: the flow teacher's transformer is already a 1-rectified flow
    and reflow starts from it unchanged. `encoder_hidden_states` is `FluxFamily.text_rows`' dict."""

    def __init__(self, transformer: torch.nn.Module, guidance: float | None = None) -> None:
        super().__init__()
        self.transformer = transformer
        self.guidance = guidance

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: dict[str, torch.Tensor]) -> torch.Tensor:
        from diffusers import FluxPipeline

        b, _, h, w = sample.shape
        x = pack_latents(sample)
        embeds, pooled = encoder_hidden_states["embeds"], encoder_hidden_states["pooled"]
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)
        txt_ids = torch.zeros(embeds.shape[1], 3, device=x.device, dtype=embeds.dtype)
        guidance = None if self.guidance is None else torch.full((b,), self.guidance, device=x.device,
                                                                 dtype=torch.float32)
        sigma = torch.as_tensor(timestep, device=x.device).reshape(-1).expand(b).to(x.dtype) / 1000
        out = self.transformer(hidden_states=x, timestep=sigma, guidance=guidance, pooled_projections=pooled,
                               encoder_hidden_states=embeds, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        return -unpack_latents(out, h, w)


def text_length_kwargs(t5_tokenizer: Any) -> dict[str, Any]:
    """`max_sequence_length` when the pipeline's T5 tokenizer declares a shorter length than the pipeline default
    (the zoo's digits-flux was trained with 16 T5 tokens and says so in its tokenizer config)."""
    limit = getattr(t5_tokenizer, "model_max_length", T5_DEFAULT_LENGTH) if t5_tokenizer is not None else None
    return {"max_sequence_length": int(limit)} if limit is not None and limit < T5_DEFAULT_LENGTH else {}
