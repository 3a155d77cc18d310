import pytest
import torch
from diffaccel import zoo
from diffaccel.core import count_nfe, find_denoiser, make_generators


def test_counts_unconditional_pipeline_calls():
    pipe = zoo.load("random-ddpm")
    pipe.set_progress_bar_config(disable=True)
    with count_nfe(pipe) as nfe:
        pipe(batch_size=3, num_inference_steps=4, generator=make_generators(0, 3), output_type="np")
    assert nfe.calls == 4 and nfe.rows == 12


def test_cfg_counts_one_call_per_step_with_doubled_rows():
    pipe = zoo.load("random-sd")
    pipe.set_progress_bar_config(disable=True)
    with count_nfe(pipe) as nfe:
        pipe(["a digit", "the number one"], num_inference_steps=3, guidance_scale=5.0,
             generator=make_generators(0, 2), output_type="np")
    assert nfe.calls == 3 and nfe.rows == 3 * 2 * 2


def test_hook_removed_after_context():
    pipe = zoo.load("random-dit")
    pipe.set_progress_bar_config(disable=True)
    with count_nfe(pipe) as nfe:
        pass
    pipe([1], num_inference_steps=2, generator=make_generators(0, 1), output_type="np")
    assert nfe.calls == 0
    assert find_denoiser(pipe) is pipe.transformer
    net = torch.nn.Linear(2, 2)
    assert find_denoiser(net) is net
    with pytest.raises(TypeError, match="no denoising network"):
        find_denoiser(object())
