"""Configurations of the zoo's networks: the stock diffusers/transformers classes, small enough to train on a CPU."""

from __future__ import annotations

import torch
from torch import nn

from .data import IMAGE_SIZE

LATENT_CHANNELS = 4
LATENT_SIZE = IMAGE_SIZE // 4  # the VAE downsamples twice: 32 -> 8
TEXT_DIM = 64
NULL_CLASS = 1000  # DiTPipeline hard-codes class 1000 as the unconditional label


def vae_config() -> dict:
    return dict(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=16,
        sample_size=IMAGE_SIZE,
    )


def ddpm_unet_config() -> dict:
    return dict(
        sample_size=IMAGE_SIZE,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=16,
        attention_head_dim=32,
    )


def sd_unet_config() -> dict:
    # Same block layout as Stable Diffusion 1.x (cross-attention down/up blocks, cross-attention mid block),
    # three resolutions instead of four.
    return dict(
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        layers_per_block=1,
        block_out_channels=(64, 96, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def dit_config() -> dict:
    return dict(
        num_attention_heads=4,
        attention_head_dim=32,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=6,
        sample_size=LATENT_SIZE,
        patch_size=2,
        norm_type="ada_norm_zero",
        num_embeds_ada_norm=NULL_CLASS,
    )


def clip_text_config(vocab_size: int) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=TEXT_DIM,
        intermediate_size=4 * TEXT_DIM,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=TEXT_DIM,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


def clip_vision_config() -> dict:
    return dict(
        image_size=IMAGE_SIZE,
        patch_size=4,
        num_channels=3,
        hidden_size=TEXT_DIM,
        intermediate_size=4 * TEXT_DIM,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=TEXT_DIM,
    )


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build(name: str) -> nn.Module:
    """Randomly initialised network of a zoo entry (used by the trainers and by structural tests)."""
    from diffusers import AutoencoderKL, DiTTransformer2DModel, UNet2DConditionModel, UNet2DModel

    torch.manual_seed(0)
    if name == "vae":
        return AutoencoderKL(**vae_config())
    if name == "ddpm":
        return UNet2DModel(**ddpm_unet_config())
    if name == "sd":
        return UNet2DConditionModel(**sd_unet_config())
    if name == "dit":
        return DiTTransformer2DModel(**dit_config())
    raise KeyError(name)
