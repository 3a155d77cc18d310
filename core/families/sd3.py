"""Stable Diffusion 3 family (`StableDiffusion3Pipeline`): two CLIP encoders and an optional T5, joint-attention
`SD3Transformer2DModel` (MMDiT: image and text streams in every block), flow matching, classifier-free guidance
batched as [unconditional; conditional]."""

from __future__ import annotations

from .flux import MMDiTTextFamily


class StableDiffusion3Family(MMDiTTextFamily):
    name = "sd3"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    default_guidance = 7.0
    t5_tokenizer_attr = "tokenizer_3"
