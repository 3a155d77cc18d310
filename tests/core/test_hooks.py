"""Shared hook machinery (core.hooks): step tracking, pytree helpers, hook lifecycle, resets."""

import pytest
import torch
from diffaccel import zoo
from diffaccel.caching import (
    DENOISER_HOOK,
    ENCODER_HOOK,
    EncoderPropagationConfig,
    apply_encoder_propagation,
    cache_session,
    cached_call,
    encoder_propagation_counters,
    remove_encoder_propagation,
    reset_caches,
)
from diffaccel.core import make_generators
from diffaccel.core.hooks import (
    StepTracker,
    first_timestep,
    same_values,
    split_batch,
    tile_batch,
    tree_leaves,
    tree_map,
)
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput


def test_step_tracker_descending_repeated_rise_and_signature():
    gens = []
    tr = StepTracker(on_new_generation=lambda: gens.append(1))
    assert tr.observe(torch.tensor(900)) and tr.step == 0 and len(gens) == 1
    assert not tr.observe(torch.tensor(900)) and tr.step == 0  # second call in the same step
    assert tr.observe(torch.tensor([800, 800])) and tr.step == 1
    assert tr.observe(700.0) and tr.step == 2
    assert tr.observe(950) and tr.step == 0 and len(gens) == 2  # a rise starts a new generation
    sig = ((2, 4, 8, 8), torch.float32, torch.device("cpu"))
    tr.observe(900, sig)
    assert tr.step == 1 and tr.signature == sig
    other = ((4, 4, 8, 8), torch.float32, torch.device("cpu"))
    assert tr.observe(850, other) and tr.step == 0 and len(gens) == 3  # batch change -> new generation
    tr.reset()
    assert tr.observe(100) and tr.step == 0 and len(gens) == 4  # explicit reset wins over a descending timestep


def test_step_tracker_trajectory_from_callback_starts_at_first_executed_step():
    tr = StepTracker(timesteps_callback=lambda: torch.tensor([999, 800, 600, 600, 400, 200]))
    tr.observe(600)  # img2img-like start in the middle; consecutive duplicates collapse
    assert tr.step == 0 and tr.trajectory == [600.0, 400.0, 200.0] and tr.num_steps == 3
    assert tr.future_timesteps() == [400.0, 200.0]


def test_step_tracker_refused_generation_is_not_continued():
    calls = []

    def refuse():
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("no")

    tr = StepTracker(on_new_generation=refuse)
    with pytest.raises(ValueError):
        tr.observe(999)
    assert tr.observe(999) and len(calls) == 2  # same first timestep, still a new generation


def test_first_timestep_forms():
    assert first_timestep(torch.tensor(5)) == 5.0
    assert first_timestep(torch.tensor([3.5, 3.5])) == 3.5
    assert first_timestep([7, 7]) == 7.0 and first_timestep(2) == 2.0
    with pytest.raises(ValueError):
        first_timestep(torch.tensor([]))


def test_tile_and_split_roundtrip_step_major():
    b, m = 3, 4
    x = torch.arange(b * 2.0).reshape(b, 2)
    nested = {"a": (x, [x[:, :1]]), "scalar": torch.tensor(1.0), "other": torch.ones(5, 2), "flag": True}
    tiled = tile_batch(nested, b, m)
    assert tiled["a"][0].shape == (b * m, 2) and torch.equal(tiled["a"][0][b:2 * b], x)
    assert tiled["scalar"].ndim == 0 and tiled["other"].shape == (5, 2) and tiled["flag"] is True
    out = UNet2DConditionOutput(sample=torch.cat([x + j for j in range(m)]))
    chunks = split_batch(out, b, m)
    assert len(chunks) == m and all(isinstance(c, UNet2DConditionOutput) for c in chunks)
    assert all(torch.equal(c.sample, x + j) for j, c in enumerate(chunks))
    assert torch.equal(tree_map(lambda t: t * 0, (x,))[0], torch.zeros_like(x))
    assert len([v for v in tree_leaves(nested) if isinstance(v, torch.Tensor)]) == 4


