import pytest
import torch
from diffaccel import zoo
from diffaccel.core import count_nfe, make_generators, pipeline_output_to_uint8


@pytest.mark.slow
def test_shipped_one_step_student_draws_the_prompted_digits(classifier):
    """The zoo's one-step student: a RectifiedFlowPipeline, one UNet call, images of the prompted digits (the card's
    measurement is on 300 images; here 20 with a margin)."""
    from diffaccel.distill import RectifiedFlowPipeline

    pipe = zoo.load("digits-sd-onestep")
    assert isinstance(pipe, RectifiedFlowPipeline) and pipe.config.distilled_steps == 1
    pipe.set_progress_bar_config(disable=True)
    labels = [i % 10 for i in range(20)]
    with count_nfe(pipe) as nfe:
        images = pipe([zoo.caption(i) for i in labels], num_inference_steps=1, generator=make_generators(0, 20),
                      output_type="np").images
    assert nfe.calls == 1 and images.shape == (20, 32, 32, 1)
    acc = float((classifier.predict(pipeline_output_to_uint8(images)) == torch.tensor(labels)).float().mean())
    assert acc >= 0.8, acc
    card = zoo.card("digits-sd-onestep")
    assert [s["stage"] for s in card["stages"]] == ["pairs", "reflow", "pairs", "one-step"]


@pytest.mark.slow
def test_shipped_flux_one_step_student_draws_the_prompted_digits(classifier):
    """The zoo's Flux student: a FluxPipeline sampled with one transformer call and no guidance draws the prompted
    digits (the card's measurement is on 300 images; here 20 with a margin), and `one-step:digits-flux-onestep` on
    the teacher gives the student's own images."""
    from diffaccel import OneStep, accelerate

    pipe = zoo.load("digits-flux-onestep")
    assert type(pipe).__name__ == "FluxPipeline"
    pipe.set_progress_bar_config(disable=True)
    labels = [i % 10 for i in range(20)]
    prompts = [zoo.caption(i) for i in labels]
    with count_nfe(pipe) as nfe:
        images = pipe(prompts, num_inference_steps=1, generator=make_generators(0, 20), max_sequence_length=16,
                      output_type="np").images
    assert nfe.calls == 1 and images.shape == (20, 32, 32, 1)
    acc = float((classifier.predict(pipeline_output_to_uint8(images)) == torch.tensor(labels)).float().mean())
    assert acc >= 0.8, acc
    card = zoo.card("digits-flux-onestep")
    assert [s["stage"] for s in card["stages"]] == ["pairs", "reflow", "one-step"]
    assert card["distilled_steps"] == 1 and card["pipeline"] == "FluxPipeline"
    teacher = zoo.load("digits-flux")
    teacher.set_progress_bar_config(disable=True)
    kw = dict(generator=make_generators(0, 4), max_sequence_length=16, output_type="np")
    own = pipe(prompts[:4], num_inference_steps=1, **kw).images
    kw = dict(generator=make_generators(0, 4), max_sequence_length=16, output_type="np")
    with accelerate(teacher, OneStep("digits-flux-onestep")) as handle:
        got = handle(prompts[:4], **kw).images
    assert (got == own).all()
