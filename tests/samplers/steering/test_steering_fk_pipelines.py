"""FKSteering on stock tiny pipelines (random-sd, random-dit): equivalences, guards, errors, counters."""

import pytest
import torch
from diffaccel.core import make_generator
from diffaccel.samplers.steering.fk import FKConfig, FKSteering, X0Recorder
from diffaccel.samplers.steering.rewards import CallableReward, ConstantReward, RewardError
from tolerances import network_atol, roundoff_atol
from zoo_pipes import quiet_pipeline

PROMPTS = ["a handwritten digit seven", "a handwritten digit one"]
STEPS = 6
SCHED = dict(resample_start=1, resample_every=2, resample_end=4)  # events 1, 3, 5


@pytest.fixture(scope="module")
def sd():
    return quiet_pipeline("random-sd")


@pytest.fixture(scope="module")
def dit():
    pipe = quiet_pipeline("random-dit")
    pipe.transformer.eval()  # in train mode its label embedding drops labels with the *global* RNG
    return pipe


def pixel_mean_atol(images: torch.Tensor) -> float:
    return roundoff_atol(torch.float32, images[0].numel())  # a mean of C*H*W values in [0, 1]


def brightness(images, prompts):
    return images.mean(dim=(1, 2, 3))


@pytest.mark.parametrize("potential", ["max", "diff"])
def test_k1_equals_the_stock_pipeline(sd, potential):
    """S1: one particle is bit-identical to the stock call with the same seed, whatever the reward; same NFE."""
    fk = FKSteering(sd, CallableReward(brightness), FKConfig(num_particles=1, potential=potential, **SCHED))
    out = fk(PROMPTS, num_inference_steps=STEPS, generator=make_generator(0), output_type="pt")
    ref = sd(PROMPTS, num_inference_steps=STEPS, eta=1.0, generator=make_generator(0), output_type="pt").images
    assert torch.equal(out.images, ref)
    assert out.nfe["denoiser_calls"] == STEPS and out.nfe["denoiser_rows"] == 2 * len(PROMPTS) * STEPS
    assert out.events == [1, 3, 5] and out.ancestry.shape == (3, 2, 1)


def test_constant_reward_adaptive_equals_independent_sampling(sd):
    """S2: r ≡ c in adaptive mode never resamples: bit-identical to num_images_per_prompt = k; weights uniform."""
    fk = FKSteering(sd, ConstantReward(3.0), FKConfig(num_particles=3, adaptive=True, **SCHED))
    out = fk(PROMPTS, num_inference_steps=STEPS, generator=make_generator(1), output_type="pt")
    ref = sd(PROMPTS, num_images_per_prompt=3, num_inference_steps=STEPS, eta=1.0, generator=make_generator(1),
             output_type="pt").images
    assert torch.equal(out.images, ref)
    assert not out.resampled.any()
    assert torch.allclose(out.weights, torch.full((2, 3), 1 / 3))
    assert torch.allclose(out.ess, torch.full_like(out.ess, 3.0))


def test_steering_moves_rewards_and_counts_compute(sd):
    """S13 counters; λ large with a brightness reward: the steered mean beats unsteered particles (same noise)."""
    cfg = FKConfig(num_particles=4, potential="max", lmbda=2000.0, resampler="systematic", **SCHED)
    out = FKSteering(sd, CallableReward(brightness), cfg)(PROMPTS, num_inference_steps=STEPS,
                                                            generator=make_generator(2), output_type="pt")
    base = sd(PROMPTS, num_images_per_prompt=4, num_inference_steps=STEPS, eta=1.0, generator=make_generator(2),
              output_type="pt").images
    assert out.images.shape == base.shape == (8, 3, 16, 16)
    assert brightness(out.images, None).mean() > brightness(base, None).mean()
    # rewards of the returned particles: the mean over C*H*W pixels, summed in another blocking
    assert torch.allclose(out.rewards.reshape(-1), brightness(out.images, None), atol=pixel_mean_atol(out.images))
    rows, events = 2 * 4, 3
    assert out.nfe["denoiser_calls"] == STEPS and out.nfe["denoiser_rows"] == 2 * rows * STEPS  # CFG doubles rows
    assert out.nfe["reward_calls"] == events and out.nfe["reward_items"] == rows * events
    assert out.nfe["vae_decodes"] == rows * events + rows  # scoring decodes + the output decode
    assert out.ancestry.max() < 4 and out.ess.shape == (events, 2)
    best = out.best()
    assert best.tolist() == [int(out.rewards[0].argmax()), 4 + int(out.rewards[1].argmax())]


def test_determinism_and_resample_seed(sd):
    """S8: same seeds -> identical; another resample_seed changes ancestry only."""
    def run(seed):
        cfg = FKConfig(num_particles=4, lmbda=500.0, resample_seed=seed, **SCHED)
        return FKSteering(sd, CallableReward(brightness), cfg)(PROMPTS[:1], num_inference_steps=STEPS,
                                                                 generator=make_generator(3), output_type="pt")
    a, b, c = run(11), run(11), run(12)
    assert torch.equal(a.images, b.images) and torch.equal(a.ancestry, b.ancestry)
    assert not torch.equal(a.ancestry, c.ancestry)
    # the first event sees the same particles whatever the resampling seed: diffusion noise is untouched
    assert torch.allclose(a.ess[0], c.ess[0])


