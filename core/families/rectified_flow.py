"""Rectified-flow family (diffaccel's `RectifiedFlowPipeline`, e.g. the one-step student): text prompts, a
velocity `UNet2DConditionModel` integrated by Euler steps; classifier-free guidance off by default."""

from __future__ import annotations

from typing import Any

from .base import PipelineFamily


class RectifiedFlowFamily(PipelineFamily):
    name = "rf"
    pipeline_classes = ("RectifiedFlowPipeline",)
    denoiser_attr = "unet"
    conditioning_kind = "text"
    default_guidance = None

    def call_kwargs(self, cond: str | int | None, n: int, steps: int, guidance_scale: float | None = None,
                    **extra: Any) -> dict[str, Any]:
        return {"prompt": [str(cond)] * n, "num_inference_steps": steps, **extra}
