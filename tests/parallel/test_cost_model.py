"""The patch-parallel cost model: meta-device measurement equals the real model's, predictions obey their bounds."""

from __future__ import annotations

import pytest
import torch
from diffaccel.core.flops import flop_counter
from diffaccel.parallel.cost_model import (
    Link,
    Workload,
    flux_dev_workload,
    max_speedup,
    one_device_call_s,
    predict,
    sdxl_unet_workload,
)

TINY_FLUX = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=3, attention_head_dim=8,
                 num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=12, guidance_embeds=False,
                 axes_dims_rope=(2, 2, 4))
TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
                 attention_head_dim=(2, 4), cross_attention_dim=24, norm_num_groups=8, use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=56)


def test_flux_meta_flops_equal_a_real_cpu_call():
    work = flux_dev_workload(64, 32, text_tokens=7, config=TINY_FLUX)
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(**TINY_FLUX).eval()
    n_img = (64 // 16) * (32 // 16)
    with torch.no_grad(), flop_counter() as counter:
        model(hidden_states=torch.randn(1, n_img, 16), encoder_hidden_states=torch.randn(1, 7, 24),
              pooled_projections=torch.randn(1, 12), timestep=torch.ones(1),
              img_ids=torch.zeros(n_img, 3), txt_ids=torch.zeros(7, 3))
    # FLOPs are counted from shapes only, so the same call counts the same on meta and on real CPU tensors (CPU
    # attention included, which plain FlopCounterMode misses): exact.
    assert work.flops == counter.get_total_flops()
    # Every double and single block has one joint attention; only the image tokens' K and V are exchanged.
    inner = TINY_FLUX["attention_head_dim"] * TINY_FLUX["num_attention_heads"]
    assert work.attention_layers == TINY_FLUX["num_layers"] + TINY_FLUX["num_single_layers"]
    assert work.kv_bytes == work.attention_layers * 2 * n_img * inner * 2
    assert work.replicated_fraction == pytest.approx(7 / (7 + n_img))
    assert work.halo_bytes == 0 and work.conv_layers == 0


def test_sdxl_style_unet_counts_self_attention_and_convs():
    work = sdxl_unet_workload(128, 64, batch=2, config=TINY_UNET)
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel(**TINY_UNET).eval()
    with torch.no_grad(), flop_counter() as counter:
        model(torch.randn(2, 4, 16, 8), torch.ones(2), encoder_hidden_states=torch.randn(2, 77, 24),
              added_cond_kwargs={"text_embeds": torch.randn(2, 56 - 48), "time_ids": torch.randn(2, 6)})
    assert work.flops == counter.get_total_flops()
    # Self-attention only: cross-attention K/V come from the replicated text and are never exchanged.
    self_attn = [m for n, m in model.named_modules() if n.endswith("attn1")]
    assert work.attention_layers == len(self_attn) > 0
    assert work.replicated_fraction == 0.0
    assert work.halo_bytes > 0 and work.norm_bytes > 0


def _work(r: float = 0.1) -> Workload:
    return Workload("w", 1e12, r, kv_bytes=10**9, halo_bytes=10**6, norm_bytes=10**3, attention_layers=10,
                    conv_layers=4)


def test_one_gpu_is_exactly_one():
    assert predict(_work(), 1, "pcie4", one_device_call_s=0.1).speedup == 1.0


@pytest.mark.parametrize("gpus", [2, 4, 8])
def test_infinite_bandwidth_reaches_the_compute_bound(gpus):
    ideal = Link("ideal", 1e15, 0.0)
    p = predict(_work(), gpus, ideal, one_device_call_s=0.1, mode="sync", efficiency=1.0)
    # Only the 1e9 bytes / 1e24 B/s exchange separates the two: far below float64's relative 1e-12.
    assert p.speedup == pytest.approx(max_speedup(_work(), gpus), rel=1e-9)


@pytest.mark.parametrize("gpus", [2, 4, 8])
def test_displaced_never_slower_than_sync_and_bandwidth_never_hurts(gpus):
    w = _work()
    for link in ("pcie4", "pcie5", "nvlink-h100"):
        sync = predict(w, gpus, link, one_device_call_s=0.05, mode="sync")
        disp = predict(w, gpus, link, one_device_call_s=0.05, mode="displaced")
        assert disp.speedup >= sync.speedup
        assert disp.speedup <= max_speedup(w, gpus) + 1e-12
    slow = predict(w, gpus, "pcie4", one_device_call_s=0.05, mode="sync").speedup
    fast = predict(w, gpus, "nvlink-h100", one_device_call_s=0.05, mode="sync").speedup
    assert fast > slow


@pytest.mark.parametrize("kwargs, word", [
    ({"gpus": 0}, "gpus"), ({"gpus": 2.5}, "gpus"), ({"link": "carrier-pigeon"}, "link"),
    ({"mode": "pcpp"}, "mode"), ({"efficiency": 0.0}, "efficiency"),
])
def test_bad_input_is_refused_naming_it(kwargs, word):
    args = {"gpus": 2, "link": "pcie4", "one_device_call_s": 0.1} | kwargs
    work = _work()
    with pytest.raises(ValueError, match=word):
        predict(work, args.pop("gpus"), args.pop("link"), **args)


def test_bad_sizes_and_devices_are_refused():
    with pytest.raises(ValueError, match="divisible by 16"):
        flux_dev_workload(100, 64, config=TINY_FLUX)
    with pytest.raises(ValueError, match="divisible by 64"):
        sdxl_unet_workload(100, 64, config=TINY_UNET)
    with pytest.raises(ValueError, match="unknown device"):
        one_device_call_s(_work(), "tpu", 0.5)
