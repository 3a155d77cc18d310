"""FK steering and noise search on flow-matching pipelines (random-flux, random-sd3): equivalences with the stock
pipelines, particles carrying their conditioning, the VP/flow guards and bad inputs."""

import math

import pytest
import torch
from diffaccel.core import make_generator
from diffaccel.core.errors import InputError
from diffaccel.core.families import family_for
from diffaccel.samplers.flow_sde import FlowMatchSDEScheduler
from diffaccel.samplers.steering.fk import FKConfig, FKSteering, sample_fk
from diffaccel.samplers.steering.noise_search import best_of_n, path_search, replay_path, zero_order_search
from diffaccel.samplers.steering.potentials import ParticleSystem
from diffaccel.samplers.steering.rewards import CallableReward, ConstantReward
from diffusers import DDIMScheduler, FlowMatchHeunDiscreteScheduler
from tolerances import network_atol
from zoo_pipes import quiet_pipeline

PROMPTS = ["a handwritten digit seven", "a handwritten digit one"]
STEPS = 6
SCHED = dict(resample_start=1, resample_every=2, resample_end=4)  # events 1, 3, 5
#: what a stock call of each tiny pipeline needs: random-flux defaults to 256 px, so ask for 32
CALL = {"random-flux": dict(height=32, width=32, max_sequence_length=16), "random-sd3": dict(max_sequence_length=16)}
NAMES = list(CALL)


@pytest.fixture(scope="module", params=NAMES)
def flow(request):
    pipe = quiet_pipeline(request.param)
    return request.param, pipe


def brightness(images, prompts):
    return images.mean(dim=(1, 2, 3))


def stock_sde(pipe, name, seed, eta=1.0, **kw):
    """The stock pipeline on FlowMatchSDEScheduler, its step noise drawn from the call's generator."""
    original = pipe.scheduler
    pipe.scheduler = FlowMatchSDEScheduler.from_config(original.config, eta=eta)
    gen = make_generator(seed)
    pipe.scheduler.noise_generator = gen
    try:
        return pipe(PROMPTS, num_inference_steps=STEPS, generator=gen, output_type="pt", **CALL[name], **kw).images
    finally:
        pipe.scheduler = original


def rows_per_image(pipe) -> int:
    return family_for(pipe).cfg_rows(None)


@pytest.mark.parametrize("potential", ["max", "diff"])
def test_k1_equals_the_stock_stochastic_sampler(flow, potential):
    """S1 on flow pipelines: one particle is bit-identical to the stock call on FlowMatchSDEScheduler (eta 1, the
    pipeline's FlowMatch-Euler made stochastic), whatever the reward; same denoiser calls."""
    name, pipe = flow
    fk = FKSteering(pipe, CallableReward(brightness), FKConfig(num_particles=1, potential=potential, **SCHED))
    out = fk(PROMPTS, num_inference_steps=STEPS, generator=make_generator(0), output_type="pt", **CALL[name])
    assert torch.equal(out.images, stock_sde(pipe, name, 0))
    assert out.nfe["denoiser_calls"] == STEPS
    assert out.nfe["denoiser_rows"] == rows_per_image(pipe) * len(PROMPTS) * STEPS
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"  # the pipeline is left as it was


def test_eta_zero_is_the_stock_ode_sampler(flow):
    """FlowMatchSDEScheduler with eta 0 in the stock pipeline gives FlowMatch-Euler's images exactly."""
    name, pipe = flow
    ref = pipe(PROMPTS, num_inference_steps=STEPS, generator=make_generator(1), output_type="pt", **CALL[name]).images
    assert torch.equal(stock_sde(pipe, name, 1, eta=0.0), ref)


def test_constant_reward_adaptive_equals_independent_sampling(flow):
    """S2: r ≡ c in adaptive mode never resamples: bit-identical to the stock num_images_per_prompt = k call."""
    name, pipe = flow
    fk = FKSteering(pipe, ConstantReward(3.0), FKConfig(num_particles=3, adaptive=True, **SCHED))
    out = fk(PROMPTS, num_inference_steps=STEPS, generator=make_generator(2), output_type="pt", **CALL[name])
    assert torch.equal(out.images, stock_sde(pipe, name, 2, num_images_per_prompt=3))
    assert not out.resampled.any() and torch.allclose(out.weights, torch.full((2, 3), 1 / 3))


