"""`diffaccel.accelerate`: order, removal back to the loaded pipeline, refusals, recipe strings, and composition
(exact where the mathematics says so). Tiny zoo models, two images, few steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffaccel import (
    FORA,
    BestOfN,
    CompositionError,
    EncoderPropagation,
    FirstBlockCache,
    FKSteering,
    HarmoniCa,
    MagCache,
    OneStep,
    PatchParallel,
    Sampler,
    TaylorSeer,
    TimeShift,
    accelerate,
    format_recipe,
    parse_recipe,
)
from diffaccel.caching import (
    EncoderPropagationConfig,
    apply_encoder_propagation,
    cached_call,
    encoder_propagation_counters,
    last_noise_injection,
)
from diffaccel.core import make_generators
from diffaccel.zoo import load
from tolerances import network_atol

PROMPTS = ["a handwritten digit three", "a handwritten digit seven"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def fresh(model: str):
    pipe = load(model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call(pipe, model: str, steps: int, **kw):
    cond = {"prompt": PROMPTS} if model == "digits-sd" else {"class_labels": [3, 7]} if model == "digits-dit" \
        else {"batch_size": 2}
    with torch.no_grad():
        return pipe(**cond, num_inference_steps=steps, generator=make_generators(0, 2), output_type="np",
                    **kw).images


def hooked_modules(pipe) -> list[str]:
    """Modules of every pipeline component that carry a hook registry or an instance-level forward."""
    out = []
    for cname, comp in pipe.components.items():
        if isinstance(comp, torch.nn.Module):
            for name, m in comp.named_modules():
                if "_diffusers_hook" in m.__dict__ or "forward" in m.__dict__:
                    out.append(f"{cname}.{name}")
    return out


@pytest.mark.parametrize("model, recipe, steps", [
    ("digits-sd", "s-pndm@10 + ep:uniform-3:parallel", 10),
    ("digits-dit", "ddim@20:grid=model + time-shift + harmonica:digits-dit-20-harmonica-b1", 20),
    ("digits-sd", "one-step:digits-sd-onestep", 1),
    ("digits-dit", "ddim@10 + magcache:0.25", 10),
])
def test_remove_restores_the_loaded_pipeline(model, recipe, steps):
    pipe, plain = fresh(model), fresh(model)
    scheduler, unet_or_transformer, cls = pipe.scheduler, dict(pipe.components), type(pipe)
    before = call(pipe, model, steps)
    handle = accelerate(pipe, recipe)
    assert pipe.scheduler is not scheduler or "ep" in recipe
    call(pipe, model, steps)
    handle.remove()
    handle.remove()  # idempotent
    assert pipe.scheduler is scheduler and type(pipe) is cls
    assert {k: id(v) for k, v in pipe.components.items()} == {k: id(v) for k, v in unet_or_transformer.items()}
    assert dict(pipe.config) == dict(plain.config)
    assert dict(pipe.scheduler.config) == dict(plain.scheduler.config)
    assert hooked_modules(pipe) == [] == hooked_modules(plain)
    for name, comp in pipe.components.items():
        if isinstance(comp, torch.nn.Module):
            a, b = comp.state_dict(), getattr(plain, name).state_dict()
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    np.testing.assert_array_equal(call(pipe, model, steps), before)
    np.testing.assert_array_equal(call(plain, model, steps), before)


def test_plain_call_after_accelerate_equals_cached_call():
    """Prior noise injection and the per-call reset now live in hooks: `pipe(...)` == `cached_call(pipe, ...)`."""
    new, old = fresh("digits-sd"), fresh("digits-sd")
    accelerate(new, EncoderPropagation("uniform-3", parallel=True))
    apply_encoder_propagation(old, EncoderPropagationConfig("uniform-3", parallel=True))
    for seed in (0, 5):  # two calls in a row: the second must start from empty caches
        kw = {"prompt": PROMPTS, "num_inference_steps": 12, "output_type": "np"}
        with torch.no_grad():
            a = new(**kw, generator=make_generators(seed, 2)).images
            b = cached_call(old, **kw, generator=make_generators(seed, 2)).images
        np.testing.assert_array_equal(a, b)
        assert last_noise_injection(new).injected_steps == last_noise_injection(old).injected_steps != []
        assert encoder_propagation_counters(new).key_steps == encoder_propagation_counters(old).key_steps


@pytest.mark.parametrize("model, recipe, words", [
    ("digits-dit", "ddim@10 + s-pndm@10", ["ddim@10", "s-pndm@10", "sampler"]),
    ("digits-dit", "ep:uniform-3", ["ep:uniform-3", "DiTTransformer2DModel", "harmonica"]),
    ("digits-dit", "s-pndm@10 + fk:4", ["fk:4", "s-pndm@10", "history"]),
    ("digits-dit", "ddim@10 + fk:4:eta=0", ["fk:4", "ddim@10", "deterministic"]),
    ("digits-dit", "plms-diffusers@10 + time-shift", ["time-shift", "plms-diffusers@10", "wraps only"]),
    ("digits-dit", "fora:2", ["fora:2", "step count"]),
    ("digits-dit", "one-step + fora:2:steps=20", ["one-step", "fora:2", "nothing to reuse"]),
    ("digits-dit", "harmonica:no-such-plan", ["harmonica:no-such-plan", "no cache plan file"]),
    ("digits-dit", "ddim@20 + fora:2 + patch-parallel:displaced", ["fora:2", "patch-parallel:displaced", "older step"]),
    ("digits-dit", "ddim@10 + fk:2 + patch-parallel:pcpp", ["fk:2", "patch-parallel:pcpp", "reorders"]),
    ("digits-dit", "ddim@20 + fbc:0.1 + patch-parallel:sync", ["fbc:0.1", "patch-parallel:sync", "disagree"]),
    # flow-matching steering: a VP sampler, a deterministic FK, a sampler with history
    ("random-flux", "ddpm@8 + fk:2", ["ddpm@8", "variance-preserving", "flow-matching"]),
    ("random-flux", "fk:2:eta=0", ["fk:2", "deterministic", "FlowMatchSDEScheduler with eta > 0"]),
    ("random-flux", "s-pndm@8 + fk:2", ["fk:2", "s-pndm@8", "history"]),
])
def test_refusals_name_both_methods_and_change_nothing(model, recipe, words):
    pipe = fresh(model)
    scheduler = pipe.scheduler
    with pytest.raises(CompositionError) as err:
        accelerate(pipe, recipe)
    for w in words:
        assert w in str(err.value), (w, str(err.value))
    assert pipe.scheduler is scheduler and hooked_modules(pipe) == []


def test_refusal_of_a_family_mismatch():
    with pytest.raises(CompositionError, match="harmonica.*UNet2DConditionModel"):
        accelerate(fresh("digits-sd"), HarmoniCa())
    with pytest.raises(CompositionError, match="one-step.*'dit' family"):
        accelerate(fresh("digits-dit"), OneStep())
    with pytest.raises(CompositionError, match="fbc:0.1 hooks transformer blocks.*UNet2DConditionModel"):
        accelerate(fresh("digits-sd"), "ddim@10 + fbc:0.1")
    with pytest.raises(CompositionError, match="magcache:0.1 calibrates for a step count"):
        accelerate(fresh("digits-dit"), "magcache:0.1")


def test_patch_parallel_check_knows_which_denoisers_it_can_split():
    from diffaccel.protocol import check

    for name in ("random-flux", "random-sd3", "random-sdxl"):
        check(load(name), PatchParallel("displaced"))  # accepted: every layer has a band rule
    check(load("random-sd3"), PatchParallel("sync", cfg_parallel=True))
    with pytest.raises(CompositionError, match="unsupported model UNet2DModel"):
        check(load("random-ddpm"), PatchParallel("sync"))
    with pytest.raises(CompositionError, match="runs its guidance branches as separate calls"):
        check(load("random-flux"), PatchParallel("sync", cfg_parallel=True))


@pytest.mark.parametrize("methods", [
    (Sampler("s-pndm", 10),),
    (Sampler("ddim", 25, grid="model"), TimeShift(window=20, cutoff=200)),
    (Sampler("dpm++2m", 8), EncoderPropagation((0, 1, 4), parallel=True, prior_noise=None)),
    (EncoderPropagation("uniform-3", prior_noise=(0.01, 0.4), max_parallel=4),),
    (Sampler("ddim", 20), HarmoniCa("digits-dit-20-harmonica-b2", force=True)),
    (Sampler("f-pndm", 13), FORA(3)),
    (FORA(2, steps=20),),
    (Sampler("ddim", 10), FKSteering(k=3, potential="diff", every=2, start=2, end=None, lmbda=5.0, eta=0.5)),
    (Sampler("ddim", 10), BestOfN(4, reward="clip")),
    (PatchParallel("sync"), Sampler("unipc", 5)),
    (PatchParallel("pcpp", warmup_steps=2, cfg_parallel=True, pcpp_fraction=0.25),),
    (OneStep("digits-sd-onestep"), BestOfN(2)),
    (Sampler("ddim", 20), FirstBlockCache(0.2)),
    (Sampler("ddim", 10), TaylorSeer(3, warmup=2)),
    (MagCache(0.25, steps=20),),
    (Sampler("ddim", 20), FORA(3, forecast=1)),
    (Sampler("ddim", 20), FORA(3, forecast=2)),
])
def test_recipe_string_round_trip(methods):
    text = format_recipe(methods)
    parsed = parse_recipe(text)
    assert parsed == tuple(sorted(methods, key=lambda m: m.stage)), text
    assert format_recipe(parsed) == text


@pytest.mark.parametrize("bad", ["s-pndm@", "warp@10", "ep:uniform-3::parallel", "fora:x", "ddim@0",
                                 "f-pndm@5", "ts@10", "ddim@10:grid=diagonal", "fora:2:forecast=3"])
def test_unreadable_recipes_raise_value_errors(bad):
    with pytest.raises(ValueError):
        parse_recipe(bad)


def test_plain_recipe_is_empty_and_names_are_case_insensitive():
    assert parse_recipe("plain") == () and format_recipe(()) == "plain"
    assert parse_recipe("S-PNDM@10 + FORA:2") == parse_recipe("s-pndm@10+fora:2") == (Sampler("s-pndm", 10), FORA(2))
    assert parse_recipe("dpm++2m@8+ep:all") == (Sampler("dpm++2m", 8), EncoderPropagation("all"))


# ---------------------------------------------------------------------------------------------- composition


def generate(model: str, recipe: str, **kw):
    pipe = fresh(model)
    with torch.no_grad(), accelerate(pipe, recipe) as h:
        cond = {"prompt": PROMPTS} if model == "digits-sd" else {"class_labels": [3, 7]}
        return h(**cond, generator=make_generators(0, kw.pop("ngen", 2)), output_type=kw.pop("output_type", "np"),
                 **kw)


@pytest.mark.parametrize("model, cache", [("digits-dit", "fora:1"), ("digits-sd", "ep:all:noise=off"),
                                          ("digits-dit", "fbc:0")])
@pytest.mark.parametrize("sampler", ["ddim@8", "s-pndm@8", "dpm++2m@8 + time-shift"])
def test_all_compute_cache_with_any_sampler_equals_the_sampler_alone(model, cache, sampler):
    """A cache that computes everything is the identity: exact equality with the sampler alone."""
    a = generate(model, f"{sampler} + {cache}").images
    b = generate(model, sampler).images
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("model, cache", [("digits-dit", "fora:1"), ("digits-sd", "ep:all:noise=off")])
def test_fk_with_an_all_compute_cache_equals_fk_alone(model, cache):
    """Resampling moves every particle's cache rows with it; with an all-compute cache FK is unchanged."""
    fk = "ddim@6:grid=model + fk:2:every=2:start=1:end=5:select=all"
    a = generate(model, f"{fk} + {cache}", ngen=4, output_type="pt")
    b = generate(model, fk, ngen=4, output_type="pt")
    torch.testing.assert_close(a.images, b.images, rtol=0, atol=0)
    assert torch.equal(a.ancestry, b.ancestry)


