"""Stable Diffusion 3 family (`StableDiffusion3Pipeline`): two CLIP encoders and an optional T5, joint-attention
`SD3Transformer2DModel` (MMDiT: image and text streams in every block), flow matching, classifier-free guidance
batched as [unconditional; conditional]."""

from __future__ import annotations

from typing import Any

from .base import PipelineFamily
from .flux import text_length_kwargs


class StableDiffusion3Family(PipelineFamily):
    name = "sd3"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    denoiser_attr = "transformer"
    conditioning_kind = "text"
    default_guidance = 7.0
    has_step_callback = True
    flow_matching = True

    def call_kwargs(self, cond: str | int | None, n: int, steps: int, guidance_scale: float | None = None,
                    **extra: Any) -> dict[str, Any]:
        kw = {"prompt": [str(cond)] * n, "num_inference_steps": steps, "guidance_scale": self.guidance(guidance_scale)}
        return {**kw, **text_length_kwargs(getattr(self.pipe, "tokenizer_3", None)), **extra}