def test_steering_moves_rewards_and_counts_compute(flow):
    name, pipe = flow
    cfg = FKConfig(num_particles=4, potential="max", lmbda=2000.0, resampler="systematic", **SCHED)
    out = FKSteering(pipe, CallableReward(brightness), cfg)(PROMPTS, num_inference_steps=STEPS,
                                                              generator=make_generator(3), output_type="pt",
                                                              **CALL[name])
    base = stock_sde(pipe, name, 3, num_images_per_prompt=4)  # the same noise stream, never resampled
    assert out.images.shape == base.shape
    assert brightness(out.images, None).mean() > brightness(base, None).mean()
    assert out.resampled.any()
    # the returned rewards are the returned images' (the same decode: equal to float round-off of a mean)
    torch.testing.assert_close(out.rewards.reshape(-1), brightness(out.images, None))
    rows, events = 2 * 4, 3
    assert out.nfe["denoiser_calls"] == STEPS and out.nfe["denoiser_rows"] == rows_per_image(pipe) * rows * STEPS
    assert out.nfe["reward_calls"] == events and out.nfe["vae_decodes"] == rows * events + rows


def test_resampling_moves_every_per_particle_conditioning_row():
    """Particles of one prompt share their conditioning, so reordering it is invisible in a stock call; here each
    particle gets its own prompt and guidance row, the reward makes particle 2 win every event, and the denoiser
    must then see particle 2's text embeddings, pooled embeddings and guidance in every row."""
    pipe = quiet_pipeline("random-flux")
    fam = family_for(pipe)
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda mod, args, kw: seen.append({k: kw[k].clone() for k in ("encoder_hidden_states",
                                                                       "pooled_projections", "guidance")}),
        with_kwargs=True)
    try:
        with fam.own_loop_call(CALL["random-flux"]):
            cond = fam.condition(["a digit zero", "a digit one", "a digit two"], 1, 3.5)
            cond["guidance"] = torch.tensor([1.0, 2.0, 3.0])  # a different guidance row per particle
            original = {k: cond[k].clone() for k in ("embeds", "pooled", "guidance")}
            sched = FlowMatchSDEScheduler.from_config(pipe.scheduler.config)
            fam.set_timesteps(sched, 4)
            gen = make_generator(0)
            x = fam.init_latents(3, gen)
            system = ParticleSystem(1, 3, "immediate", 1000.0, generator=make_generator(1))
            reward = lambda z: torch.tensor([0.0, 0.0, 1.0])  # noqa: E731 - particle 2 wins by exp(1000)
            sample_fk(fam.eps, x, sched, system, reward, [1, 3], cond, {"generator": gen}, family=fam)
    finally:
        hook.remove()
    assert len(seen) == 4 and system.ancestry[0].tolist() == [[2, 2, 2]]
    first, after = seen[0], seen[2]  # step 2 runs after the event at step 1
    torch.testing.assert_close(first["encoder_hidden_states"], original["embeds"], rtol=0, atol=0)
    assert torch.equal(after["encoder_hidden_states"], original["embeds"][[2, 2, 2]])
    assert torch.equal(after["pooled_projections"], original["pooled"][[2, 2, 2]])
    assert torch.equal(after["guidance"], torch.tensor([3.0, 3.0, 3.0]))


def test_reorder_condition_handles_cfg_blocks_and_batched_ids():
    """CFG-batched rows ([uncond; cond], SD3) reorder block by block; Flux position ids only when batched."""
    sd3 = family_for(quiet_pipeline("random-sd3"))
    rows = torch.tensor([1, 1, 0])
    cond = {"embeds": torch.arange(6.0).reshape(6, 1), "pooled": torch.arange(6.0), "guidance_scale": 7.0}
    sd3.reorder_condition(cond, rows)
    assert cond["embeds"][:, 0].tolist() == [1, 1, 0, 4, 4, 3] and cond["pooled"].tolist() == [1, 1, 0, 4, 4, 3]
    flux = family_for(quiet_pipeline("random-flux"))
    cond = {"embeds": torch.arange(3.0), "pooled": torch.arange(3.0), "guidance": None,
            "img_ids": torch.arange(3.0).reshape(3, 1, 1), "text_ids": torch.zeros(3, 3)}  # 3 tokens, not 3 rows
    flux.reorder_condition(cond, rows)
    assert cond["img_ids"].flatten().tolist() == [1, 1, 0] and torch.equal(cond["text_ids"], torch.zeros(3, 3))
    with pytest.raises(ValueError, match="not a multiple"):
        flux.reorder_condition({"embeds": torch.zeros(4)}, rows)


