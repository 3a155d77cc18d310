"""diffusers' own caches on DiT / PixArt (no cache context in their pipelines) and on CacheMixin models (Flux)."""

import pytest
import torch
from diffaccel.caching.diffusers_caches import (
    CONTEXT_HOOK,
    apply_diffusers_cache,
    calibrate_mag_ratios,
    remove_diffusers_cache,
)
from diffaccel.core import make_generators
from diffaccel.core.errors import InputError
from diffaccel.core.hooks import get_hook
from diffusers import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig
from zoo_pipes import quiet_pipeline

STEPS = 6


def _dit_call(pipe, seed=0):
    with torch.no_grad():
        return pipe(class_labels=[1, 7], num_inference_steps=STEPS, guidance_scale=4.0,
                    generator=make_generators(seed, 2), output_type="np").images


def _pixart_call(pipe, seed=0):
    with torch.no_grad():
        return pipe(["a handwritten digit seven", "the number two"], num_inference_steps=STEPS, guidance_scale=4.0,
                    height=32, width=32, use_resolution_binning=False, generator=make_generators(seed, 2),
                    output_type="np").images


class _Counter:
    """Calls of the last transformer block's attention: it runs only when the block computes (diffusers' hooks
    replace the block's `forward`, so a pre-hook on the block itself would count skipped calls too)."""

    def __init__(self, block):
        self.n = 0
        self.handle = block.attn1.register_forward_pre_hook(lambda *_: setattr(self, "n", self.n + 1))


@pytest.fixture(scope="module")
def dit():
    return quiet_pipeline("random-dit")


def test_stock_diffusers_needs_a_context_on_dit(dit):
    """Why the outer hook exists: diffusers' hook alone fails in DiTPipeline, which opens no cache context."""
    from diffusers.hooks import apply_first_block_cache

    pipe = quiet_pipeline("random-dit")
    apply_first_block_cache(pipe.transformer, FirstBlockCacheConfig(threshold=0.1))
    with pytest.raises(ValueError, match="cache context"):
        _dit_call(pipe)


@pytest.mark.parametrize("family", ["dit", "pixart"])
def test_never_reusing_equals_the_plain_pipeline_and_removal_restores(family, dit):
    """threshold 0: the residual test never passes, every block runs every step: the same computation, bit-exact."""
    pipe, call = (dit, _dit_call) if family == "dit" else (quiet_pipeline("random-pixart"), _pixart_call)
    base = call(pipe)
    apply_diffusers_cache(pipe, FirstBlockCacheConfig(threshold=0.0))
    assert get_hook(pipe.transformer, CONTEXT_HOOK) is not None
    counter = _Counter(pipe.transformer.transformer_blocks[-1])
    try:
        out = call(pipe)
    finally:
        counter.handle.remove()
        remove_diffusers_cache(pipe)
    assert counter.n == STEPS
    assert (out == base).all()
    assert "forward" not in pipe.transformer.__dict__ and "_diffusers_hook" not in pipe.transformer.__dict__
    assert (call(pipe) == base).all()


def test_first_block_cache_skips_blocks_and_each_generation_starts_fresh(dit):
    base = _dit_call(dit)
    apply_diffusers_cache(dit, FirstBlockCacheConfig(threshold=10.0))  # reuse whenever allowed
    counter = _Counter(dit.transformer.transformer_blocks[-1])
    try:
        first = _dit_call(dit)
        runs = counter.n
        second = _dit_call(dit)  # same seeds: a leftover cache from the first call would change it
    finally:
        counter.handle.remove()
        remove_diffusers_cache(dit)
    assert 1 <= runs < STEPS
    assert counter.n == 2 * runs
    assert (first == second).all()
    assert not (first == base).all()


