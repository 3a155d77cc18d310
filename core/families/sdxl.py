"""SDXL family (`StableDiffusionXLPipeline`): two CLIP encoders, `UNet2DConditionModel` with SDXL's added
conditioning (pooled text embedding and size/crop ids through `added_cond_kwargs`), classifier-free guidance batched
as [unconditional; conditional], `eta`/`generator` passed to the scheduler."""

from __future__ import annotations

from .base import PipelineFamily


class StableDiffusionXLFamily(PipelineFamily):
    name, pipeline_classes, denoiser_attr = "sdxl", ("StableDiffusionXLPipeline",), "unet"
    conditioning_kind, cond_kwarg, default_guidance = "text", "prompt", 5.0
    has_step_callback = forwards_step_kwargs = True
