"""Caches keep working across LoRA: load_lora_weights, set_adapters and fuse_lora with the hooks attached."""

from __future__ import annotations

import pytest
import torch
from diffaccel.caching import apply_branch_reuse, deepcache_plan, no_reuse_plan, remove_branch_reuse
from diffaccel.zoo import load
from diffusers import DDIMScheduler, StableDiffusionPipeline

pytest.importorskip("peft", reason="LoRA needs peft (the distill extra)")

STEPS = 4


def _pipe():
    p = load("random-sd")
    p.scheduler = DDIMScheduler.from_config(p.scheduler.config)
    p.set_progress_bar_config(disable=True)
    return p


def _run(pipe):
    return pipe(["a handwritten digit one"], generator=torch.Generator().manual_seed(0), num_inference_steps=STEPS,
                guidance_scale=3.0, output_type="pt").images


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    """A real LoRA on the UNet's attention projections (random, non-zero B so it changes the output), saved with
    diffusers' own writer."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = _pipe()
    torch.manual_seed(0)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                     init_lora_weights=False))
    folder = tmp_path_factory.mktemp("lora")
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(pipe.unet))
    return folder


def test_lora_round_trip_with_branch_reuse(lora_dir):
    plain = _pipe()
    base = _run(plain)
    plain.load_lora_weights(lora_dir, adapter_name="digits")
    with_lora = _run(plain)
    assert not torch.equal(with_lora, base)  # the adapter matters

    pipe = _pipe()
    apply_branch_reuse(pipe, no_reuse_plan(STEPS, pipe.unet))
    try:
        pipe.load_lora_weights(lora_dir, adapter_name="digits")  # hooks already attached
        assert torch.equal(_run(pipe), with_lora)  # no reuse: the same computation, exactly
        pipe.set_adapters(["digits"], adapter_weights=[0.0])
        # a zero-weight adapter adds exact zeros: the base model's images
        assert torch.allclose(_run(pipe), base, atol=1e-6)
        pipe.set_adapters(["digits"], adapter_weights=[1.0])
        pipe.fuse_lora()
        # fused weights W + BA reassociate the adapter's matmul: float32 rounding, images in [0, 1]
        assert torch.allclose(_run(pipe), with_lora, atol=1e-4)
        pipe.unfuse_lora()
    finally:
        remove_branch_reuse(pipe)
    # a reusing plan on top of the LoRA: caches still refill per generation (two generations give the same image)
    apply_branch_reuse(pipe, deepcache_plan(STEPS, pipe.unet, 2, 0))
    try:
        a, b = _run(pipe), _run(pipe)
    finally:
        remove_branch_reuse(pipe)
    assert torch.equal(a, b) and not torch.equal(a, with_lora)