def test_dit_k1_equals_stock_and_k3_runs(dit):
    fk = FKSteering(dit, CallableReward(brightness), FKConfig(num_particles=1, allow_deterministic=True, **SCHED))
    out = fk(class_labels=[3, 5], num_inference_steps=STEPS, eta=0.0, generator=make_generator(4), output_type="pt")
    ref = dit([3, 5], num_inference_steps=STEPS, generator=make_generator(4), output_type="pt").images
    # stock steps a 2B batch (guidance halves) where k = 1 steps B rows: same arithmetic, float round-off apart
    atol = network_atol(dit.transformer, calls=STEPS) + network_atol(dit.vae.decoder)
    assert torch.allclose(out.images, ref, atol=atol)
    assert out.nfe["denoiser_calls"] == STEPS and out.nfe["denoiser_rows"] == 2 * 2 * STEPS
    out = FKSteering(dit, CallableReward(brightness), FKConfig(num_particles=3, lmbda=100.0, **SCHED))(
        class_labels=[3, 5], num_inference_steps=STEPS, generator=make_generator(4), output_type="pt")
    assert out.images.shape == (6, 3, 16, 16) and out.rewards.shape == (2, 3)
    assert torch.allclose(out.rewards.reshape(-1), brightness(out.images, None), atol=pixel_mean_atol(out.images))


def test_deterministic_and_stateful_schedulers_are_rejected(sd):
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

    fk = FKSteering(sd, CallableReward(brightness), FKConfig(num_particles=2, **SCHED))
    with pytest.raises(ValueError, match="deterministic"):
        fk(PROMPTS[:1], num_inference_steps=STEPS, eta=0.0, generator=make_generator(0))
    original = sd.scheduler
    try:
        sd.scheduler = EulerDiscreteScheduler.from_config(original.config)
        with pytest.raises(ValueError, match="deterministic"):
            fk(PROMPTS[:1], num_inference_steps=STEPS, generator=make_generator(0))
        sd.scheduler = DPMSolverMultistepScheduler.from_config(original.config)
        with pytest.raises(ValueError, match="per-row history"):
            fk(PROMPTS[:1], num_inference_steps=STEPS, generator=make_generator(0))
    finally:
        sd.scheduler = original
    fk = FKSteering(sd, CallableReward(brightness), FKConfig(num_particles=2, allow_deterministic=True, **SCHED))
    out = fk(PROMPTS[:1], num_inference_steps=STEPS, eta=0.0, generator=make_generator(0), output_type="pt")
    assert out.images.shape[0] == 2


def test_bad_rewards_are_named(sd):
    nan = CallableReward(lambda im, p: torch.full((len(im),), float("nan")), name="broken-scorer")
    with pytest.raises(RewardError, match="broken-scorer.*NaN"):
        FKSteering(sd, nan, FKConfig(num_particles=2, **SCHED))(PROMPTS[:1], num_inference_steps=STEPS,
                                                                 generator=make_generator(0))
    assert type(sd.scheduler).__name__ == "DDIMScheduler"  # the x̂0 recorder was removed after the error
    wrong = CallableReward(lambda im, p: torch.zeros(len(im), 2), name="two-columns")
    with pytest.raises(RewardError, match="two-columns.*shape"):
        FKSteering(sd, wrong, FKConfig(num_particles=2, **SCHED))(PROMPTS[:1], num_inference_steps=STEPS,
                                                                   generator=make_generator(0))
    absolute = FKConfig(num_particles=2, resample_start=20, resample_every=20, resample_end=80)  # steps, not fractions
    with pytest.raises(ValueError, match="outside the schedule"):
        FKSteering(sd, brightness, absolute)(PROMPTS[:1], num_inference_steps=STEPS)
    # nan_policy="drop": NaN particles get zero weight instead of an error
    half = CallableReward(lambda im, p: torch.tensor([float("nan"), 1.0]), name="half")
    out = FKSteering(sd, half, FKConfig(num_particles=2, nan_policy="drop", **SCHED))(
        PROMPTS[:1], num_inference_steps=STEPS, generator=make_generator(0), output_type="latent")
    assert torch.all(out.ancestry == 1)


@pytest.mark.parametrize("return_dict", [True, False])
def test_x0_recorder_forwards_both_return_paths(sd, return_dict):
    rec = X0Recorder(sd.scheduler)
    rec.set_timesteps(4)
    x, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    t = rec.timesteps[0]
    out = rec.step(eps, t, x, eta=0.0, return_dict=return_dict)
    prev = out.prev_sample if return_dict else out[0]
    ref = sd.scheduler.step(eps, t, x, eta=0.0)
    assert torch.equal(prev, ref.prev_sample) and torch.equal(rec.x0, ref.pred_original_sample)
    assert "eta" in __import__("inspect").signature(rec.step).parameters
