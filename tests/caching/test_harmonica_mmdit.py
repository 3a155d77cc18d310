"""HarmoniCa / FORA cache units on MMDiT transformers (SD3's joint blocks, Flux's double- and single-stream blocks)
in their stock pipelines: unit layout, all-compute bit-exactness, reuse, and refusals naming both sides."""

import pytest
import torch
from diffaccel import zoo
from diffaccel.caching import apply_cache_plan, cache_plan_counters, remove_cache_plan
from diffaccel.caching.harmonica import check_plan, fora_plan, unit_modules
from diffaccel.core import make_generators

STEPS = 4


def _pipe(name):
    pipe = zoo.load(name)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, seed=0):
    with torch.no_grad():
        return pipe(["a handwritten digit seven", "the number two"], num_inference_steps=STEPS, height=32, width=32,
                    max_sequence_length=16, generator=make_generators(seed, 2), output_type="latent").images


def _run_with_fora(pipe, interval):
    """One call's output and cache counters with a FORA plan of `interval` attached (removed afterwards)."""
    apply_cache_plan(pipe, fora_plan(STEPS, len(unit_modules(pipe.transformer)), interval, model=pipe))
    try:
        return _run(pipe), cache_plan_counters(pipe)
    finally:
        remove_cache_plan(pipe)


def test_unit_layouts():
    sd3 = [n for n, _ in unit_modules(_pipe("random-sd3").transformer)]
    # the last joint block is context_pre_only: it has no context MLP
    assert sd3 == ["transformer_blocks.0.attn", "transformer_blocks.0.ff", "transformer_blocks.0.ff_context",
                   "transformer_blocks.1.attn", "transformer_blocks.1.ff"]
    flux = [n for n, _ in unit_modules(_pipe("random-flux").transformer)]
    assert flux == ["transformer_blocks.0.attn", "transformer_blocks.0.ff", "transformer_blocks.0.ff_context",
                    "single_transformer_blocks.0.attn", "single_transformer_blocks.0.proj_mlp"]


@pytest.mark.parametrize("name", ["random-sd3", "random-flux"])
def test_all_compute_plan_is_bit_exact_in_the_stock_pipeline(name):
    pipe = _pipe(name)
    base = _run(pipe)
    out, c = _run_with_fora(pipe, 1)
    assert torch.equal(out, base)
    assert sum(c.reuses) == 0 and min(c.runs) > 0
    assert torch.equal(_run(pipe), base)


@pytest.mark.parametrize("name", ["random-sd3", "random-flux"])
def test_fora_reuses_every_unit_including_two_stream_attention(name):
    pipe = _pipe(name)
    base = _run(pipe)
    out, c = _run_with_fora(pipe, 2)
    rows = 2 if name == "random-sd3" else 1  # SD3 batches CFG rows in one call; Flux (distilled guidance) does not
    assert c.calls == STEPS and all(r > 0 for r in c.reuses), (rows, c)
    assert torch.isfinite(out).all() and not torch.equal(out, base)


@pytest.mark.parametrize("forecast", [0, 1])
def test_flux_single_stream_output_reuse_is_bit_exact_and_skips_proj_out(forecast):
    """When both units of a single-stream block are handed out unchanged, the block's proj_out is not run again:
    the output equals the same plan with that hook removed, bit for bit, with fewer FLOPs. With the forecast a
    reused unit hands out an extrapolation once it has two computations, and proj_out then runs."""
    from diffaccel.caching.harmonica import OUTPUT_HOOK
    from diffaccel.core.flops import flop_counter
    from diffaccel.core.hooks import remove_hooks

    pipe = _pipe("random-flux")
    plan = fora_plan(STEPS, len(unit_modules(pipe.transformer)), 2, model=pipe, forecast=forecast)
    results = []
    for keep in (True, False):
        apply_cache_plan(pipe, plan)
        try:
            if not keep:
                remove_hooks(pipe.transformer, [OUTPUT_HOOK])
            with flop_counter() as fc:
                out = _run(pipe)
            results.append((out, cache_plan_counters(pipe).output_reuses, fc.get_total_flops()))
        finally:
            remove_cache_plan(pipe)
    (a, reused_a, flops_a), (b, reused_b, flops_b) = results
    # FORA n=2 at 4 steps, one single-stream block, one call per step: steps 1 and 3 reuse; with the forecast
    # step 3 extrapolates (computations at 0 and 2), so only step 1 hands out the stored outputs
    assert torch.equal(a, b) and reused_b == 0 and flops_a < flops_b
    assert reused_a == (1 if forecast else 2)


def test_a_flux_plan_on_sd3_is_refused_naming_both():
    flux, sd3 = _pipe("random-flux"), _pipe("random-sd3")
    plan = fora_plan(STEPS, len(unit_modules(flux.transformer)), 2, model=flux)
    with pytest.raises(ValueError, match="made for FluxTransformer2DModel but the model is SD3Transformer2DModel"):
        check_plan(plan, sd3)
    with pytest.raises(ValueError, match="made for FluxTransformer2DModel but the model is SD3Transformer2DModel"):
        apply_cache_plan(sd3, plan)


