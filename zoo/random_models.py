"""`random-*` zoo entries: stock diffusers architectures with seeded random weights, built from config only.

Tiny pipelines exercise code paths (structure, shapes, hooks) in milliseconds; the full-size networks
(SD-1.5 UNet, DiT-XL/2) give realistic FLOPs and speed where tiny models would be dominated by overhead.
"""

from __future__ import annotations

import tempfile

import torch

from ..core.errors import InputError

SEED = 0


def _tiny_vae(channels: int = 3):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=channels, out_channels=channels, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
                         latent_channels=4, norm_num_groups=8, sample_size=16)


def _tiny_clip_text():
    from transformers import CLIPTextConfig, CLIPTextModel

    from .tokenizer import build_tokenizer

    tok = build_tokenizer(tempfile.mkdtemp(prefix="diffaccel-tok-"))
    n = len(tok)
    cfg = CLIPTextConfig(vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=n - 2, eos_token_id=n - 1,
                         pad_token_id=n - 1)
    return CLIPTextModel(cfg).eval(), tok


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


def _tiny_t5():
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    pieces = ["<pad>", "</s>", "<unk>"] + [f"▁{w}" for w in
                                           ("a", "the", "digit", "handwritten", "number", "picture", "of", "cat")]
    pieces += list("abcdefghijklmnopqrstuvwxyz0123456789")
    vocab = [(p, 0.0 if i < 3 else -float(i)) for i, p in enumerate(pieces)]
    tok = T5Tokenizer(vocab=vocab, extra_ids=0)
    cfg = T5Config(vocab_size=len(pieces), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
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


BUILDERS = {
    "random-ddpm": random_ddpm,
    "random-sd": random_sd,
    "random-dit": random_dit,
    "random-pixart": random_pixart,
    "random-sd15-unet": random_sd15_unet,
    "random-dit-xl-2": random_dit_xl_2,
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
