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


# digits-flux: a FluxTransformer2DModel on the digits-vae latents (4x8x8, packed 2x2 into 16 tokens of 16 channels),
# a tiny T5 encoder for the token sequence and digits-clip's text tower for the pooled embedding.
FLUX_MAX_SEQUENCE_LENGTH = 16  # T5 tokens per prompt; the pipeline must be called with max_sequence_length=16
T5_DIM = 64


def flux_transformer_config() -> dict:
    head_dim = 32
    return dict(
        patch_size=1,
        in_channels=4 * LATENT_CHANNELS,
        num_layers=2,  # double-stream (MMDiT) blocks
        num_single_layers=2,
        attention_head_dim=head_dim,
        num_attention_heads=4,
        joint_attention_dim=T5_DIM,
        pooled_projection_dim=TEXT_DIM,
        guidance_embeds=False,  # trained with caption dropout: true classifier-free guidance (`true_cfg_scale`)
        axes_dims_rope=(8, 12, 12),
    )


def t5_encoder_config(vocab_size: int) -> dict:
    return dict(vocab_size=vocab_size, d_model=T5_DIM, d_kv=16, d_ff=2 * T5_DIM, num_layers=2, num_heads=4,
                decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def flux_scheduler_config() -> dict:
    # FLUX.1-dev's scheduler settings: resolution-dependent ("dynamic") exponential time shift.
    return dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                base_image_seq_len=256, max_image_seq_len=4096)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build(name: str) -> nn.Module:
    """Randomly initialised network of a zoo entry (used by the trainers and by structural tests)."""
    from diffusers import (
        AutoencoderKL,
        DiTTransformer2DModel,
        FluxTransformer2DModel,
        UNet2DConditionModel,
        UNet2DModel,
    )

    torch.manual_seed(0)
    if name == "vae":
        return AutoencoderKL(**vae_config())
    if name == "ddpm":
        return UNet2DModel(**ddpm_unet_config())
    if name == "sd":
        return UNet2DConditionModel(**sd_unet_config())
    if name == "dit":
        return DiTTransformer2DModel(**dit_config())
    if name == "flux":
        return FluxTransformer2DModel(**flux_transformer_config())
    raise KeyError(name)
