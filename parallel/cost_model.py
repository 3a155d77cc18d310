"""Cost model for patch parallelism: compute per rank plus bytes ÷ link bandwidth.

Patch parallelism (DistriFusion, Li et al., CVPR 2024) gives each of n ranks a band of 1/n of the image tokens. What
one rank pays per denoiser call:

    compute  = t1 · ((1 − r)/n + r)      t1: one-device call time; r: share of the work every rank repeats in full
                                         (the replicated text tokens of an MMDiT: r = N_txt / (N_txt + N_img))
    exchange = (KV · (n−1)/n + halo + norm) / bandwidth
               KV: the self-attention keys and values of the whole image, all layers (all-gathered every call);
               halo: the boundary rows a band sends to its neighbours for each k×k convolution (UNets);
               norm: the GroupNorm statistics (UNets).

`sync` mode waits for every exchange (call time = compute + exchange); `displaced` mode sends it asynchronously
behind the next call's computation (call time = max(compute, exchange)) after the synchronous warm-up calls.
Attention cost is linear in the number of queries, so a rank's share of a layer's work is its share of the
queries, which is why the replicated text tokens cap the speed-up of an MMDiT at 1/r whatever n is.

The FLOPs and the exchanged tensor shapes are not estimated by hand: `measure_workload` runs the real diffusers
model on the ``meta`` device (no memory, no arithmetic) under `core.flops.flop_counter` (torch's FlopCounterMode), with
forward hooks that record every attention and convolution input. The model is an upper bound: it assumes that a
1/n-sized call runs at the same efficiency as the whole one and that the link reaches `efficiency` of its nominal
bandwidth; both get worse on small per-rank work. See parallel/README.md for its predictions next to published
measurements.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.flops import flop_counter

# FLUX.1-dev transformer (black-forest-labs/FLUX.1-dev, transformer/config.json): 11.9B parameters.
FLUX_DEV_CONFIG: dict[str, Any] = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56))

# SDXL base 1.0 UNet (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json): 2.57B parameters.
SDXL_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816)


@dataclass(frozen=True)
class Link:
    """A GPU interconnect: nominal bandwidth per GPU and direction (GB/s, 1e9 bytes) and per-message latency."""

    name: str
    gb_per_s: float
    latency_us: float = 10.0


# Nominal per-direction bandwidths from the vendors' data sheets: NVLink 4 on H100 SXM is 900 GB/s per GPU in both
# directions together, NVLink 3 on A100 SXM 600 GB/s; PCIe 4.0 and 5.0 x16 carry about 32 and 64 GB/s each way.
LINKS: dict[str, Link] = {
    "nvlink-h100": Link("NVLink 4 (H100 SXM)", 450.0, 5.0),
    "nvlink-a100": Link("NVLink 3 (A100 SXM)", 300.0, 5.0),
    "pcie5": Link("PCIe 5.0 x16", 64.0, 10.0),
    "pcie4": Link("PCIe 4.0 x16", 32.0, 10.0),
}

# Dense bf16/fp16 tensor-core peaks (TFLOP/s) from the vendors' data sheets.
PEAK_TFLOPS: dict[str, float] = {"h100-sxm": 989.0, "a100-sxm": 312.0, "h200": 989.0, "l40": 181.0}


@dataclass(frozen=True)
class Workload:
    """One denoiser call of one model at one size, measured on the meta device."""

    name: str
    flops: float
    replicated_fraction: float
    kv_bytes: int
    halo_bytes: int
    norm_bytes: int
    attention_layers: int
    conv_layers: int
    details: dict[str, Any] = field(default_factory=dict, compare=False)


def measure_workload(name: str, model: torch.nn.Module, call: Callable[[torch.nn.Module], Any], *,
                     image_tokens: int | None = None, text_tokens: int = 0, dtype_bytes: int = 2) -> Workload:
    """Run ``call(model)`` under a FLOP counter with hooks on every self/joint attention, conv and GroupNorm.

    image_tokens: for a transformer whose attention sees text and image tokens in one sequence (Flux, SD3), the
        number of image tokens in that sequence (only those are split over ranks and exchanged); None for UNets,
        whose self-attention sequences are all image.
    """
    kv = halo = norm = 0
    n_attn = n_conv = 0

    def on_attention(mod: torch.nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        nonlocal kv, n_attn
        if getattr(mod, "is_cross_attention", False):
            return  # keys/values come from the (replicated) text: nothing to exchange
        hs = kwargs.get("hidden_states", args[0] if args else None)
        batch, tokens = hs.shape[0], hs.shape[1]
        img = tokens if image_tokens is None else image_tokens
        kv += 2 * batch * img * mod.to_k.out_features * dtype_bytes
        n_attn += 1

    def on_conv(mod: torch.nn.Conv2d, args: tuple, out: Any) -> None:
        nonlocal halo, n_conv
        k = mod.kernel_size[0]
        if k > 1:
            b, c, _, w = args[0].shape
            halo += 2 * (k // 2) * b * c * w * dtype_bytes  # rows to the band above and below
            n_conv += 1

    def on_norm(mod: torch.nn.GroupNorm, args: tuple, out: Any) -> None:
        nonlocal norm
        norm += 2 * mod.num_groups * args[0].shape[0] * 4  # mean and variance per group, fp32

    handles = []
    for mod in model.modules():
        if hasattr(mod, "to_k") and hasattr(mod, "to_v") and hasattr(mod, "heads"):
            handles.append(mod.register_forward_hook(on_attention, with_kwargs=True))
        elif isinstance(mod, torch.nn.Conv2d):
            handles.append(mod.register_forward_hook(on_conv))
        elif isinstance(mod, torch.nn.GroupNorm):
            handles.append(mod.register_forward_hook(on_norm))
    try:
        with flop_counter() as counter:
            call(model)
    finally:
        for h in handles:
            h.remove()
    total_tokens = (image_tokens or 0) + text_tokens
    r = text_tokens / total_tokens if image_tokens is not None and total_tokens else 0.0
    return Workload(name, float(counter.get_total_flops()), r, kv, halo, norm, n_attn, n_conv,
                    {"image_tokens": image_tokens, "text_tokens": text_tokens, "dtype_bytes": dtype_bytes})


def flux_dev_workload(height: int = 1024, width: int = 1024, text_tokens: int = 512,
                      config: dict[str, Any] | None = None) -> Workload:
    """FLUX.1-dev (or `config`) at height×width: VAE factor 8, 2×2 packing, T5 sequence `text_tokens`."""
    from diffusers import FluxTransformer2DModel

    cfg = dict(FLUX_DEV_CONFIG if config is None else config)
    if height % 16 or width % 16:
        raise ValueError(f"Flux needs height and width divisible by 16, got {height}x{width}")
    n_img = (height // 16) * (width // 16)
    with torch.device("meta"):
        model = FluxTransformer2DModel(**cfg)
        x = torch.empty(1, n_img, cfg["in_channels"])
        enc = torch.empty(1, text_tokens, cfg["joint_attention_dim"])
        pooled = torch.empty(1, cfg["pooled_projection_dim"])
        t, g = torch.ones(1), torch.ones(1)
        img_ids, txt_ids = torch.zeros(n_img, 3), torch.zeros(text_tokens, 3)

    def call(m: torch.nn.Module) -> Any:
        return m(hidden_states=x, encoder_hidden_states=enc, pooled_projections=pooled, timestep=t,
                 img_ids=img_ids, txt_ids=txt_ids, guidance=g if cfg.get("guidance_embeds") else None)

    return measure_workload(f"flux-dev {height}x{width}", model, call, image_tokens=n_img, text_tokens=text_tokens)


def sdxl_unet_workload(height: int = 2048, width: int = 2048, batch: int = 2,
                       config: dict[str, Any] | None = None) -> Workload:
    """SDXL's UNet (or `config`) at height×width; batch 2 = one image with classifier-free guidance."""
    from diffusers import UNet2DConditionModel

    cfg = dict(SDXL_UNET_CONFIG if config is None else config)
    if height % 64 or width % 64:
        raise ValueError(f"SDXL needs height and width divisible by 64, got {height}x{width}")
    with torch.device("meta"):
        model = UNet2DConditionModel(**cfg)
        x = torch.empty(batch, cfg["in_channels"], height // 8, width // 8)
        enc = torch.empty(batch, 77, cfg["cross_attention_dim"])
        text_dim = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        text_embeds = torch.empty(batch, text_dim)
        time_ids = torch.empty(batch, 6)
        t = torch.ones(batch)

    def call(m: torch.nn.Module) -> Any:
        return m(x, t, encoder_hidden_states=enc, added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids})

    return measure_workload(f"sdxl-unet {height}x{width} b{batch}", model, call)


