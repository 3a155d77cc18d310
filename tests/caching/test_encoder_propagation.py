"""Encoder propagation on stock diffusers UNets and pipelines."""

import pytest
import torch
from diffaccel import zoo
from diffaccel.caching import (
    DENOISER_HOOK,
    EncoderPropagationConfig,
    NoiseInjection,
    apply_encoder_propagation,
    cached_call,
    encoder_propagation_counters,
    last_noise_injection,
    remove_encoder_propagation,
    sample_initial_noise,
)
from diffaccel.core import make_generators
from diffusers import (
    ControlNetModel,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from tolerances import network_atol

PROMPTS = ["a cat", "a dog"]


def _sd():
    pipe = zoo.load("random-sd")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _ddpm():
    pipe = zoo.load("random-ddpm")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sd_kw(steps=8, n=2, seed=0, **kw):
    return dict(prompt=PROMPTS[:n], num_inference_steps=steps, guidance_scale=5.0, output_type="latent",
                generator=make_generators(seed, n), **kw)


def _ddpm_kw(steps=8, n=3, seed=0):
    return dict(batch_size=n, num_inference_steps=steps, output_type="np", generator=make_generators(seed, n))


def _images(out):
    return torch.as_tensor(out.images)


def _ep(pipe, **cfg):
    cfg.setdefault("noise_injection", None)
    apply_encoder_propagation(pipe, EncoderPropagationConfig(**cfg))


# ---------------------------------------------------------------------------------------------------------------------
# R1, R2, R3


@pytest.mark.parametrize("parallel", [False, True])
def test_all_key_steps_is_bit_exact_sd_and_ddpm(parallel):
    sd, ddpm = _sd(), _ddpm()
    base_sd, base_ddpm = _images(sd(**_sd_kw())), _images(ddpm(**_ddpm_kw()))
    _ep(sd, key_steps="all", parallel=parallel)
    _ep(ddpm, key_steps="all", parallel=parallel)
    assert torch.equal(_images(cached_call(sd, **_sd_kw())), base_sd)
    assert torch.equal(_images(cached_call(ddpm, **_ddpm_kw())), base_ddpm)
    assert encoder_propagation_counters(sd).encoder_passes == 8


def test_remove_restores_exact_behaviour():
    pipe = _sd()
    base = _images(pipe(**_sd_kw()))
    _ep(pipe, key_steps="uniform-4", parallel=True)
    cached = _images(cached_call(pipe, **_sd_kw()))
    assert not torch.equal(cached, base)  # reuse really changed something
    remove_encoder_propagation(pipe)
    assert torch.equal(_images(pipe(**_sd_kw())), base)
    assert all("_diffusers_hook" not in m.__dict__ for m in pipe.unet.modules())


@pytest.mark.parametrize("parallel", [False, True])
def test_consecutive_calls_do_not_leak_state(parallel):
    pipe = _sd()
    _ep(pipe, key_steps=[0, 1, 3], parallel=parallel)
    first = _images(pipe(**_sd_kw()))  # plain calls: automatic reset on the timestep rise
    second = _images(pipe(**_sd_kw()))
    assert torch.equal(first, second)
    assert not torch.equal(_images(pipe(**_sd_kw(seed=1))), first)
    # batch size and step count change between calls: results equal those of a freshly hooked pipeline
    small = _images(pipe(**_sd_kw(steps=5, n=1)))
    fresh = _sd()
    _ep(fresh, key_steps=[0, 1, 3], parallel=parallel)
    assert torch.equal(small, _images(fresh(**_sd_kw(steps=5, n=1))))


def test_counters_report_encoder_and_decoder_passes():
    pipe = _sd()
    _ep(pipe, key_steps="uniform-3")
    cached_call(pipe, **_sd_kw(steps=9))
    c = encoder_propagation_counters(pipe)
    assert c.key_steps == [0, 3, 6] and c.encoder_passes == 3 and c.decoder_passes == 9 and c.steps == 9
    assert set(c.module_runs) == {"conv_in", "down_blocks.0", "down_blocks.1", "mid_block"}
    assert all(v == 3 for v in c.module_runs.values())
    remove_encoder_propagation(pipe)
    _ep(pipe, key_steps="uniform-3", parallel=True)
    cached_call(pipe, **_sd_kw(steps=9))
    c = encoder_propagation_counters(pipe)
    assert c.encoder_passes == 3 and c.parallel_batches == 3 and c.decoder_passes == 6 and c.stash_hits == 3


# ---------------------------------------------------------------------------------------------------------------------
# semantics of a non-key step


def _cond_unet(**extra):
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=4, norm_num_groups=8, **extra).eval()


