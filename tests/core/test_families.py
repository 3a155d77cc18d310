"""The family layer: adapters found by pipeline class, one `find_denoiser`, call arguments, the loop operations
(`condition`, `init_latents`, `eps`, `decode`) reproducing each stock pipeline, and the scheduler capability table."""

from __future__ import annotations

import pytest
import torch
from diffaccel.core import families, make_generators
from diffaccel.core.families import (
    DDPMFamily,
    DiTFamily,
    PipelineFamily,
    PixArtFamily,
    StableDiffusionFamily,
    family_for,
    find_denoiser,
    register_family,
    step_kwargs,
)
from diffaccel.core.schedulers import TIME_SHIFT_BASES, is_stochastic, keeps_history, supports_time_shift
from tolerances import network_atol
from zoo_pipes import quiet_pipeline

CASES = {"random-ddpm": (DDPMFamily, None), "random-sd": (StableDiffusionFamily, "a handwritten digit 3"),
         "random-dit": (DiTFamily, 3), "random-pixart": (PixArtFamily, "a red square")}


@pytest.mark.parametrize("name", list(CASES))
def test_adapter_denoiser_and_call_kwargs(name):
    pipe = quiet_pipeline(name)
    cls, cond = CASES[name]
    fam = family_for(pipe)
    assert type(fam) is cls and fam.denoiser is find_denoiser(pipe) is getattr(pipe, cls.denoiser_attr)
    kw = fam.call_kwargs(cond, 2, 3)
    assert kw["num_inference_steps"] == 3
    assert ("guidance_scale" in kw) == (cls.default_guidance is not None)
    if cls.cond_kwarg is not None:
        assert len(kw[cls.cond_kwarg]) == 2
    with torch.no_grad():
        out = pipe(**kw, generator=make_generators(0, 2), output_type="pt")
    assert len(out.images) == 2


def _loop(pipe, cond, steps: int, guidance: float | None, seed: int) -> torch.Tensor:
    """Generate with the family's operations and the pipeline's scheduler (as FK / noise search do)."""
    fam = family_for(pipe)
    gen = torch.Generator().manual_seed(seed)
    scheduler = pipe.scheduler
    scheduler.set_timesteps(steps)
    x = fam.init_latents(1, gen)
    extra = fam.condition([cond], 1, guidance) if guidance is not None else {}
    for t in scheduler.timesteps:
        x = scheduler.step(fam.eps(x, t, **extra), t, x, **step_kwargs(scheduler, 0.0, gen)).prev_sample
    return fam.decode(x)


@pytest.mark.parametrize("name", ["random-ddpm", "random-sd", "random-dit", "random-pixart"])
def test_family_operations_reproduce_the_pipeline(name):
    """`condition` + `init_latents` + `eps` + `decode` through the pipeline's own scheduler give the pipeline's
    images. Tolerance: the same operations, but the pipelines batch and broadcast timesteps differently, so the
    denoiser's sums may be grouped differently on each of the 3 calls (plus the decoder)."""
    pipe = quiet_pipeline(name)
    cls, cond = CASES[name]
    fam = family_for(pipe)
    guidance = fam.guidance(None)
    kw = fam.call_kwargs(cond, 1, 3)
    with torch.no_grad():
        ref = pipe(**kw, generator=torch.Generator().manual_seed(7), output_type="pt").images
        got = _loop(pipe, cond, 3, guidance, 7)
    ref = torch.as_tensor(ref).float()
    atol = network_atol(fam.denoiser, calls=3) + network_atol(getattr(pipe, "vae", fam.denoiser))
    torch.testing.assert_close(got.float().cpu(), ref.cpu(), rtol=0, atol=atol)


def test_find_denoiser_and_unknown_pipelines():
    net = torch.nn.Linear(2, 2)
    assert find_denoiser(net) is net
    with pytest.raises(TypeError, match="no denoising network"):
        find_denoiser(object())
    with pytest.raises(TypeError, match="not a supported pipeline; supported: StableDiffusionPipeline"):
        family_for(object())


def test_register_family_refuses_incomplete_or_duplicate_names():
    class Nameless(PipelineFamily):
        pass

    with pytest.raises(ValueError, match="must set"):
        register_family(Nameless)

    class Other(PipelineFamily):
        name, pipeline_classes = "sd", ("OtherPipeline",)

    with pytest.raises(ValueError, match="already registered"):
        register_family(Other)
    assert families.FAMILIES["sd"] is StableDiffusionFamily


def test_scheduler_capability_table():
    from diffaccel.samplers import PseudoNumericalScheduler, TimeShiftScheduler
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, PNDMScheduler

    ddim = DDIMScheduler()
    assert is_stochastic(ddim, eta=1.0) is True and is_stochastic(ddim, eta=0.0) is False
    assert is_stochastic(DDPMScheduler()) is True and not keeps_history(DDPMScheduler())
    assert is_stochastic(DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")) is True
    assert keeps_history(PseudoNumericalScheduler()) and keeps_history(PNDMScheduler())
    assert supports_time_shift(ddim) and not supports_time_shift(PNDMScheduler())
    wrapped = TimeShiftScheduler.wrap(ddim, window=0, cutoff=300)
    assert is_stochastic(wrapped, eta=1.0) is True and supports_time_shift(wrapped)
    assert "PseudoNumericalScheduler" in TIME_SHIFT_BASES and "PNDMScheduler" not in TIME_SHIFT_BASES