@dataclass(frozen=True)
class Prediction:
    gpus: int
    mode: str
    link: str
    compute_ms: float
    exchange_ms: float
    call_ms: float
    speedup: float


def predict(work: Workload, gpus: int, link: Link | str, *, one_device_call_s: float, mode: str = "displaced",
            steps: int = 50, warmup_steps: int = 4, efficiency: float = 0.8) -> Prediction:
    """Predicted speed-up of a whole `steps`-call generation on `gpus` ranks over one device."""
    if isinstance(link, str):
        if link not in LINKS:
            raise ValueError(f"unknown link {link!r}; known: {', '.join(LINKS)}")
        link = LINKS[link]
    if gpus < 1 or int(gpus) != gpus:
        raise ValueError(f"gpus must be a positive integer, got {gpus!r}")
    if mode not in ("sync", "displaced"):
        raise ValueError(f"mode must be 'sync' or 'displaced', got {mode!r}")
    if not 0 < efficiency <= 1 or not one_device_call_s > 0 or steps < 1 or not 0 <= warmup_steps:
        raise ValueError("need 0 < efficiency <= 1, one_device_call_s > 0, steps >= 1 and warmup_steps >= 0")
    n, r = gpus, work.replicated_fraction
    if n == 1:
        ms = one_device_call_s * 1e3
        return Prediction(1, mode, link.name, ms, 0.0, ms, 1.0)
    compute = one_device_call_s * ((1 - r) / n + r)
    moved = work.kv_bytes * (n - 1) / n + work.halo_bytes + work.norm_bytes
    messages = work.attention_layers * (n - 1) + work.conv_layers
    exchange = moved / (link.gb_per_s * 1e9 * efficiency) + messages * link.latency_us * 1e-6
    sync_call = compute + exchange
    overlapped = max(compute, exchange)
    warm = min(warmup_steps, steps) if mode == "displaced" else steps
    total = warm * sync_call + (steps - warm) * overlapped
    call = total / steps
    return Prediction(n, mode, link.name, compute * 1e3, exchange * 1e3, call * 1e3, one_device_call_s / call)


def one_device_call_s(work: Workload, device: str, mfu: float) -> float:
    """Seconds of one call on one device at model-FLOPs utilisation `mfu` of the device's dense peak."""
    if device not in PEAK_TFLOPS:
        raise ValueError(f"unknown device {device!r}; known: {', '.join(PEAK_TFLOPS)}")
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu must be in (0, 1], got {mfu!r}")
    return work.flops / (PEAK_TFLOPS[device] * 1e12 * mfu)


def max_speedup(work: Workload, gpus: int) -> float:
    """The compute-only bound 1 / ((1 − r)/n + r): what infinite bandwidth would give."""
    return 1.0 / ((1 - work.replicated_fraction) / gpus + work.replicated_fraction)


def gigabytes(n_bytes: float) -> float:
    return n_bytes / 1e9 if math.isfinite(n_bytes) else float("nan")
