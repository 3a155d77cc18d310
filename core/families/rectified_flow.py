"""Rectified-flow family (diffaccel's `RectifiedFlowPipeline`, e.g. the one-step student): text prompts, a
velocity `UNet2DConditionModel` integrated by Euler steps; classifier-free guidance off by default."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import PipelineFamily


class RectifiedFlowFamily(PipelineFamily):
    name, pipeline_classes, denoiser_attr = "rf", ("RectifiedFlowPipeline",), "unet"
    conditioning_kind, cond_kwarg = "text", "prompt"
    prediction = "rf"

    def text_rows(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.pipe.encode_prompt(list(prompts), self.device)