@torch.no_grad()
def test_non_key_step_never_reads_the_latent_nor_runs_the_encoder():
    unet = _cond_unet()
    ehs = torch.randn(3, 5, 16)
    apply_encoder_propagation(unet, EncoderPropagationConfig(key_steps=[0], noise_injection=None))
    x0 = torch.randn(3, 4, 8, 8)
    outs = []
    for x1 in (torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8) * 5):
        unet(x0, torch.tensor(900), ehs)
        outs.append(unet(x1, torch.tensor(800), encoder_hidden_states=ehs).sample)
    assert torch.equal(outs[0], outs[1])
    c = encoder_propagation_counters(unet)
    assert c.encoder_passes == 1 and c.unet_calls == 2 and c.module_runs["conv_in"] == 1 and c.key_steps == [0]


@torch.no_grad()
@pytest.mark.parametrize("clone", [True, False])
def test_cache_survives_in_place_adds_t2i_adapter_path(clone):
    # the UNet forward adds T2I-Adapter residuals in place onto a non-attention down block's output
    unet = _cond_unet()
    ehs = torch.randn(2, 5, 16)
    adapter = [torch.ones(2, 16, 4, 4), torch.ones(2, 32, 4, 4)]
    apply_encoder_propagation(unet, EncoderPropagationConfig(key_steps=[0], noise_injection=None,
                                                             clone_on_reuse=clone))
    state = unet._diffusers_hook.get_hook(DENOISER_HOOK).state
    unet(torch.randn(2, 4, 8, 8), torch.tensor(900), ehs, down_intrablock_additional_residuals=list(adapter))
    snapshot = {k: v[0].clone() if isinstance(v, tuple) else v.clone() for k, v in state.cache.items()}
    for t in (800, 700):
        unet(torch.randn(2, 4, 8, 8), torch.tensor(t), ehs, down_intrablock_additional_residuals=list(adapter))
    unchanged = all(torch.equal(snapshot[k], v[0] if isinstance(v, tuple) else v) for k, v in state.cache.items())
    assert unchanged == clone


