"""MMDiT transformers (SD3 joint blocks, Flux double- and single-stream blocks): bands of image tokens, text replicated.

Every rank runs the whole network on the image tokens of its band of latent rows plus *all* text tokens. Joint
attention takes queries from the rank's own image tokens and the text tokens, and keys/values from the text tokens
(local: every rank has them) and from the image tokens of every band, exchanged per mode exactly like the
self-attention of a DiT (`attention.PatchAttnProcessor`): sync gathers them fresh, displaced uses the other bands'
from the previous call (DistriFusion, Li et al., CVPR 2024, applied to the image half of the joint sequence), pcpp
the border rows of the neighbours. Only image keys/values travel; the text half is never sent.

* SD3 (`SD3Transformer2DModel`): the 4-D latent is cut into row bands; the patch embedding adds the band's rows of
  the full grid's cropped position table (`dit.BandPatchEmbedHook`); the model unpatchifies its band and the bands
  are gathered at the exit. Joint sequence order is [image; text].
* Flux (`FluxTransformer2DModel`): the input is already a packed token sequence (2x2 latent patches, row-major);
  the token grid comes from `img_ids` (column 1 = row, column 2 = column). Each rank keeps its contiguous slice of
  tokens and of `img_ids`, so the model's own `FluxPosEmbed` computes the rotary embedding of exactly the rank's
  positions; rotary is applied to local queries/keys before any exchange, so the keys that travel carry their
  positions. Joint order is [text; image]; single-stream blocks receive the two concatenated, so the text length is
  taken at the entry. Output tokens are gathered along the sequence.

In sync mode every rank computes bit-identical text states. In displaced/pcpp modes the text queries of different
ranks see different stale image context, so the (replicated) text stream is no longer identical across ranks; the
gathered image output stays a function of every rank's fresh band, as in DistriFusion.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb
from torch import nn

from .attention import PatchAttnProcessor
from .config import PatchParallelError
from .denoiser import FamilyAdapter
from .dit import BandPatchEmbedHook, _TransformerAdapter
from .state import PatchState
from .unet import check_common

_JOINT_PROCESSORS = {"JointAttnProcessor2_0", "FluxAttnProcessor", "FluxAttnProcessor2_0", "AttnProcessor2_0",
                     "JointPatchAttnProcessor"}
_SD3_TYPES = {"SD3Transformer2DModel", "JointTransformerBlock", "AdaLayerNormZero", "AdaLayerNormContinuous",
              "SD35AdaLayerNormZeroX", "CombinedTimestepTextProjEmbeddings", "PixArtAlphaTextProjection",
              "Attention"}
_FLUX_TYPES = {"FluxTransformer2DModel", "FluxTransformerBlock", "FluxSingleTransformerBlock", "FluxAttention",
               "FluxPosEmbed", "AdaLayerNormZero", "AdaLayerNormZeroSingle", "AdaLayerNormContinuous",
               "CombinedTimestepTextProjEmbeddings", "CombinedTimestepGuidanceTextProjEmbeddings",
               "PixArtAlphaTextProjection"}


class JointPatchAttnProcessor(PatchAttnProcessor):
    """Joint (image + text) attention on a band of image tokens; installed on every attention of an MMDiT.

    `text_first`: the joint order is [text; image] (Flux) rather than [image; text] (SD3). `text_prefix`: the text
    tokens arrive concatenated in front of the image tokens as `hidden_states` (Flux single-stream blocks; their
    count is `state.text_tokens`). The image K/V context per mode is `PatchAttnProcessor._context`; text K/V are
    appended locally. Softmax scale is SDPA's default 1/sqrt(head_dim), as in the stock joint processors.
    """

    def __init__(self, state: PatchState, name: str, layer_id: int, original: object, *, text_first: bool,
                 text_prefix: bool = False) -> None:
        super().__init__(state, name, layer_id, original)
        self.text_first, self.text_prefix = text_first, text_prefix

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: Any = None, *args,
                 **kwargs) -> Any:
        if attention_mask is not None:
            raise PatchParallelError(f"{self.name}: joint attention with a mask is not supported")
        B = hidden_states.shape[0]
        heads = attn.heads

        def split_heads(t: torch.Tensor) -> torch.Tensor:  # (B, S, heads*d) -> (B, S, heads, d)
            return t.view(B, t.shape[1], heads, -1)

        q, k, v = (split_heads(p(hidden_states)) for p in (attn.to_q, attn.to_k, attn.to_v))
        q, k = _norm(attn.norm_q, q), _norm(attn.norm_k, k)
        n_txt = self.state.text_tokens if self.text_prefix else 0
        joint = encoder_hidden_states is not None and getattr(attn, "add_q_proj", None) is not None
        if joint:
            eq, ek, ev = (split_heads(p(encoder_hidden_states)) for p in (attn.add_q_proj, attn.add_k_proj,
                                                                           attn.add_v_proj))
            eq, ek = _norm(attn.norm_added_q, eq), _norm(attn.norm_added_k, ek)
            n_txt = encoder_hidden_states.shape[1]
            parts = ((eq, q), (ek, k), (ev, v)) if self.text_first else ((q, eq), (k, ek), (v, ev))
            q, k, v = (torch.cat(p, dim=1) for p in parts)
        if image_rotary_emb is not None:  # already the rotary of [text; own band] (ids sliced at the entry)
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, S, d)
        S = k.shape[2]
        img = slice(n_txt, S) if self.text_first else slice(0, S - n_txt)
        txt = slice(0, n_txt) if self.text_first else slice(S - n_txt, S)
        kv_img = self._context(torch.stack([k[:, :, img], v[:, :, img]]), S - n_txt)
        keys = torch.cat([kv_img[0], k[:, :, txt]], dim=2)
        values = torch.cat([kv_img[1], v[:, :, txt]], dim=2)
        out = F.scaled_dot_product_attention(q, keys, values, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(B, S, -1).to(q.dtype)
        if not joint:  # Flux's processor returns single-stream outputs unprojected, SD3's projects them
            return out if self.text_first else attn.to_out[1](attn.to_out[0](out))
        out_img, out_txt = out[:, img], out[:, txt]
        out_img = attn.to_out[1](attn.to_out[0](out_img.contiguous()))
        if not getattr(attn, "context_pre_only", False) and getattr(attn, "to_add_out", None) is not None:
            out_txt = attn.to_add_out(out_txt.contiguous())
        return out_img, out_txt


def _norm(norm: nn.Module | None, t: torch.Tensor) -> torch.Tensor:
    return t if norm is None else norm(t)


def _check_attention(name: str, m: nn.Module) -> None:
    proc = type(m.processor).__name__
    if proc not in _JOINT_PROCESSORS:
        raise PatchParallelError(f"unsupported attention processor {proc} on {name}")
    if getattr(m, "fused_projections", False) or hasattr(m, "to_qkv"):
        raise PatchParallelError(f"{name}: fused QKV projections are not supported (unfuse them first)")


class SD3Adapter(_TransformerAdapter):
    """`SD3Transformer2DModel`: row bands of the 4-D latent."""

    model_class = "SD3Transformer2DModel"
    timestep_pos = 3
    refused_kwargs = ("block_controlnet_hidden_states",)

    def check_model(self, model: nn.Module) -> None:
        for name, m in model.named_modules():
            if name.startswith("pos_embed"):  # the patch embedding is replaced as a whole
                continue
            if type(m).__name__ == "Attention":
                _check_attention(name, m)
                continue
            check_common(name or "<model>", m, _SD3_TYPES)
        if type(getattr(model, "pos_embed", None)).__name__ != "PatchEmbed":
            raise PatchParallelError("SD3Transformer2DModel without a PatchEmbed input layer is not supported")

    def install(self, model: nn.Module, state: PatchState, add_hook, add_processor) -> None:
        add_hook(model.pos_embed, BandPatchEmbedHook(state))
        for layer_id, (name, m) in enumerate(model.named_modules()):
            if type(m).__name__ == "Attention":
                add_processor(m, JointPatchAttnProcessor(state, name, layer_id, m.processor, text_first=False))


class FluxAdapter(FamilyAdapter):
    """`FluxTransformer2DModel`: contiguous slices of the packed, row-major image tokens and of `img_ids`."""

    sample_arg = "hidden_states"
    timestep_pos = 3
    out_dim = 1
    cfg_batched = False  # FluxPipeline's true CFG calls the transformer twice
    refused_kwargs = ("controlnet_block_samples", "controlnet_single_block_samples", "ip_adapter_image_embeds")

    def check_model(self, model: nn.Module) -> None:
        for name, m in model.named_modules():
            if type(m).__name__ == "FluxAttention":
                _check_attention(name, m)
                continue
            check_common(name or "<model>", m, _FLUX_TYPES)

    @staticmethod
    def _ids(args: tuple, kwargs: dict) -> torch.Tensor:
        ids = kwargs.get("img_ids", args[4] if len(args) > 4 else None)
        if ids is None:
            raise PatchParallelError("FluxTransformer2DModel needs `img_ids` to place the image tokens in rows")
        return ids[0] if ids.ndim == 3 else ids

    def grid(self, sample: torch.Tensor, args: tuple, kwargs: dict) -> tuple[int, int]:
        if sample.ndim != 3:
            raise PatchParallelError(f"expected packed tokens (batch, tokens, channels) as `hidden_states`, got "
                                     f"shape {tuple(sample.shape)}")
        ids = self._ids(args, kwargs)
        rows, cols = ids[:, 1], ids[:, 2]
        width = int((rows == rows[0]).sum())
        height = sample.shape[1] // max(width, 1)
        row_major = (ids.shape[0] == sample.shape[1] and height * width == sample.shape[1]
                     and bool((rows.view(height, width) == rows.view(height, width)[:, :1]).all())
                     and bool((rows.view(height, width)[1:, 0] > rows.view(height, width)[:-1, 0]).all())
                     and bool((cols.view(height, width) == cols.view(height, width)[:1]).all()))
        if not row_major:
            raise PatchParallelError("the image tokens are not a row-major grid (img_ids column 1 = row, column "
                                     "2 = column), which row bands need")
        return height, width

    def check_latent(self, model: nn.Module, n: int, height: int, width: int) -> None:
        if n > height:
            raise PatchParallelError(f"{n} ranks per branch is more than the {height} token rows of the image")
        if height % n:
            up = (height // n + 1) * n
            raise PatchParallelError(f"token rows {height} (image height / (VAE factor x 2)) must be divisible by "
                                     f"{n} ranks; e.g. {up} token rows: image height {up}/{height} of this one")

    def enter(self, sample: torch.Tensor, state: PatchState) -> torch.Tensor:
        L = sample.shape[1] // state.n
        return sample[:, state.r * L:(state.r + 1) * L]

    def enter_arguments(self, args: tuple, kwargs: dict, state: PatchState) -> tuple[tuple, dict]:
        if len(args) > 4:
            raise PatchParallelError("pass FluxTransformer2DModel's img_ids and later arguments by keyword")
        ids = self._ids(args, kwargs)
        L = ids.shape[0] // state.n
        kwargs = {**kwargs, "img_ids": ids[state.r * L:(state.r + 1) * L]}
        ehs = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        state.text_tokens = 0 if ehs is None else ehs.shape[1]
        return args, kwargs

    def install(self, model: nn.Module, state: PatchState, add_hook, add_processor) -> None:
        for layer_id, (name, m) in enumerate(model.named_modules()):
            if type(m).__name__ == "FluxAttention":
                single = name.startswith("single_transformer_blocks")
                add_processor(m, JointPatchAttnProcessor(state, name, layer_id, m.processor, text_first=True,
                                                         text_prefix=single))