@pytest.mark.parametrize("model, cache", [("digits-dit", "fora:2"), ("digits-sd", "ep:uniform-2:parallel")])
def test_fk_with_a_reusing_cache_runs_and_reuses(model, cache):
    """Cache + steering (refused by the demo before) runs with the cache really reusing features."""
    from diffaccel.caching import cache_plan_counters

    pipe = fresh(model)
    cond = {"prompt": PROMPTS} if model == "digits-sd" else {"class_labels": [3, 7]}
    recipe = f"ddim@6:grid=model + fk:2:every=2:start=1:end=5:select=all + {cache}"
    with torch.no_grad(), accelerate(pipe, recipe) as h:
        out = h(**cond, generator=make_generators(0, 4), output_type="pt")
        if model == "digits-dit":
            counters = cache_plan_counters(pipe)
            assert sum(counters.reuses) > 0 and sum(counters.runs) > 0
        else:
            counters = encoder_propagation_counters(pipe)
            assert counters.encoder_passes < counters.decoded_steps
    assert out.images.shape == (4, 1, 32, 32) and torch.isfinite(out.images).all()
    assert out.ancestry.shape[0] == len(out.events) == 3


def test_time_shift_with_steering_runs():
    """Time-Shift + FK (refused by the demo before): Time-Shift keeps no per-row state, so resampling is safe."""
    out = generate("digits-dit", "ddim@6:grid=model + time-shift:window=20 + fk:2:every=2:start=1:end=5:select=all",
                   ngen=4, output_type="pt")
    assert out.images.shape == (4, 1, 32, 32) and len(out.events) >= 2