def test_taylorseer_on_dit_predicts_between_updates(dit):
    """diffusers' default TaylorSeer patterns end in `attn` (Flux, SD3); DiT's units are named attn1 / ff."""
    base = _dit_call(dit)
    apply_diffusers_cache(dit, TaylorSeerCacheConfig(
        cache_interval=2, disable_cache_before_step=1,
        cache_identifiers=[r"transformer_blocks\.\d+\.attn1", r"transformer_blocks\.\d+\.ff"]))
    try:
        out = _dit_call(dit)
    finally:
        remove_diffusers_cache(dit)
    assert not (out == base).all()
    assert (_dit_call(dit) == base).all()


@pytest.mark.parametrize("order", [1, 2])
def test_forecast_plan_on_taylorseers_schedule_equals_diffusers_taylorseer(dit, order):
    """diffaccel's `CachePlan(forecast=order)` on TaylorSeer's schedule (one warm-up step, then every 2nd step after
    step 2: computes 0, 2, 4 of 6) gives diffusers' TaylorSeer images at `max_order=order` — the same expansion, in
    another order of float32 operations (order 1 multiplies the difference by k / spacing, diffusers divides first)."""
    from diffaccel.caching import CachePlan, apply_cache_plan, remove_cache_plan

    ours_mask = torch.tensor([[s in (0, 2, 4)] * 4 for s in range(STEPS)])
    apply_cache_plan(dit, CachePlan(ours_mask, forecast=order))
    try:
        ours = _dit_call(dit)
    finally:
        remove_cache_plan(dit)
    apply_diffusers_cache(dit, TaylorSeerCacheConfig(
        cache_interval=2, disable_cache_before_step=1, max_order=order,
        cache_identifiers=[r"transformer_blocks\.\d+\.attn1", r"transformer_blocks\.\d+\.ff"]))
    try:
        theirs = _dit_call(dit)
    finally:
        remove_diffusers_cache(dit)
    # one rounding apart per forecast op, amplified through 6 steps of a random-weight DiT (seen: ~190 eps)
    assert abs(ours - theirs).max() <= 1000 * torch.finfo(torch.float32).eps
    assert abs(ours - _dit_call(dit)).max() > 1e-3  # the forecast changed the images


def test_magcache_calibration_and_use_on_dit(dit):
    ratios = calibrate_mag_ratios(dit, STEPS, class_labels=[3], guidance_scale=4.0,
                                  generator=make_generators(10_000, 1))
    assert len(ratios) == STEPS and all(r > 0 for r in ratios)
    base = _dit_call(dit)
    apply_diffusers_cache(dit, MagCacheConfig(threshold=10.0, num_inference_steps=STEPS, mag_ratios=ratios,
                                              retention_ratio=0.2))
    try:
        out = _dit_call(dit)
    finally:
        remove_diffusers_cache(dit)
    assert not (out == base).all()


def test_cache_mixin_models_use_enable_cache():
    pipe = quiet_pipeline("random-flux")
    apply_diffusers_cache(pipe, FirstBlockCacheConfig(threshold=0.1))
    assert pipe.transformer.is_cache_enabled and get_hook(pipe.transformer, CONTEXT_HOOK) is None
    remove_diffusers_cache(pipe)
    assert not pipe.transformer.is_cache_enabled


def test_bad_input(dit):
    with pytest.raises(InputError, match="unknown diffusers cache config dict"):
        apply_diffusers_cache(dit, {"threshold": 0.1})
    with pytest.raises(InputError, match="no diffusers cache is applied"):
        remove_diffusers_cache(dit)
    with pytest.raises(InputError, match="no `transformer_blocks`"):
        apply_diffusers_cache(quiet_pipeline("random-sd"), FirstBlockCacheConfig(threshold=0.1))
    apply_diffusers_cache(dit, FirstBlockCacheConfig(threshold=0.1))
    try:
        with pytest.raises(InputError, match="already applied"):
            apply_diffusers_cache(dit, FirstBlockCacheConfig(threshold=0.2))
    finally:
        remove_diffusers_cache(dit)
