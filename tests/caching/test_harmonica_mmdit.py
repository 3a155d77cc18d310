"""HarmoniCa / FORA cache units on MMDiT transformers (SD3's joint blocks, Flux's double- and single-stream blocks)
in their stock pipelines: unit layout, all-compute bit-exactness, reuse, and refusals naming both sides."""

import pytest
import torch
from diffaccel import zoo
from diffaccel.caching import apply_cache_plan, cache_plan_counters, remove_cache_plan
from diffaccel.caching.harmonica import check_plan, fora_plan, unit_modules
from diffaccel.core import make_generators

STEPS = 4


def _pipe(name):
    pipe = zoo.load(name)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, seed=0):
    with torch.no_grad():
        return pipe(["a handwritten digit seven", "the number two"], num_inference_steps=STEPS, height=32, width=32,
                    max_sequence_length=16, generator=make_generators(seed, 2), output_type="latent").images


def _run_with_fora(pipe, interval):
    """One call's output and cache counters with a FORA plan of `interval` attached (removed afterwards)."""
    apply_cache_plan(pipe, fora_plan(STEPS, len(unit_modules(pipe.transformer)), interval, model=pipe))
    try:
        return _run(pipe), cache_plan_counters(pipe)
    finally:
        remove_cache_plan(pipe)


def test_unit_layouts():
    sd3 = [n for n, _ in unit_modules(_pipe("random-sd3").transformer)]
    # the last joint block is context_pre_only: it has no context MLP
    assert sd3 == ["transformer_blocks.0.attn", "transformer_blocks.0.ff", "transformer_blocks.0.ff_context",
                   "transformer_blocks.1.attn", "transformer_blocks.1.ff"]
    flux = [n for n, _ in unit_modules(_pipe("random-flux").transformer)]
    assert flux == ["transformer_blocks.0.attn", "transformer_blocks.0.ff", "transformer_blocks.0.ff_context",
                    "single_transformer_blocks.0.attn", "single_transformer_blocks.0.proj_mlp"]


@pytest.mark.parametrize("name", ["random-sd3", "random-flux"])
def test_all_compute_plan_is_bit_exact_in_the_stock_pipeline(name):
    pipe = _pipe(name)
    base = _run(pipe)
    out, c = _run_with_fora(pipe, 1)
    assert torch.equal(out, base)
    assert sum(c.reuses) == 0 and min(c.runs) > 0
    assert torch.equal(_run(pipe), base)


@pytest.mark.parametrize("name", ["random-sd3", "random-flux"])
def test_fora_reuses_every_unit_including_two_stream_attention(name):
    pipe = _pipe(name)
    base = _run(pipe)
    out, c = _run_with_fora(pipe, 2)
    rows = 2 if name == "random-sd3" else 1  # SD3 batches CFG rows in one call; Flux (distilled guidance) does not
    assert c.calls == STEPS and all(r > 0 for r in c.reuses), (rows, c)
    assert torch.isfinite(out).all() and not torch.equal(out, base)


def test_a_flux_plan_on_sd3_is_refused_naming_both():
    flux, sd3 = _pipe("random-flux"), _pipe("random-sd3")
    plan = fora_plan(STEPS, len(unit_modules(flux.transformer)), 2, model=flux)
    with pytest.raises(ValueError, match="made for FluxTransformer2DModel but the model is SD3Transformer2DModel"):
        check_plan(plan, sd3)
    with pytest.raises(ValueError, match="made for FluxTransformer2DModel but the model is SD3Transformer2DModel"):
        apply_cache_plan(sd3, plan)
