"""`random-*` zoo entries: stock diffusers architectures with seeded random weights, built from config only.

Tiny pipelines exercise code paths (structure, shapes, hooks) in milliseconds; the full-size networks
(SD-1.5 UNet, DiT-XL/2) give realistic FLOPs and speed where tiny models would be dominated by overhead.
"""

from __future__ import annotations

import tempfile

import torch

from ..core.errors import InputError

SEED = 0


def _tiny_vae(channels: int = 3, **kw):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=channels, out_channels=channels, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
                         latent_channels=4, norm_num_groups=8, sample_size=16, **kw)


def _tiny_clip_text(with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from .tokenizer import build_tokenizer

    tok = build_tokenizer(tempfile.mkdtemp(prefix="diffaccel-tok-"))
    n = len(tok)
    cfg = CLIPTextConfig(vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=n - 2, eos_token_id=n - 1,
                         pad_token_id=n - 1, projection_dim=32)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(cfg).eval(), tok


def _ddim(**kw):
    from diffusers import DDIMScheduler

    base = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    base.update(kw)
    return DDIMScheduler(**base)


def random_ddpm():
    from diffusers import DDPMPipeline, UNet2DModel

    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8)
    return DDPMPipeline(unet=unet, scheduler=_ddim(beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                                                   clip_sample=True))


def random_sd():
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    text, tok = _tiny_clip_text()
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=4, norm_num_groups=8)
    return StableDiffusionPipeline(vae=_tiny_vae(), text_encoder=text, tokenizer=tok, unet=unet, scheduler=_ddim(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def random_dit():
    from diffusers import DiTPipeline, DiTTransformer2DModel

    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                num_layers=2, sample_size=8, patch_size=2, norm_type="ada_norm_zero",
                                num_embeds_ada_norm=1000)
    return DiTPipeline(transformer=dit, vae=_tiny_vae(), scheduler=_ddim(beta_schedule="linear", beta_start=1e-4,
                                                                         beta_end=0.02),
                       id2label={i: f"class{i}" for i in range(10)})


def _tiny_t5(d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    from .tokenizer import build_t5_tokenizer

    tok = build_t5_tokenizer(model_max_length=16)
    cfg = T5Config(vocab_size=len(tok), d_model=d_model, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5EncoderModel(cfg).eval(), tok


def random_pixart():
    from diffusers import PixArtAlphaPipeline, PixArtTransformer2DModel

    text, tok = _tiny_t5()
    transformer = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                           num_layers=2, sample_size=8, patch_size=2, cross_attention_dim=16,
                                           caption_channels=32, norm_type="ada_norm_single",
                                           use_additional_conditions=False)
    return PixArtAlphaPipeline(tokenizer=tok, text_encoder=text, vae=_tiny_vae(), transformer=transformer,
                               scheduler=_ddim())


def random_sd15_unet():
    """The Stable Diffusion 1.5 UNet architecture (860M parameters) with random weights; 64x64 latents = 512px."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                                block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                                attention_head_dim=8, norm_num_groups=32,
                                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


def random_dit_xl_2():
    """DiT-XL/2 at 256px (32x32x4 latents, 28 layers, 16 heads x 72, learned sigma): 675M parameters."""
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                                 num_layers=28, sample_size=32, patch_size=2, norm_type="ada_norm_zero",
                                 num_embeds_ada_norm=1000)


def random_flux():
    """A tiny FluxPipeline: 1 double-stream and 1 single-stream block, CLIP (pooled) and T5 text, 8x8x4 latents."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    text, tok = _tiny_clip_text()
    t5, t5_tok = _tiny_t5()
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
                        vae=_tiny_vae(shift_factor=0.0, scaling_factor=1.0), text_encoder=text, tokenizer=tok,
                        text_encoder_2=t5, tokenizer_2=t5_tok, transformer=transformer)


def random_sd3():
    """A tiny StableDiffusion3Pipeline: 2 joint (MMDiT) blocks, two CLIP text encoders with projection, a tiny T5."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    text, tok = _tiny_clip_text(with_projection=True)
    text_2, tok_2 = _tiny_clip_text(with_projection=True)
    t5, t5_tok = _tiny_t5(d_model=64)  # joint_attention_dim: the two CLIP hidden states (32 + 32) padded to T5's
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                        num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32,
                                        pooled_projection_dim=64, out_channels=4, pos_embed_max_size=16)
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=_tiny_vae(shift_factor=0.0, scaling_factor=1.0), text_encoder=text,
                                    tokenizer=tok, text_encoder_2=text_2, tokenizer_2=tok_2, text_encoder_3=t5,
                                    tokenizer_3=t5_tok)


def random_sdxl():
    """A tiny StableDiffusionXLPipeline: SDXL's UNet layout (text_time added conditioning) with two CLIP encoders."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    text, tok = _tiny_clip_text()
    text_2, tok_2 = _tiny_clip_text(with_projection=True)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
                                block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
                                projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64,
                                norm_num_groups=8)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    return StableDiffusionXLPipeline(vae=_tiny_vae(), text_encoder=text, text_encoder_2=text_2, tokenizer=tok,
                                     tokenizer_2=tok_2, unet=unet, scheduler=scheduler)


#: FLUX.1-dev keeps its width (24 heads x 128, T5-XXL/CLIP-L inputs) but only this many blocks (real: 19 and 38), so
#: that the fp32 weights (~5 GB) fit a 24 GB machine; benchmarks scale per-block times to the real depth.
FLUX_DEV_BLOCKS = (2, 4)
FLUX_DEV_REAL_BLOCKS = (19, 38)


def random_flux_dev():
    """The FLUX.1-dev transformer at full width with 2 double-stream and 4 single-stream blocks (~1.3B parameters)."""
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=FLUX_DEV_BLOCKS[0],
                                  num_single_layers=FLUX_DEV_BLOCKS[1], attention_head_dim=128,
                                  num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                                  guidance_embeds=True, axes_dims_rope=(16, 56, 56))


def random_sd3_medium():
    """Stable Diffusion 3 Medium's transformer, full config (24 joint blocks, 24 heads x 64; ~2B parameters)."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                                 num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                                 pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)


def random_sdxl_unet():
    """The SDXL base UNet, full config (2.6B parameters); 128x128 latents = 1024px."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                                block_out_channels=(320, 640, 1280),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                                cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
                                norm_num_groups=32)


BUILDERS = {
    "random-ddpm": random_ddpm,
    "random-sd": random_sd,
    "random-dit": random_dit,
    "random-pixart": random_pixart,
    "random-sd15-unet": random_sd15_unet,
    "random-dit-xl-2": random_dit_xl_2,
    "random-flux": random_flux,
    "random-sd3": random_sd3,
    "random-sdxl": random_sdxl,
    "random-flux-dev": random_flux_dev,
    "random-sd3-medium": random_sd3_medium,
    "random-sdxl-unet": random_sdxl_unet,
}


def build_random(name: str):
    """Build a `random-*` entry with weights fixed by a seed (the same tensors on every machine)."""
    if name not in BUILDERS:
        raise InputError(f"unknown random zoo entry {name!r}; valid: {', '.join(BUILDERS)}")
    state = torch.random.get_rng_state()
    torch.manual_seed(SEED)
    try:
        built = BUILDERS[name]()
    finally:
        torch.random.set_rng_state(state)
    # Inference objects: eval mode everywhere (DiT's label embedding would otherwise drop class labels at random).
    modules = built.components.values() if hasattr(built, "components") else [built]
    for m in modules:
        if isinstance(m, torch.nn.Module):
            m.eval()
    return built
