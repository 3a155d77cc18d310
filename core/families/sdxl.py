"""SDXL family (`StableDiffusionXLPipeline`): two CLIP encoders, `UNet2DConditionModel` with SDXL's added
conditioning (pooled text embedding and size/crop ids through `added_cond_kwargs`), classifier-free guidance batched
as [unconditional; conditional], `eta`/`generator` passed to the scheduler."""

from __future__ import annotations

from typing import Any

from .base import PipelineFamily


class StableDiffusionXLFamily(PipelineFamily):
    name = "sdxl"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    denoiser_attr = "unet"
    conditioning_kind = "text"
    default_guidance = 5.0
    has_step_callback = True
    forwards_step_kwargs = True

    def call_kwargs(self, cond: str | int | None, n: int, steps: int, guidance_scale: float | None = None,
                    **extra: Any) -> dict[str, Any]:
        return {"prompt": [str(cond)] * n, "num_inference_steps": steps,
                "guidance_scale": self.guidance(guidance_scale), **extra}