def test_vp_and_flow_mismatches_deterministic_and_stateful_samplers_are_refused(flow):
    name, pipe = flow
    fk = FKSteering(pipe, CallableReward(brightness), FKConfig(num_particles=2, **SCHED))
    call = dict(num_inference_steps=STEPS, generator=make_generator(0), **CALL[name])
    with pytest.raises(InputError, match="deterministic.*FlowMatchSDEScheduler with eta > 0"):
        fk(PROMPTS[:1], eta=0.0, **call)
    original = pipe.scheduler
    try:
        pipe.scheduler = DDIMScheduler()  # a VP-only config on a flow model
        with pytest.raises(InputError, match="flow-matching.*DDIMScheduler steps variance-preserving"):
            fk(PROMPTS[:1], **call)
        pipe.scheduler = FlowMatchHeunDiscreteScheduler.from_config(original.config)
        with pytest.raises(InputError, match="per-row history"):
            fk(PROMPTS[:1], **call)
    finally:
        pipe.scheduler = original
    ok = FKSteering(pipe, CallableReward(brightness), FKConfig(num_particles=2, allow_deterministic=True, **SCHED))
    assert ok(PROMPTS[:1], eta=0.0, output_type="latent", **call).latents.shape[0] == 2


def test_vp_pipelines_still_refuse_flow_schedulers():
    sd = quiet_pipeline("random-sd")
    original = sd.scheduler
    try:
        sd.scheduler = FlowMatchSDEScheduler()
        with pytest.raises(InputError, match="variance-preserving diffusion schedule.*FlowMatchSDEScheduler"):
            FKSteering(sd, brightness, FKConfig(num_particles=2, **SCHED))(PROMPTS[:1], num_inference_steps=STEPS)
    finally:
        sd.scheduler = original


def test_bad_call_arguments_are_named(flow):
    name, pipe = flow
    fk = FKSteering(pipe, CallableReward(brightness), FKConfig(num_particles=2, **SCHED))
    with pytest.raises(InputError, match="negative_prompt"):
        fk(PROMPTS[:1], num_inference_steps=STEPS, negative_prompt="blurry", **CALL[name])
    with pytest.raises(InputError, match="max_sequence_length=77"):
        fk(PROMPTS[:1], num_inference_steps=STEPS, max_sequence_length=77)
    with pytest.raises(InputError, match="square"):
        fk(PROMPTS[:1], num_inference_steps=STEPS, height=32, width=64, max_sequence_length=16)
    with pytest.raises(InputError, match="needs `prompt`"):
        fk([], num_inference_steps=STEPS, **CALL[name])
    with pytest.raises(InputError, match="eta must be"):
        fk(PROMPTS[:1], num_inference_steps=STEPS, eta=-1.0, **CALL[name])
    assert pipe.default_sample_size == quiet_pipeline(name).default_sample_size  # restored after the refusals


# ---------------------------------------------------------------------------------------------------- noise search
def replay_atol(pipe) -> float:
    """A search samples candidates in another batch than the stock call: float32 round-off of STEPS transformer
    calls and one VAE decode apart."""
    return network_atol(pipe.transformer, calls=STEPS) + network_atol(pipe.vae.decoder)


def test_best_of_one_equals_the_base_sample_and_noise_replays(flow):
    name, pipe = flow
    out = best_of_n(pipe, PROMPTS[0], brightness, n=1, num_inference_steps=STEPS, generator=make_generator(4),
                    **CALL[name])
    base = pipe(PROMPTS[0], num_inference_steps=STEPS, generator=make_generator(4), output_type="pt",
                **CALL[name]).images
    torch.testing.assert_close(out.image, base, rtol=0, atol=replay_atol(pipe))
    assert out.nfe["nfe"] == STEPS
    four = best_of_n(pipe, PROMPTS[0], brightness, n=4, num_inference_steps=STEPS, generator=make_generator(5),
                     **CALL[name])
    assert four.reward == max(four.history[0]) and four.nfe["nfe"] == 4 * STEPS
    replay = pipe(PROMPTS[0], latents=four.noise, num_inference_steps=STEPS, output_type="pt", **CALL[name]).images
    torch.testing.assert_close(replay, four.image, rtol=0, atol=replay_atol(pipe))


def test_zero_order_and_path_search_run_on_flow_models(flow):
    name, pipe = flow
    zo = zero_order_search(pipe, PROMPTS[0], brightness, neighbours=2, rounds=2, num_inference_steps=STEPS,
                           generator=make_generator(6), **CALL[name])
    assert zo.nfe["nfe"] == 5 * STEPS and zo.reward == pytest.approx(max(max(h) for h in zo.history))
    kw = dict(n=2, m=2, start=2, delta_f=1, delta_b=2, num_inference_steps=STEPS)
    out = path_search(pipe, PROMPTS[0], brightness, generator=make_generator(7), **kw, **CALL[name])
    assert out.nfe["nfe"] == 2 * 2 + 4 * 4 * 2 and len(out.path_noises) == 4
    img = replay_path(pipe, PROMPTS[0], out.noise, out.path_noises, **{k: kw[k] for k in kw if k not in "nm"},
                      **CALL[name])
    torch.testing.assert_close(img, out.image, rtol=0, atol=replay_atol(pipe))


