"""DiT / PixArt transformers: a band of token rows per rank.

Each rank receives latent rows [r*H/N, (r+1)*H/N). The patch embedding projects them and adds the matching rows of
the positional table of the *full* grid (the stock module would build a table for the band's small grid). Only
self-attention communicates. `DiTTransformer2DModel` unpatchifies assuming a square token grid, so its tokens are
gathered right after `proj_out_2`; `PixArtTransformer2DModel` unpatchifies the band itself and is gathered at the
exit like a UNet.
"""

from __future__ import annotations

import torch
from diffusers.hooks import ModelHook
from diffusers.models.embeddings import get_2d_sincos_pos_embed
from torch import nn

from .attention import PatchAttnProcessor
from .config import PatchParallelError
from .denoiser import FamilyAdapter, gather_bands
from .state import PatchState
from .unet import check_common

_TRANSFORMER_TYPES = {
    "BasicTransformerBlock", "AdaLayerNormZero", "AdaLayerNormSingle", "CombinedTimestepLabelEmbeddings",
    "LabelEmbedding", "PixArtAlphaCombinedTimestepSizeEmbeddings", "PixArtAlphaTextProjection",
}


class BandPatchEmbedHook(ModelHook):
    """`PatchEmbed` on a band: project local rows, add rows [r*h, (r+1)*h) of the full-grid sin-cos table."""

    def __init__(self, state: PatchState) -> None:
        super().__init__()
        self.state = state

    def new_forward(self, module: nn.Module, latent: torch.Tensor) -> torch.Tensor:
        H, W = self.state.full_hw
        p = module.patch_size
        hb, gh, gw = latent.shape[-2] // p, H // p, W // p
        x = module.proj(latent).flatten(2).transpose(1, 2)
        if module.layer_norm:
            x = module.norm(x)
        if module.pos_embed is None:
            return x
        if module.pos_embed_max_size:
            pos = module.cropped_pos_embed(H, W)
        elif (gh, gw) == (module.height, module.width):
            pos = module.pos_embed
        else:
            pos = get_2d_sincos_pos_embed(module.pos_embed.shape[-1], (gh, gw), base_size=module.base_size,
                                          interpolation_scale=module.interpolation_scale, device=latent.device,
                                          output_type="pt").float().unsqueeze(0)
        r = self.state.r
        pos = pos.reshape(1, gh, gw, -1)[:, r * hb:(r + 1) * hb].reshape(1, hb * gw, -1)
        return (x + pos).to(x.dtype)


class TokenGatherHook(ModelHook):
    """Gather the band tokens after the last projection, so the model's square unpatchify sees the full grid."""

    def __init__(self, state: PatchState) -> None:
        super().__init__()
        self.state = state

    def post_forward(self, module: nn.Module, output: torch.Tensor) -> torch.Tensor:
        return gather_bands(self.state, output, dim=1, layer="proj_out_2")


class _TransformerAdapter(FamilyAdapter):
    sample_arg = "hidden_states"
    model_class = ""

    def check_model(self, model: nn.Module) -> None:
        for name, m in model.named_modules():
            if type(m).__name__ == "PatchEmbed":
                continue
            if name.startswith("pos_embed."):  # the patch embedding is replaced as a whole
                continue
            check_common(name or "<model>", m, _TRANSFORMER_TYPES | {self.model_class})
            if isinstance(m, nn.Conv2d) or isinstance(m, nn.GroupNorm):
                raise PatchParallelError(f"unsupported layer {name} in a {self.model_class}: spatial conv or norm")
        pe = getattr(model, "pos_embed", None)
        if type(pe).__name__ != "PatchEmbed":
            raise PatchParallelError(f"{self.model_class} without a PatchEmbed input layer is not supported")

    def check_latent(self, model: nn.Module, n: int, height: int, width: int) -> None:
        p = model.config.patch_size
        if height % p or width % p:
            raise PatchParallelError(f"latent {height}x{width} is not divisible by the patch size {p}")
        if n > height // p:
            raise PatchParallelError(f"{n} ranks per branch is more than the {height // p} token rows of a "
                                     f"{height}-row latent with patch size {p}")
        if (height // p) % n:
            raise PatchParallelError(f"token rows {height // p} (latent height {height} / patch {p}) must be "
                                     f"divisible by {n} ranks")

    def enter(self, sample: torch.Tensor, state: PatchState) -> torch.Tensor:
        h = sample.shape[2] // state.n
        return sample[:, :, state.r * h:(state.r + 1) * h]

    def install(self, model: nn.Module, state: PatchState, add_hook, add_processor) -> None:
        add_hook(model.pos_embed, BandPatchEmbedHook(state))
        for layer_id, (name, m) in enumerate(model.named_modules()):
            if type(m).__name__ == "Attention" and not m.is_cross_attention:
                add_processor(m, PatchAttnProcessor(state, name, layer_id, m.processor))


class DiTAdapter(_TransformerAdapter):
    model_class = "DiTTransformer2DModel"
    gathers_inside = True

    def install(self, model: nn.Module, state: PatchState, add_hook, add_processor) -> None:
        super().install(model, state, add_hook, add_processor)
        add_hook(model.proj_out_2, TokenGatherHook(state))


class PixArtAdapter(_TransformerAdapter):
    model_class = "PixArtTransformer2DModel"
