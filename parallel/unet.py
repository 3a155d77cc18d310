"""SD-style `UNet2DConditionModel`: bands of latent rows through convs, GroupNorms and self-attention.

The full latent enters every rank; `conv_in` reads its band plus halo from it (no communication). Every other
conv with kernel height > 1 exchanges halos, every GroupNorm uses global statistics, every self-attention gathers
keys/values; cross-attention, linear layers, 1x1 convs, LayerNorms, FFNs and nearest up-sampling are per token.
The output bands are all-gathered along the height at the exit.
"""

from __future__ import annotations

from torch import nn

from .attention import PatchAttnProcessor
from .config import PatchParallelError
from .denoiser import FamilyAdapter
from .group_norm import GlobalGroupNormHook
from .halo_conv import HaloConv2dHook, check_conv
from .state import PatchState

# Module classes whose forward needs nothing from other rows (or whose spatial children get their own rule).
_PER_TOKEN = {
    "Linear", "LayerNorm", "Dropout", "SiLU", "GELU", "Mish", "Identity", "Embedding", "ModuleList", "Sequential",
    "GEGLU", "ApproximateGELU", "SwiGLU", "FeedForward", "Timesteps", "TimestepEmbedding", "RMSNorm",
    "LoRACompatibleLinear",
}
_UNET_CONTAINERS = {
    "UNet2DConditionModel", "CrossAttnDownBlock2D", "DownBlock2D", "UpBlock2D", "CrossAttnUpBlock2D",
    "UNetMidBlock2DCrossAttn", "UNetMidBlock2D", "Transformer2DModel", "BasicTransformerBlock",
}
_SELF_ATTN_PROCESSORS = {"AttnProcessor", "AttnProcessor2_0", "PatchAttnProcessor"}


def check_attention(name: str, attn: nn.Module) -> None:
    if attn.spatial_norm is not None:
        raise PatchParallelError(f"unsupported attention {name}: spatial_norm mixes rows")
    if not attn.is_cross_attention and type(attn.processor).__name__ not in _SELF_ATTN_PROCESSORS:
        raise PatchParallelError(f"unsupported self-attention processor {type(attn.processor).__name__} on {name}")


def check_common(name: str, m: nn.Module, extra: set[str]) -> None:
    """Refuse any module whose spatial behaviour we do not know (fail loudly when diffusers changes a layer)."""
    cls = type(m).__name__
    if isinstance(m, nn.Conv2d):
        check_conv(name, m)
    elif cls == "Attention":
        check_attention(name, m)
    elif cls == "BasicTransformerBlock":
        if getattr(m, "pos_embed", None) is not None:
            raise PatchParallelError(f"unsupported {name}: positional embedding inside a transformer block")
    elif cls not in _PER_TOKEN and cls not in extra and not isinstance(m, nn.GroupNorm):
        raise PatchParallelError(f"unsupported layer {name} ({cls}): patch parallelism has no rule for it")


class UNetAdapter(FamilyAdapter):
    sample_arg = "sample"

    @staticmethod
    def downsamplings(model: nn.Module) -> int:
        return sum(1 for b in model.down_blocks if getattr(b, "downsamplers", None))

    def check_model(self, model: nn.Module) -> None:
        extra = _UNET_CONTAINERS | {"ResnetBlock2D", "Downsample2D", "Upsample2D", "AvgPool2d"}
        for name, m in model.named_modules():
            cls = type(m).__name__
            check_common(name or "<model>", m, extra)
            if cls == "ResnetBlock2D" and (m.up or m.down or m.time_embedding_norm not in ("default", "scale_shift")):
                raise PatchParallelError(f"unsupported resnet {name}: up/down sampling or spatial time norm")
            if cls == "Upsample2D" and (m.use_conv_transpose or not m.interpolate):
                raise PatchParallelError(f"unsupported upsampler {name}: only nearest interpolation + conv")
            if cls == "Downsample2D" and m.use_conv and m.padding != 1:
                raise PatchParallelError(f"unsupported downsampler {name}: asymmetric padding (padding=0)")
            if cls == "AvgPool2d" and (m.kernel_size != m.stride or m.padding):
                raise PatchParallelError(f"unsupported pooling {name}")
            if cls == "Transformer2DModel" and not m.is_input_continuous:
                raise PatchParallelError(f"unsupported {name}: only continuous-input Transformer2DModel")

    def check_latent(self, model: nn.Module, n: int, height: int, width: int) -> None:
        d = 2 ** self.downsamplings(model)
        if n > height // d:
            raise PatchParallelError(f"{n} ranks per branch is more than the {height // d} rows of the deepest "
                                     f"UNet level (latent height {height}, {d}x down-sampling) can be split into")
        if height % (n * d) or width % d:
            raise PatchParallelError(f"latent height {height} must be divisible by ranks x 2^downsamplings = "
                                     f"{n}x{d} = {n * d} (and width {width} by {d}); e.g. use height "
                                     f"{(height // (n * d) + 1) * n * d}")

    def install(self, model: nn.Module, state: PatchState, add_hook, add_processor) -> None:
        layer_id = 0
        for name, m in model.named_modules():
            layer_id += 1
            if isinstance(m, nn.Conv2d) and m.kernel_size[0] > 1:
                add_hook(m, HaloConv2dHook(state, name, layer_id, entry=(name == "conv_in")))
            elif isinstance(m, nn.GroupNorm):
                add_hook(m, GlobalGroupNormHook(state, name))
            elif type(m).__name__ == "Attention" and not m.is_cross_attention:
                add_processor(m, PatchAttnProcessor(state, name, layer_id, m.processor))
