"""The FK resampling window: fractions of the schedule by default (works at every step count), steps when ints."""

import pytest
import torch
from diffaccel import zoo
from diffaccel.core import InputError, make_generator
from diffaccel.samplers.steering.fk import FKConfig, FKSteering
from diffaccel.samplers.steering.rewards import CallableReward


@pytest.mark.parametrize("steps,events", [(100, [20, 40, 60, 80, 99]), (50, [10, 20, 30, 40, 49]),
                                          (25, [5, 10, 15, 20, 24]), (10, [2, 4, 6, 8, 9]), (2, [0, 1]), (1, [0])])
def test_default_window_is_20_to_80_percent_at_every_step_count(steps, events):
    assert FKConfig().events(steps) == events


def test_absolute_steps_still_work_and_are_checked():
    cfg = FKConfig(resample_start=20, resample_every=20, resample_end=80)  # ints: step indices (the paper's T=100)
    assert cfg.events(100) == [20, 40, 60, 80, 99]
    with pytest.raises(InputError, match="outside the schedule"):
        cfg.events(25)
    assert FKConfig(resample_start=0.5, resample_every=3, resample_end=None).events(20) == [10, 13, 16, 19]


@pytest.mark.parametrize("kw,match", [({"resample_start": 1.5}, "resample_start"), ({"resample_every": 0.0},
                                      "resample_every"), ({"resample_end": -1}, "resample_end"),
                                     ({"resample_every": True}, "resample_every"), ({"resample_start": "20"},
                                                                                    "resample_start")])
def test_bad_windows_are_refused_at_construction(kw, match):
    with pytest.raises(InputError, match=match):
        FKConfig(**kw)


@pytest.fixture(scope="module")
def dit():
    pipe = zoo.load("random-dit")
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer.eval()
    return pipe


def brightness(images, prompts):
    return images.mean(dim=(1, 2, 3))


def test_default_config_runs_at_25_steps(dit):
    """Regression: the old absolute default window 20..80 refused every run shorter than 81 steps."""
    out = FKSteering(dit, CallableReward(brightness), FKConfig(num_particles=2))(
        class_labels=[1], num_inference_steps=25, generator=make_generator(0), output_type="pt")
    assert out.events == [5, 10, 15, 20, 24] and out.images.shape[0] == 2 and torch.isfinite(out.images).all()


@pytest.mark.parametrize("labels,match", [([], "non-empty"), ([-1], r"outside the model's classes"),
                                          ([10**6], "outside the model's classes")])
def test_class_labels_are_checked_before_sampling(dit, labels, match):
    fk = FKSteering(dit, CallableReward(brightness), FKConfig(num_particles=2))
    with pytest.raises(InputError, match=match):
        fk(class_labels=labels, num_inference_steps=4)