def test_a_flux_plan_on_dit_and_an_sd3_plan_on_flux_are_refused_naming_both():
    flux, sd3, dit = _pipe("random-flux"), _pipe("random-sd3"), _pipe("random-dit")
    plan = fora_plan(STEPS, len(unit_modules(flux.transformer)), 2, model=flux)
    with pytest.raises(ValueError, match="made for FluxTransformer2DModel but the model is DiTTransformer2DModel"):
        apply_cache_plan(dit, plan)
    sd3_plan = fora_plan(STEPS, len(unit_modules(sd3.transformer)), 2, model=sd3)
    with pytest.raises(ValueError, match="made for SD3Transformer2DModel but the model is FluxTransformer2DModel"):
        apply_cache_plan(flux, sd3_plan)


def test_forecast_extrapolates_both_streams_of_flux_units():
    """forecast=1 on Flux: a reused unit hands out c1 + (c1 - c0) (s - s1) / (s1 - s0) from its two latest computed
    outputs, stream by stream for the double-stream attention (image and text outputs) and as one tensor for the
    single-stream attention and MLP projection (TaylorSeer, Liu et al. 2025, Eq. 6 at order 1). Same float32 ops on
    the same tensors: exact."""
    steps = 7  # FORA interval 3: computed at steps 0, 3, 6
    pipe = _pipe("random-flux")
    units = dict(unit_modules(pipe.transformer))
    watched = ["transformer_blocks.0.attn", "transformer_blocks.0.ff_context", "single_transformer_blocks.0.attn",
               "single_transformer_blocks.0.proj_mlp"]
    handed = {n: [] for n in watched}  # a forward hook sees what the unit hands out, computed or reused

    def keep(name):
        def hook(module, args, out):
            handed[name].append(tuple(o.clone() for o in out) if isinstance(out, tuple) else out.clone())
        return hook

    handles = [units[n].register_forward_hook(keep(n)) for n in watched]
    plan = fora_plan(steps, len(units), 3, model=pipe, forecast=1)
    apply_cache_plan(pipe, plan)
    try:
        with torch.no_grad():
            out = pipe(["a handwritten digit seven"], num_inference_steps=steps, height=32, width=32,
                       max_sequence_length=16, generator=make_generators(0, 1), output_type="latent").images
        counters = cache_plan_counters(pipe)
    finally:
        remove_cache_plan(pipe)
        for h in handles:
            h.remove()
    assert counters.runs == [3] * len(units) and counters.reuses == [4] * len(units)

    def expect(c1, c0, w):
        if isinstance(c1, tuple):
            return tuple(a + (a - b) * w for a, b in zip(c1, c0, strict=True))
        return c1 + (c1 - c0) * w

    def same(a, b):
        return all(map(torch.equal, a, b)) if isinstance(a, tuple) else torch.equal(a, b)

    for name in watched:
        h = handed[name]
        assert len(h) == steps, name
        if name == "transformer_blocks.0.attn":
            assert isinstance(h[0], tuple) and len(h[0]) == 2  # image and text streams
        assert same(h[1], h[0]) and same(h[2], h[0]), name  # one computation so far: the last output
        assert same(h[4], expect(h[3], h[0], 1 / 3)) and same(h[5], expect(h[3], h[0], 2 / 3)), name
        assert not same(h[4], h[3]), name  # the forecast moved the value
    # a FORA plan without the forecast differs from the forecast plan on the same seeds
    apply_cache_plan(pipe, fora_plan(steps, len(units), 3, model=pipe))
    try:
        with torch.no_grad():
            plain = pipe(["a handwritten digit seven"], num_inference_steps=steps, height=32, width=32,
                         max_sequence_length=16, generator=make_generators(0, 1), output_type="latent").images
    finally:
        remove_cache_plan(pipe)
    assert torch.isfinite(out).all() and not torch.equal(out, plain)


def test_shipped_digits_flux_plans_fit_digits_flux_and_are_refused_elsewhere():
    """Every shipped digits-flux plan: 28 steps, the Flux layout, FlowMatch-Euler; attached to digits-flux a generation
    runs and every unit is executed exactly as often as the plan says; on digits-dit and random-sd3 it is refused
    naming both transformer classes."""
    from diffaccel.caching.harmonica import CachePlan, shipped_plans
    from diffaccel.zoo.quality import flux_call_kwargs

    plans = {n: p for n, p in shipped_plans().items() if n.startswith("digits-flux-")}
    if not plans:
        pytest.skip("no digits-flux plan shipped")
    pipe = _pipe("digits-flux")
    others = [(_pipe("digits-dit"), "DiTTransformer2DModel"), (_pipe("random-sd3"), "SD3Transformer2DModel")]
    for name, path in plans.items():
        plan = CachePlan.load(path)
        assert plan.num_steps == 28 and plan.model_class == "FluxTransformer2DModel", name
        assert plan.scheduler_class == "FlowMatchEulerDiscreteScheduler" and 0 < plan.usage_ratio < 1, name
        apply_cache_plan(pipe, name)
        try:
            with torch.no_grad():
                out = pipe(["a handwritten digit five"], num_inference_steps=28, generator=make_generators(0, 1),
                           output_type="latent", **flux_call_kwargs(pipe, 0, None)).images
            c = cache_plan_counters(pipe)
        finally:
            remove_cache_plan(pipe)
        assert torch.isfinite(out).all()
        assert c.runs == plan.mask.sum(0).tolist() and c.reuses == (~plan.mask).sum(0).tolist(), name
        for other, cls in others:
            with pytest.raises(ValueError, match=f"made for FluxTransformer2DModel but the model is {cls}"):
                apply_cache_plan(other, name)