@torch.no_grad()
def test_golden_reference_loop_ddpm_unet():
    """A plain loop over a hand-split UNet2DModel encoder/decoder equals the hooked pipeline."""
    pipe = _ddpm()
    keys = [0, 1, 4, 6]
    unet, sched = pipe.unet, pipe.scheduler
    gen = make_generators(0, 2)
    x = torch.cat([torch.randn(1, 3, 16, 16, generator=g) for g in gen])
    sched.set_timesteps(9)
    for s, t in enumerate(sched.timesteps):
        emb = unet.time_embedding(unet.time_proj(t[None] * torch.ones(2, dtype=t.dtype)).to(unet.dtype))
        if s in keys:
            h = unet.conv_in(x)
            skips = (h,)
            for block in unet.down_blocks:
                h, res = block(hidden_states=h, temb=emb)
                skips += res
            mid = unet.mid_block(h, emb)
        h, rest = mid, skips
        for block in unet.up_blocks:
            res, rest = rest[-len(block.resnets):], rest[:-len(block.resnets)]
            h = block(h, res, emb)
        eps = unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))
        x = sched.step(eps, t, x).prev_sample
    golden = (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    _ep(pipe, key_steps=keys)
    out = torch.as_tensor(cached_call(pipe, batch_size=2, num_inference_steps=9, output_type="np",
                                      generator=make_generators(0, 2)).images)
    assert torch.equal(out, golden)


# ---------------------------------------------------------------------------------------------------------------------
# parallel decoding (R4)


def parallel_atol(unet, steps: int) -> float:
    """Parallel decoding runs the decoders of several steps in one batch: the same arithmetic in another blocking,
    so float32 round-off of `steps` chained UNet calls (unit-scale activations) separates it from sequential."""
    return network_atol(unet, calls=steps)


def _compare_parallel(pipe, call, steps, key_steps, **cfg):
    """Sequential and parallel-decoding outputs, the counters, and the round-off tolerance between them."""
    _ep(pipe, key_steps=key_steps, **cfg)
    seq = _images(cached_call(pipe, **call(steps)))
    remove_encoder_propagation(pipe)
    _ep(pipe, key_steps=key_steps, parallel=True, **cfg)
    par = _images(cached_call(pipe, **call(steps)))
    counters = encoder_propagation_counters(pipe)
    remove_encoder_propagation(pipe)
    return seq, par, counters, parallel_atol(pipe.unet, steps)


@pytest.mark.parametrize("key_steps,steps", [("sd50", 50), ("uniform-4", 20), ("sd50-scaled", 25)])
def test_parallel_equals_sequential_with_cfg(key_steps, steps):
    seq, par, c, atol = _compare_parallel(_sd(), _sd_kw, steps, key_steps)
    assert (seq - par).abs().max() <= atol
    assert c.parallel_batches > 0 and c.stash_fallbacks == 0


def test_parallel_equals_sequential_odd_batch_without_cfg():
    seq, par, c, atol = _compare_parallel(_ddpm(), _ddpm_kw, 12, "uniform-4")
    assert (seq - par).abs().max() <= atol and c.parallel_batches == 3


@pytest.mark.parametrize("max_parallel,batches", [(1, 0), (3, 4), (16, 2)])
def test_max_parallel_caps_the_batched_steps(max_parallel, batches):
    seq, par, c, atol = _compare_parallel(_sd(), _sd_kw, 15, [0, 1, 6], max_parallel=max_parallel)
    assert (seq - par).abs().max() <= atol
    assert c.parallel_batches == batches and c.encoder_passes == 3 and c.steps == 15


def test_max_batch_caps_rows():
    _, _, c, _ = _compare_parallel(_sd(), _sd_kw, 15, [0, 1, 6], max_batch=8)  # B = 4 rows -> 2 steps per call
    assert c.parallel_batches == 6  # groups of 4 and 8 non-key steps -> 2 + 4 calls


@pytest.mark.parametrize("scheduler_cls", [DPMSolverMultistepScheduler, UniPCMultistepScheduler,
                                           EulerDiscreteScheduler])
def test_parallel_with_other_schedulers(scheduler_cls):
    pipe = _sd()
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    seq, par, c, atol = _compare_parallel(pipe, _sd_kw, 20, "uniform-4")
    assert torch.isfinite(par).all() and (seq - par).abs().max() <= atol and c.encoder_passes == 5


def test_parallel_with_diffaccel_sampler():
    samplers = pytest.importorskip("diffaccel.samplers")
    pipe = _sd()
    pipe.scheduler = samplers.PseudoNumericalScheduler.from_config(pipe.scheduler.config)
    seq, par, c, atol = _compare_parallel(pipe, _sd_kw, 12, "uniform-3")
    assert torch.isfinite(par).all() and (seq - par).abs().max() <= atol and c.parallel_batches > 0
    pipe.scheduler = samplers.TimeShiftScheduler(base_class="DDIMScheduler", base_config=dict(pipe.scheduler.config),
                                                 window=10, cutoff=200)
    seq, par, c, atol = _compare_parallel(pipe, _sd_kw, 12, "uniform-3")
    assert torch.isfinite(par).all() and (seq - par).abs().max() <= atol and c.parallel_batches > 0


@torch.no_grad()
def test_parallel_sdxl_style_added_cond_kwargs():
    unet = _cond_unet(addition_embed_type="text_time", addition_time_embed_dim=4,
                      projection_class_embeddings_input_dim=8 + 6 * 4)
    sched = DDIMScheduler(num_train_timesteps=1000)
    ehs, text_embeds, time_ids = torch.randn(3, 5, 16), torch.randn(3, 8), torch.randn(3, 6)
    x0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def run():
        sched.set_timesteps(12)
        x, preds = x0.clone(), []
        for t in sched.timesteps:
            eps = unet(x, t, ehs, added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}).sample
            preds.append(eps)
            x = sched.step(eps, t, x).prev_sample
        return torch.stack(preds)

    base = run()
    cb = lambda: sched.timesteps  # noqa: E731
    apply_encoder_propagation(unet, EncoderPropagationConfig(key_steps="all", parallel=True, timesteps_callback=cb))
    assert torch.equal(run(), base)
    remove_encoder_propagation(unet)
    apply_encoder_propagation(unet, EncoderPropagationConfig(key_steps="uniform-4", timesteps_callback=cb))
    seq = run()
    remove_encoder_propagation(unet)
    apply_encoder_propagation(unet, EncoderPropagationConfig(key_steps="uniform-4", parallel=True,
                                                             timesteps_callback=cb))
    par = run()
    assert encoder_propagation_counters(unet).parallel_batches == 3
    assert (seq - par).abs().max() <= parallel_atol(unet, 12) and not torch.equal(seq, base)