def test_same_values_identity_value_and_mismatch():
    a = torch.randn(2, 3)
    assert same_values([a, 1.0, None], [a, 1.0, None])
    assert same_values([a], [a.clone()])
    assert not same_values([a], [a + 1])
    assert not same_values([a], [a[:1]])
    assert not same_values([a, 1.0], [a, 2.0])
    assert not same_values([a], [a, a])


class _Counting(ModelHook):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def pre_forward(self, module, *args, **kwargs):
        self.calls += 1
        return args, kwargs


def _sd():
    pipe = zoo.load("random-sd")
    pipe.set_progress_bar_config(disable=True)
    return pipe


KW = dict(prompt=["a cat", "a dog"], num_inference_steps=6, guidance_scale=5.0, output_type="latent")


def test_apply_remove_reapply_and_duplicate_apply():
    pipe = _sd()
    cfg = EncoderPropagationConfig(key_steps="uniform-2", noise_injection=None)
    apply_encoder_propagation(pipe, cfg)
    with pytest.raises(ValueError, match="already applied"):
        apply_encoder_propagation(pipe, cfg)
    first = cached_call(pipe, **KW, generator=make_generators(0, 2)).images
    remove_encoder_propagation(pipe)
    for module in pipe.unet.modules():  # R2: no registry or instance forward left behind
        assert "_diffusers_hook" not in module.__dict__ and "forward" not in module.__dict__
    apply_encoder_propagation(pipe, cfg)
    second = cached_call(pipe, **KW, generator=make_generators(0, 2)).images
    assert torch.equal(first, second)
    remove_encoder_propagation(pipe)


@pytest.mark.parametrize("other_first", [True, False])
def test_coexists_with_another_diffusers_hook(other_first):
    pipe = _sd()
    counter = _Counting()
    registry = HookRegistry.check_if_exists_or_initialize(pipe.unet)
    cfg = EncoderPropagationConfig(key_steps=[0, 3], noise_injection=None)
    if other_first:
        registry.register_hook(counter, "other")
        apply_encoder_propagation(pipe, cfg)
    else:
        apply_encoder_propagation(pipe, cfg)
        registry.register_hook(counter, "other")
    cached_call(pipe, **KW, generator=make_generators(0, 2))
    assert counter.calls == 6
    assert encoder_propagation_counters(pipe).encoder_passes == 2
    remove_encoder_propagation(pipe)
    assert pipe.unet._diffusers_hook.get_hook("other") is counter  # the foreign hook survives removal
    assert pipe.unet._diffusers_hook.get_hook(DENOISER_HOOK) is None
    assert not hasattr(pipe.unet.conv_in, "_diffusers_hook")
    pipe(**KW, generator=make_generators(0, 2))
    assert counter.calls == 12


def test_reset_clears_every_stateful_hook_and_cached_call_resets_on_exception():
    pipe = _sd()
    apply_encoder_propagation(pipe, EncoderPropagationConfig(key_steps=[0, 2], noise_injection=None))
    pipe(**KW, generator=make_generators(0, 2))
    state = pipe.unet._diffusers_hook.get_hook(DENOISER_HOOK).state
    assert state.cache and pipe.unet.conv_in._diffusers_hook.get_hook(ENCODER_HOOK).state is state
    reset_caches(pipe)
    assert not state.cache and state.tracker.step == -1

    def boom(p, i, t, kw):
        if i == 2:
            raise RuntimeError("interrupted")
        return kw

    with pytest.raises(RuntimeError, match="interrupted"):
        cached_call(pipe, **KW, generator=make_generators(0, 2), callback_on_step_end=boom)
    assert not state.cache and not state.stash
    with cache_session(pipe):
        pipe(**KW, generator=make_generators(0, 2))
        assert state.cache
    assert not state.cache
    remove_encoder_propagation(pipe)
