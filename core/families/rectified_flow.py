"""Rectified-flow family (diffaccel's `RectifiedFlowPipeline`, e.g. the one-step student): text prompts, a
velocity `UNet2DConditionModel` integrated by Euler steps; classifier-free guidance off by default."""

from __future__ import annotations

from .base import PipelineFamily


class RectifiedFlowFamily(PipelineFamily):
    name, pipeline_classes, denoiser_attr = "rf", ("RectifiedFlowPipeline",), "unet"
    conditioning_kind, cond_kwarg = "text", "prompt"