def test_stash_is_dropped_when_conditioning_changes_mid_run():
    pipe = _sd()

    def swap(p, i, t, kw):
        return {"prompt_embeds": kw["prompt_embeds"] * 1.5} if i == 4 else {}

    call = lambda steps: _sd_kw(steps, callback_on_step_end=swap,  # noqa: E731
                                callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
    seq, par, c, atol = _compare_parallel(pipe, call, 12, [0, 2])
    assert c.stash_fallbacks == 1 and (seq - par).abs().max() <= atol
    plain = _images(pipe(**call(12)))
    assert not torch.equal(par, plain)


def test_img2img_counts_from_the_first_executed_step():
    pipe = StableDiffusionImg2ImgPipeline(**_sd().components)
    pipe.set_progress_bar_config(disable=True)
    _ep(pipe, key_steps="sd50-scaled", parallel=True)
    image = torch.rand(2, 3, 16, 16)
    cached_call(pipe, prompt=PROMPTS, image=image, strength=0.5, num_inference_steps=20, output_type="latent",
                generator=make_generators(0, 2))
    c = encoder_propagation_counters(pipe)
    assert c.steps == 10 and c.key_steps == [0, 1, 2, 3, 5, 7]  # sd50-scaled for N = 10


# ---------------------------------------------------------------------------------------------------------------------
# ControlNet


def _controlnet_pipe():
    base = _sd()
    torch.manual_seed(0)
    net = ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=(16, 32))
    with torch.no_grad():  # from_unet zero-initialises the output convs; give the residuals some size
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pipe = StableDiffusionControlNetPipeline(**{k: v for k, v in base.components.items()
                                                if k not in ("image_encoder",)}, controlnet=net)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_controlnet_residuals_only_at_key_steps():
    pipe = _controlnet_pipe()
    cond = torch.rand(2, 3, 16, 16)
    call = lambda steps: _sd_kw(steps, image=cond)  # noqa: E731
    base = _images(pipe(**call(8)))
    _ep(pipe, key_steps="all")
    assert torch.equal(_images(cached_call(pipe, **call(8))), base)
    assert encoder_propagation_counters(pipe).controlnet_runs == 8
    remove_encoder_propagation(pipe)
    seq, par, c, atol = _compare_parallel(pipe, call, 8, [0, 3])
    assert c.controlnet_runs == 2 and c.encoder_passes == 2 and (seq - par).abs().max() <= atol
    assert not any("_diffusers_hook" in m.__dict__ for m in pipe.controlnet.modules())
    assert torch.equal(_images(pipe(**call(8))), base)


# ---------------------------------------------------------------------------------------------------------------------
# prior noise injection


def test_initial_noise_matches_the_pipeline():
    pipe = _sd()
    kw = _sd_kw()
    noise = sample_initial_noise(pipe, dict(kw, generator=make_generators(0, 2)))
    assert torch.equal(_images(pipe(**kw)), _images(pipe(**_sd_kw(latents=noise))))


@pytest.mark.parametrize("scheduler_cls", [DDIMScheduler, EulerDiscreteScheduler])
def test_noise_injection_amount_steps_and_chaining(scheduler_cls):
    pipe = _sd()
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    noise = sample_initial_noise(pipe, _sd_kw())
    seen = []

    def user(p, i, t, kw):
        seen.append(i)
        return {}

    def manual(p, i, t, kw):
        ts = p.scheduler.timesteps
        if i + 1 < len(ts) and ts[i + 1] < 500:
            return {"latents": kw["latents"] + 0.01 * (noise * p.scheduler.init_noise_sigma)}
        return {}

    expected = _images(pipe(**_sd_kw(10, latents=noise, callback_on_step_end=manual)))
    apply_encoder_propagation(pipe, EncoderPropagationConfig(key_steps="all", noise_injection=(0.01, 0.5)))
    got = _images(cached_call(pipe, **_sd_kw(10, callback_on_step_end=user)))
    injection = last_noise_injection(pipe)
    ts = pipe.scheduler.timesteps
    assert injection.injected_steps == [s for s in range(1, 10) if ts[s] < 500] and len(injection.injected_steps) > 2
    assert seen == list(range(10))
    assert torch.equal(got, expected)
    remove_encoder_propagation(pipe)


