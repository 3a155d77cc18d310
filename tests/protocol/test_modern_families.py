"""The Flux, SD3 and SDXL families through `diffaccel.accelerate`: samplers on flow-matching pipelines, refusals of
VP-only samplers with the reason. Tiny random-weight pipelines, two steps."""

from __future__ import annotations

import pytest
import torch
from diffaccel import CompositionError, accelerate
from diffaccel.core import count_nfe, make_generators
from diffaccel.core.families import family_for
from diffaccel.zoo import load


@pytest.mark.parametrize("name, family, flow", [("random-flux", "flux", True), ("random-sd3", "sd3", True),
                                                ("random-sdxl", "sdxl", False)])
def test_modern_pipelines_have_a_family(name, family, flow):
    fam = family_for(load(name))
    assert fam.name == family and fam.flow_matching is flow
    kw = fam.call_kwargs("a digit", 2, 4)
    assert kw["prompt"] == ["a digit"] * 2 and kw["num_inference_steps"] == 4
    if flow:  # the tiny T5 tokenizers declare 16 tokens, so the family asks for exactly that many
        assert kw["max_sequence_length"] == 16


@pytest.mark.parametrize("name", ["random-flux", "random-sd3"])
def test_flow_pipelines_refuse_vp_samplers_with_the_reason(name):
    pipe = load(name)
    scheduler = pipe.scheduler
    for recipe in ("dpm++2m@8", "ddpm@8", "plms-diffusers@8"):
        with pytest.raises(CompositionError, match="variance-preserving.*flow-matching.*s-pndm"):
            accelerate(pipe, recipe)
        assert pipe.scheduler is scheduler


def test_flux_runs_the_pndm_family_and_ddim_is_flow_match_euler():
    pipe = load("random-flux")
    pipe.set_progress_bar_config(disable=True)
    kw = dict(height=32, width=32, max_sequence_length=16, output_type="latent")

    def sample(steps):
        return pipe(["a handwritten digit seven"], num_inference_steps=steps, generator=make_generators(0, 1),
                    **kw).images

    with torch.no_grad():
        ref = sample(4)
        with accelerate(pipe, "ddim@4"):
            assert torch.equal(sample(4), ref)
        with accelerate(pipe, "s-pndm@6") as h, count_nfe(pipe) as nfe:
            out = h(["a handwritten digit seven"], generator=make_generators(0, 1), **kw).images
        assert nfe.calls == 6 and torch.isfinite(out).all()


@pytest.mark.parametrize("recipe", ["fora:2:steps=4", "fora:2:steps=4:forecast=1"])
def test_fora_without_a_sampler_on_flux_counts_the_pipelines_own_steps(recipe):
    """FORA with `steps=` and no sampler keeps FluxPipeline's FlowMatch-Euler, whose `set_timesteps` needs the
    resolution shift `mu`: the plan gets the pipeline's 4 distinct steps and is obeyed (units computed at steps 0
    and 2, reused at 1 and 3)."""
    from diffaccel.caching import cache_plan_counters
    from diffaccel.caching.harmonica import attached_plan

    pipe = load("random-flux")
    pipe.set_progress_bar_config(disable=True)
    with accelerate(pipe, recipe) as h:
        plan = attached_plan(pipe)
        assert plan.num_steps == 4 and plan.forecast == (1 if "forecast" in recipe else 0)
        assert plan.scheduler_class == "FlowMatchEulerDiscreteScheduler"
        with torch.no_grad():
            out = h(["a handwritten digit seven"], num_inference_steps=4, height=32, width=32,
                    max_sequence_length=16, generator=make_generators(0, 1), output_type="latent").images
        c = cache_plan_counters(pipe)
    assert torch.isfinite(out).all()
    assert set(c.runs) == {2} and set(c.reuses) == {2}


@pytest.mark.parametrize("name", ["random-flux", "random-sd3"])
def test_fora_recipes_apply_on_shifted_flow_schedulers(name):
    """`fora:N:steps=S` counts the steps of the pipeline's scheduler, which on Flux needs the resolution shift `mu`
    (it used to raise there): fora:1 is every step computed, bit-exact; fora:2 reuses, so the output moves."""
    pipe = load(name)
    pipe.set_progress_bar_config(disable=True)

    def sample():
        return pipe(["a digit"], height=32, width=32, num_inference_steps=4, generator=make_generators(0, 1),
                    output_type="latent", max_sequence_length=16).images

    with torch.no_grad():
        ref = sample()
        with accelerate(pipe, "fora:1:steps=4"):
            assert torch.equal(sample(), ref)
        with accelerate(pipe, "fora:2:steps=4"):
            assert not torch.equal(sample(), ref)
        assert torch.equal(sample(), ref)  # removal restores


@pytest.mark.parametrize("name", ["random-flux", "random-sd3"])
def test_steering_recipes_run_on_flow_pipelines(name):
    """`fk:K` runs the pipeline's FlowMatch-Euler as its stochastic counterpart (FlowMatchSDEScheduler, eta 1) and
    equals FKSteering called directly; `best-of-n:K` keeps one image per prompt; the scheduler is restored."""
    from diffaccel.samplers.steering import ClassifierReward, FKConfig, FKSteering

    pipe = load(name)
    pipe.set_progress_bar_config(disable=True)
    scheduler = pipe.scheduler
    kw = dict(max_sequence_length=16, output_type="pt", **({"height": 32, "width": 32} if "flux" in name else {}))
    prompts = ["a handwritten digit seven", "a handwritten digit one"]
    with torch.no_grad():
        with accelerate(pipe, "fk:2:every=2:start=1:end=3:select=all") as h:
            out = h(prompts, num_inference_steps=4, generator=make_generators(0, 4), **kw)
        direct = FKSteering(pipe, ClassifierReward(), FKConfig(num_particles=2, resample_every=2, resample_start=1,
                                                               resample_end=3))(
            prompts, num_inference_steps=4, generator=make_generators(0, 4), eta=1.0, **kw)
        assert torch.equal(out.images, direct.images) and torch.equal(out.ancestry, direct.ancestry)
        assert out.images.shape[0] == 4 and out.events == [1, 3]
        # the flow `ddim` sampler is FlowMatch-Euler: FK runs it as the same stochastic counterpart
        with accelerate(pipe, "ddim@4 + fk:2:every=2:start=1:end=3:select=all") as h:
            assert torch.equal(h(prompts, generator=make_generators(0, 4), **kw).images, out.images)
        with accelerate(pipe, "best-of-n:2") as h:
            best = h(prompts, num_inference_steps=4, generator=make_generators(0, 2), **kw)
        assert best.images.shape[0] == 2 and all(s.nfe["nfe"] == 8 for s in best.searches)
    assert pipe.scheduler is scheduler