def test_flow_renoising_is_the_forward_process():
    """Path search's re-noise from σ to σ_b: for x = (1 − σ) x0 + σ ε it gives (1 − σ_b) x0 + σ_b·(unit noise)."""
    from diffaccel.samplers.steering.noise_search import _renoise, _Runner

    pipe = quiet_pipeline("random-flux")
    run = _Runner(pipe, brightness, PROMPTS[0], STEPS, None, 0.0, CALL["random-flux"])
    sig = run.scheduler.sigmas.double()
    s, s_b = float(sig[3]), float(sig[1])
    x0 = torch.full((200_000,), 0.7)
    x = (1 - s) * x0 + s * torch.randn(200_000, generator=make_generator(8))
    y = _renoise(run, x, 3, 2, torch.randn(200_000, generator=make_generator(9))).double()
    # mean (1 − σ_b)·0.7 and std σ_b, to 5 standard errors of 2e5 samples
    assert abs(y.mean().item() - (1 - s_b) * 0.7) < 5 * s_b / 200_000**0.5
    assert abs(y.std().item() - s_b) < 5 * s_b / (2 * 200_000) ** 0.5
    with pytest.raises(InputError, match="got also foo"):
        best_of_n(pipe, PROMPTS[0], brightness, n=1, num_inference_steps=STEPS, foo=1)


# ------------------------------------------------------------------------------------ tilted target on a flow toy
TOY_MU, TOY_S, TOY_STEPS = torch.tensor([-2.0, 2.0], dtype=torch.float64), 0.5, 100


def toy_velocity(x: torch.Tensor, t) -> torch.Tensor:
    """Exact velocity E[ε − x0 | x_σ] of p(x0) = 0.5·N(−2, 0.5²) + 0.5·N(2, 0.5²) on the flow path."""
    sigma = float(t) / 1000
    a, xd = 1.0 - sigma, x.double()
    var = a * a * TOY_S**2 + sigma * sigma
    pi = torch.softmax(-0.5 * (xd - a * TOY_MU) ** 2 / var, dim=-1)
    x0 = (pi * (TOY_MU + a * TOY_S**2 / var * (xd - a * TOY_MU))).sum(-1, keepdim=True)
    return ((xd - x0) / sigma).to(x.dtype)


def toy_scheduler() -> FlowMatchSDEScheduler:
    s = FlowMatchSDEScheduler(shift=1.0, eta=1.0)
    s.set_timesteps(TOY_STEPS)
    return s


def test_fk_on_the_flow_sde_matches_the_tilted_target():
    """S6 on a flow model: r(x) = x, λ = 1. The self-consistent target is the unsteered SDE sampler's own samples
    (10⁵) reweighted by e^x (exact for that discretised sampler); FK (`diff`, whose potentials telescope) with
    64 × 256 particles must match its P(x > 0) to 0.01 and its mean to 0.03, the tolerances of the VP toy test.
    (`max` and `immediate` over-tilt here at k = 256: their final correction leaves an ESS of ~64/256 and the mean
    lands 0.01–0.09 high over seeds, a finite-k bias of those potentials, not of the sampler.)"""
    potential = "diff"
    sched, gen = toy_scheduler(), torch.Generator().manual_seed(123)
    x = torch.randn(100_000, 1, generator=gen, dtype=torch.float64)
    for t in sched.timesteps:
        x = sched.step(toy_velocity(x, t), t, x, generator=gen).prev_sample
    x = x[:, 0]
    w = torch.softmax(x, dim=0)
    p_pos, mean = float((w * (x > 0)).sum()), float((w * x).sum())
    assert abs(p_pos - math.exp(4) / (1 + math.exp(4))) < 0.01  # the analytic tilted mode probability
    sched, gen = toy_scheduler(), torch.Generator().manual_seed(0)
    z = torch.randn(64 * 256, 1, generator=gen, dtype=torch.float64)
    system = ParticleSystem(64, 256, potential, 1.0, resampler="systematic", generator=torch.Generator().manual_seed(1))
    events = [20, 40, 60, 80, 99]
    out, _ = sample_fk(toy_velocity, z, sched, system, lambda v: v[:, 0], events, step_args={"generator": gen})
    out = out[:, 0]
    assert abs(float((out > 0).double().mean()) - p_pos) < 0.01
    assert abs(float(out.mean()) - mean) < 0.03
