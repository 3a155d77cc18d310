"""The benchmark's sampler rows spend exactly the NFE they are labelled with."""

from __future__ import annotations

import pytest
import torch
from diffaccel.core import count_nfe
from diffaccel.samplers.bench import SAMPLERS, kwargs_tolerant, samplers_suite
from diffaccel.zoo import load
from diffusers import DDIMScheduler, DDPMPipeline, UniPCMultistepScheduler

CONFIG = dict(DDIMScheduler(clip_sample=True, set_alpha_to_one=False, steps_offset=1).config)


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("nfe", [5, 10, 20, 50])
def test_each_row_costs_exactly_its_nfe(name, nfe):
    built = SAMPLERS[name](CONFIG, nfe)
    if built is None:
        assert "F-PNDM" in name and nfe < 13  # N + 9 calls with N >= 4
        return
    sched, steps = built
    sched.set_timesteps(steps)
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    calls = 0
    for t in sched.timesteps:
        calls += 1
        x = sched.step(0.5 * x, t, x, generator=None).prev_sample
    assert calls == nfe and torch.isfinite(x).all()


def test_kwargs_tolerant_runs_unipc_in_ddpm_pipeline():
    unet = load("random-ddpm").unet.eval()
    pipe = DDPMPipeline(unet=unet, scheduler=kwargs_tolerant(UniPCMultistepScheduler)())
    pipe.set_progress_bar_config(disable=True)
    with count_nfe(pipe) as nfe:
        out = pipe(batch_size=1, num_inference_steps=6, generator=torch.Generator().manual_seed(0),
                   output_type="np").images
    assert nfe.calls == 6 and out.shape[0] == 1


def test_suite_lists_only_feasible_rows():
    names = [c.name for c in samplers_suite(10)]
    assert "digits-ddpm S-PNDM NFE10" in names and not any("F-PNDM NFE10" in n for n in names)
    assert any("digits-sd TS-F-PNDM NFE20" == c.name for c in samplers_suite(20))