def test_one_step_with_best_of_n_keeps_the_best_student_sample():
    out = generate("digits-sd", "one-step + best-of-n:2", output_type="pt")
    assert out.images.shape == (2, 1, 32, 32)
    for s in out.searches:
        assert s.reward == max(s.history[0]) and s.nfe["nfe"] == 2


def test_best_of_one_on_the_student_equals_the_student_on_a_fresh_pipeline():
    """Regression: on a pipeline never called before, the student's CFG-row hook read a missing guidance scale
    during best-of-N's own loop and ran the student on the unconditional rows too (FID 26 instead of 4 at n=200)."""
    pipe = fresh("digits-sd")
    with torch.no_grad(), accelerate(pipe, "one-step + best-of-n:1") as h:
        best = h(prompt=PROMPTS, generator=make_generators(0, 2), output_type="pt").images
    student = generate("digits-sd", "one-step", output_type="pt").images
    # one prompt per search against both prompts in one batch: batch-size round-off of one student call
    atol = network_atol(pipe.unet) + network_atol(pipe.vae)
    assert best.shape == student.shape and torch.allclose(best, student, atol=atol), (best - student).abs().max()


def test_patch_parallel_on_one_process_is_the_plain_path():
    a = generate("digits-sd", "ddim@6 + patch-parallel:sync").images
    b = generate("digits-sd", "ddim@6").images
    np.testing.assert_array_equal(a, b)


