"""Flux family (`FluxPipeline`): CLIP pooled + T5 text, `FluxTransformer2DModel` (double- and single-stream MMDiT
blocks) on packed 2x2 latent patches, flow matching (`FlowMatchEulerDiscreteScheduler` with dynamic shift).

Guidance is FLUX.1-dev's embedded (distilled) `guidance_scale`: one denoiser row per image. True classifier-free
guidance (`true_cfg_scale` with a negative prompt) is a second, separate denoiser call per step, in diffusers'
"uncond" cache context."""

from __future__ import annotations

from typing import Any

from .base import PipelineFamily

T5_DEFAULT_LENGTH = 512  # FluxPipeline's default max_sequence_length


class FluxFamily(PipelineFamily):
    name = "flux"
    pipeline_classes = ("FluxPipeline",)
    denoiser_attr = "transformer"
    conditioning_kind = "text"
    default_guidance = 3.5
    has_step_callback = True
    flow_matching = True

    def cfg_rows(self, guidance_scale: float | None) -> int:
        return 1

    def call_kwargs(self, cond: str | int | None, n: int, steps: int, guidance_scale: float | None = None,
                    **extra: Any) -> dict[str, Any]:
        kw = {"prompt": [str(cond)] * n, "num_inference_steps": steps, "guidance_scale": self.guidance(guidance_scale)}
        return {**kw, **text_length_kwargs(getattr(self.pipe, "tokenizer_2", None)), **extra}


def text_length_kwargs(t5_tokenizer: Any) -> dict[str, Any]:
    """`max_sequence_length` when the pipeline's T5 tokenizer declares a shorter length than the pipeline default
    (the zoo's digits-flux was trained with 16 T5 tokens and says so in its tokenizer config)."""
    limit = getattr(t5_tokenizer, "model_max_length", T5_DEFAULT_LENGTH) if t5_tokenizer is not None else None
    return {"max_sequence_length": int(limit)} if limit is not None and limit < T5_DEFAULT_LENGTH else {}
