"""Drop-in use inside stock diffusers pipelines (random-weight tiny zoo models): swap via `from_config`, honest NFE,
determinism, save/load of a pipeline that carries our scheduler."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffaccel.core import count_nfe
from diffaccel.samplers import PseudoNumericalScheduler, TimeShiftScheduler, nfe_for
from diffaccel.samplers.pndm import MIN_TRANSITIONS
from diffaccel.zoo import load
from diffusers import DDIMPipeline, DDPMPipeline, DDPMScheduler, DPMSolverMultistepScheduler

CALLS = {
    "random-ddpm": {"batch_size": 2},
    "random-sd": {"prompt": ["a handwritten digit one", "a handwritten digit two"], "guidance_scale": 3.0},
    "random-dit": {"class_labels": [1, 2]},
    "random-pixart": {"prompt": ["a handwritten digit one", "a handwritten digit two"],
                      "use_resolution_binning": False, "clean_caption": False, "height": 32, "width": 32},
}
METHODS = ["ddim", "pie", "prk", "s-pndm", "f-pndm", "plms-ldm", "fon"]


@pytest.fixture(scope="module")
def pipes():
    torch.set_num_threads(1)
    out = {}
    for name in CALLS:
        p = load(name)
        p.set_progress_bar_config(disable=True)
        for module in p.components.values():  # random zoo pipelines come back in training mode (DiT: dropout)
            if isinstance(module, torch.nn.Module):
                module.eval()
        out[name] = (p, dict(p.scheduler.config))
    return out


def generate(pipe, name, steps, seed=0):
    gens = [torch.Generator().manual_seed(seed + i) for i in range(2)]
    torch.manual_seed(seed)  # DiTPipeline does not pass `generator` to `step`: DDPM's noise uses the global RNG
    with count_nfe(pipe) as nfe:
        images = pipe(**CALLS[name], num_inference_steps=steps, generator=gens, output_type="np").images
    return images, nfe.calls


@pytest.mark.parametrize("name", list(CALLS))
@pytest.mark.parametrize("method", METHODS)
def test_pseudo_numerical_swaps_into_each_pipeline(pipes, name, method):
    pipe, config = pipes[name]
    pipe.scheduler = PseudoNumericalScheduler.from_config(config, method=method)
    steps = max(MIN_TRANSITIONS[method], 4)
    images, calls = generate(pipe, name, steps)
    assert calls == len(pipe.scheduler.timesteps) == nfe_for(method, steps)
    assert images.shape[0] == 2 and np.isfinite(images).all()
    again, _ = generate(pipe, name, steps)
    assert np.array_equal(images, again)  # same seeds, same scheduler instance -> identical images


@pytest.mark.parametrize("name", list(CALLS))
@pytest.mark.parametrize("base", ["PseudoNumericalScheduler:s-pndm", "PseudoNumericalScheduler:f-pndm",
                                  "DDIMScheduler", "DPMSolverMultistepScheduler", "DDPMScheduler"])
def test_time_shift_swaps_into_each_pipeline(pipes, name, base):
    pipe, config = pipes[name]
    cls, _, method = base.partition(":")
    extra = {"base_kwargs": {"method": method}} if method else {}
    pipe.scheduler = TimeShiftScheduler.from_config(config, base_class=cls, window=30, cutoff=300, **extra)
    images, calls = generate(pipe, name, 10)
    assert calls == len(pipe.scheduler.timesteps)
    assert np.isfinite(images).all()
    again, _ = generate(pipe, name, 10)
    assert np.array_equal(images, again)


def test_window_zero_in_a_pipeline_equals_the_base(pipes):
    pipe, config = pipes["random-sd"]
    pipe.scheduler = PseudoNumericalScheduler.from_config(config, method="s-pndm")
    plain, _ = generate(pipe, "random-sd", 8)
    pipe.scheduler = TimeShiftScheduler.wrap(pipe.scheduler, window=0, cutoff=300)
    wrapped, _ = generate(pipe, "random-sd", 8)
    assert np.array_equal(plain, wrapped)


def test_ddpm_and_ddim_pipelines_pass_their_step_kwargs(pipes):
    """DDPMPipeline passes `generator`, DDIMPipeline passes `eta`, `use_clipped_model_output`, `generator`
    (diffusers' own PNDMScheduler raises TypeError there)."""
    unet = pipes["random-ddpm"][0].unet
    ddpm = DDPMPipeline(unet=unet, scheduler=DDPMScheduler())
    ddim = DDIMPipeline(unet=unet, scheduler=DDPMScheduler())
    for pipe in (ddpm, ddim):
        pipe.set_progress_bar_config(disable=True)
        pipe.scheduler = PseudoNumericalScheduler(method="f-pndm")  # attribute swap (constructors convert)
        with count_nfe(pipe) as nfe:
            out = pipe(batch_size=1, num_inference_steps=10, generator=torch.Generator().manual_seed(0),
                       output_type="np").images
        assert nfe.calls == 19 and np.isfinite(out).all()


def test_pipeline_save_load_keeps_our_schedulers(pipes, tmp_path):
    pipe, config = pipes["random-ddpm"]
    pipe.scheduler = TimeShiftScheduler.wrap(PseudoNumericalScheduler.from_config(config, method="f-pndm"),
                                             window=20, cutoff=300)
    images, _ = generate(pipe, "random-ddpm", 6)
    pipe.save_pretrained(tmp_path)
    back = DDPMPipeline.from_pretrained(tmp_path)
    back.set_progress_bar_config(disable=True)
    assert type(back.scheduler) is TimeShiftScheduler and back.scheduler.base.method == "f-pndm"
    again, _ = generate(back, "random-ddpm", 6)
    np.testing.assert_array_equal(images, again)  # same weights, same scheduler config, same arithmetic
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(config)  # leave the shared fixture usable