def test_noise_injection_off_equals_plain_ep_and_config_errors():
    pipe = _sd()
    _ep(pipe, key_steps=[0, 2, 5])
    plain_ep = _images(cached_call(pipe, **_sd_kw(10)))
    remove_encoder_propagation(pipe)
    apply_encoder_propagation(pipe, EncoderPropagationConfig(key_steps=[0, 2, 5], noise_injection=(0.0, 0.5)))
    assert torch.equal(_images(cached_call(pipe, **_sd_kw(10))), plain_ep)
    remove_encoder_propagation(pipe)
    apply_encoder_propagation(pipe, EncoderPropagationConfig(key_steps=[0, 2, 5]))  # default: (0.003, 0.5)
    assert not torch.equal(_images(cached_call(pipe, **_sd_kw(10))), plain_ep)
    with pytest.raises(ValueError, match="tau_frac"):
        NoiseInjection(0.003, 0.0)
    with pytest.raises(ValueError, match="alpha"):
        NoiseInjection(-1.0)


def test_noise_injection_skipped_with_warning_on_pipelines_without_callbacks():
    pipe = _ddpm()
    apply_encoder_propagation(pipe, EncoderPropagationConfig(key_steps="all"))
    with pytest.warns(UserWarning, match="not applied"):
        out = _images(cached_call(pipe, **_ddpm_kw(4)))
    remove_encoder_propagation(pipe)
    assert torch.equal(out, _images(pipe(**_ddpm_kw(4))))


# ---------------------------------------------------------------------------------------------------------------------
# bad input


def test_bad_input_errors():
    with pytest.raises(TypeError, match="UNet2DModel and UNet2DConditionModel"):
        apply_encoder_propagation(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="UNet2DModel and UNet2DConditionModel"):
        apply_encoder_propagation(zoo.load("random-dit"))
    with pytest.raises(ValueError, match="start at step 0"):
        EncoderPropagationConfig(key_steps=[2, 5])
    with pytest.raises(ValueError, match="max_parallel"):
        EncoderPropagationConfig(max_parallel=0)
    with pytest.raises(ValueError, match="step_counting"):
        EncoderPropagationConfig(step_counting="calls")
    with pytest.raises(ValueError, match="timesteps"):
        apply_encoder_propagation(_cond_unet(), EncoderPropagationConfig(parallel=True))
    with pytest.raises(ValueError, match="not applied"):
        encoder_propagation_counters(_cond_unet())
    pipe = _sd()
    _ep(pipe, key_steps=[0, 4, 12])
    with pytest.raises(ValueError, match="out of range"):
        cached_call(pipe, **_sd_kw(10))
    remove_encoder_propagation(pipe)
    _ep(pipe, key_steps="sd50")
    with pytest.raises(ValueError, match="defined for 50 steps"):
        pipe(**_sd_kw(25))
    with pytest.raises(ValueError, match="defined for 50 steps"):  # the refused generation is not continued
        pipe(**_sd_kw(25))
    remove_encoder_propagation(pipe)
    # a bare UNet without a timesteps callback cannot resolve a step-count-dependent schedule
    unet = _cond_unet()
    apply_encoder_propagation(unet, EncoderPropagationConfig(key_steps="sd50-scaled", noise_injection=None))
    with pytest.raises(ValueError, match="depends on the number of steps"):
        unet(torch.randn(1, 4, 8, 8), torch.tensor(10), torch.randn(1, 5, 16))


# ---------------------------------------------------------------------------------------------------------------------
# beyond the paper: propagating the deepest up blocks too; the cached-call wrapper; drift measurement


def test_propagate_up_blocks_exact_when_all_key_and_parallel_matches_sequential():
    pipe = _sd()
    base = _images(pipe(**_sd_kw()))
    _ep(pipe, key_steps="all", propagate_up_blocks=1)
    assert torch.equal(_images(cached_call(pipe, **_sd_kw())), base)
    remove_encoder_propagation(pipe)
    seq, par, c, atol = _compare_parallel(pipe, _sd_kw, 12, "uniform-4", propagate_up_blocks=1)
    assert (seq - par).abs().max() <= atol and c.module_runs["up_blocks.0"] == 3 and "up_blocks.1" not in c.module_runs
    _ep(pipe, key_steps="uniform-4")
    encoder_only = _images(cached_call(pipe, **_sd_kw(12)))
    remove_encoder_propagation(pipe)
    assert not torch.equal(encoder_only, seq)
    with pytest.raises(ValueError, match="leaves no up block"):
        _ep(pipe, propagate_up_blocks=2)
    with pytest.raises(ValueError, match="propagate_up_blocks"):
        EncoderPropagationConfig(propagate_up_blocks=-1)


