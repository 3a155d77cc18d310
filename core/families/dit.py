"""DiT family (`DiTPipeline`): class labels with null class 1000 for CFG, batched as [conditional; null],
`DiTTransformer2DModel` with learned sigma (ε is the first `in_channels` outputs), no step callback, and no
`eta`/`generator` passed to the scheduler."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .base import PipelineFamily


class DiTFamily(PipelineFamily):
    name, pipeline_classes, denoiser_attr = "dit", ("DiTPipeline",), "transformer"
    conditioning_kind, cond_kwarg, default_guidance = "class", "class_labels", 4.0
    row_keys = ("labels",)
    uncond_first = False  # [conditional; null class]
    NULL_CLASS = 1000  # what DiTPipeline uses

    def condition(self, conds: Sequence[int], k: int, guidance_scale: float) -> dict[str, Any]:
        labels = torch.tensor([int(c) for c in conds for _ in range(k)], device=self.device)
        if guidance_scale > 1:
            labels = torch.cat([labels, torch.full_like(labels, self.NULL_CLASS)])
        return {"labels": labels, "guidance_scale": guidance_scale}

    def init_latents(self, n: int, generator: Any) -> torch.Tensor:
        from diffusers.utils.torch_utils import randn_tensor

        # DiTPipeline draws its latents without multiplying by init_noise_sigma
        return randn_tensor(self.noise_shape(n), generator=generator, device=self.device, dtype=self.denoiser.dtype)

    def eps(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor = None, guidance_scale: float = 1.0,
            scheduler: Any = None) -> torch.Tensor:
        """Guided ε for the rows of `x` (`labels` from `condition`); `scheduler` defaults to the pipeline's."""
        c = self.denoiser.config.in_channels
        cfg = guidance_scale > 1
        scheduler = self.pipe.scheduler if scheduler is None else scheduler
        xin = scheduler.scale_model_input(torch.cat([x, x]) if cfg else x, t)
        ts = torch.as_tensor(t, device=x.device).reshape(-1).expand(xin.shape[0])
        return self.guide(self.pipe.transformer(xin, timestep=ts, class_labels=labels).sample[:, :c], guidance_scale)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        return (vae.decode(latents / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