def test_sampler_sets_the_default_step_count_of_handle_calls():
    pipe = fresh("digits-dit")
    from diffaccel.core import count_nfe

    with accelerate(pipe, "f-pndm@13") as h, count_nfe(pipe) as nfe, torch.no_grad():
        h(class_labels=[1], generator=make_generators(0, 1), output_type="np")
    assert nfe.calls == 13


def test_fk_returns_the_best_particle_per_prompt_by_default():
    best = generate("digits-dit", "ddim@6:grid=model + fk:2:every=2:start=1:end=5", ngen=4, output_type="pt")
    every = generate("digits-dit", "ddim@6:grid=model + fk:2:every=2:start=1:end=5:select=all", ngen=4,
                     output_type="pt")
    assert best.images.shape == (2, 1, 32, 32)
    assert torch.equal(best.images, every.images[every.best()])
    assert torch.equal(best.searches[0].rewards, every.rewards)


def test_handle_as_pipeline_keeps_the_call_signature():
    import inspect

    pipe = fresh("digits-dit")
    with accelerate(pipe, "ddim@6 + best-of-n:2") as h:
        stand_in = h.as_pipeline()
        assert inspect.signature(stand_in.__call__) == inspect.signature(pipe.__call__)
        assert stand_in.transformer is pipe.transformer
        with torch.no_grad():
            out = stand_in([3], generator=make_generators(0, 1), output_type="np")
        assert out.images.shape == (1, 32, 32, 1)