def test_cached_pipeline_wrapper_keeps_signature_and_applies_injection():
    import inspect

    from diffaccel.caching import CachedPipeline
    from diffaccel.core import count_nfe

    pipe = _sd()
    apply_encoder_propagation(pipe, EncoderPropagationConfig(key_steps="all", noise_injection=(0.01, 0.5)))
    wrapped = CachedPipeline(pipe)
    assert "prompt" in inspect.signature(wrapped.__call__).parameters and wrapped.unet is pipe.unet
    kw = _sd_kw(10)
    with count_nfe(wrapped) as nfe:
        a = _images(wrapped(kw.pop("prompt"), **kw))
    assert nfe.calls == 10 and last_noise_injection(pipe).injected_steps
    assert torch.equal(a, _images(cached_call(pipe, **_sd_kw(10))))


def test_measure_encoder_drift_and_schedule():
    from diffaccel.caching import measure_encoder_drift, schedule_from_drift

    pipe = _sd()
    drift = measure_encoder_drift(pipe, **_sd_kw(8))
    assert drift.shape == (8, 8) and torch.all(drift.diagonal() == 0) and torch.isnan(drift[3, 1])
    assert torch.all(drift[0, 1:] > 0)
    assert not any("_diffusers_hook" in m.__dict__ or m._forward_hooks for m in pipe.unet.modules())
    sched = schedule_from_drift(drift, 3)
    assert sched.key_steps(8)[0] == 0 and len(sched.key_steps(8)) == 3
    deeper = measure_encoder_drift(pipe, propagate_up_blocks=1, **_sd_kw(8))
    assert not torch.equal(torch.nan_to_num(deeper), torch.nan_to_num(drift))


def test_noise_injection_under_a_time_shift_wrapper():
    """The wrapper's own config has no num_train_timesteps; T is read from its base scheduler."""
    from diffaccel.samplers import TimeShiftScheduler

    pipe = _sd()
    pipe.scheduler = TimeShiftScheduler.wrap(DDIMScheduler.from_config(pipe.scheduler.config), window=0, cutoff=300)
    apply_encoder_propagation(pipe, EncoderPropagationConfig(key_steps="all", noise_injection=(0.01, 0.5)))
    images = _images(cached_call(pipe, **_sd_kw(10)))
    assert torch.isfinite(images).all() and len(last_noise_injection(pipe).injected_steps) > 2
    remove_encoder_propagation(pipe)


# ---------------------------------------------------------------------------------------------------------------------
# SDXL: the UNet takes SDXL's added conditioning (pooled text + size/crop ids) through `added_cond_kwargs`


def _sdxl():
    pipe = zoo.load("random-sdxl")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sdxl_kw(steps=6, n=2, seed=0):
    return dict(prompt=PROMPTS[:n], num_inference_steps=steps, guidance_scale=5.0, output_type="latent",
                height=32, width=32, generator=make_generators(seed, n))


@pytest.mark.parametrize("parallel", [False, True])
def test_all_key_steps_is_bit_exact_on_sdxl(parallel):
    pipe = _sdxl()
    base = _images(pipe(**_sdxl_kw()))
    _ep(pipe, key_steps="all", parallel=parallel)
    assert torch.equal(_images(cached_call(pipe, **_sdxl_kw())), base)
    assert encoder_propagation_counters(pipe).encoder_passes == 6


def test_sdxl_parallel_decoding_equals_sequential_reuse():
    """Non-key steps batched with tiled `added_cond_kwargs` give what one-by-one decoding gives."""
    seq, par = _sdxl(), _sdxl()
    _ep(seq, key_steps="uniform-3", parallel=False)
    _ep(par, key_steps="uniform-3", parallel=True)
    a, b = _images(cached_call(seq, **_sdxl_kw())), _images(cached_call(par, **_sdxl_kw()))
    assert encoder_propagation_counters(par).parallel_batches > 0
    assert torch.allclose(a, b, atol=parallel_atol(par.unet, 6), rtol=0)
    plain = _images(_sdxl()(**_sdxl_kw()))
    assert not torch.equal(a, plain)
