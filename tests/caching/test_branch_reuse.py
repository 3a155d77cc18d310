"""Branch reuse plans on UNets: no-reuse bit-exact, DeepCache and encoder propagation as special cases."""

from __future__ import annotations

import pytest
import torch
from diffaccel.caching import (
    BranchReusePlan,
    EncoderPropagationConfig,
    apply_branch_reuse,
    apply_encoder_propagation,
    branch_plan,
    branch_reuse_counters,
    cached_call,
    deepcache_plan,
    encoder_propagation_plan,
    no_reuse_plan,
    remove_branch_reuse,
    remove_encoder_propagation,
)
from diffaccel.caching.branch_reuse import unet_units
from diffaccel.zoo import load
from diffusers import DDIMScheduler
from zoo_pipes import quiet_pipeline

STEPS = 7


@pytest.fixture(scope="module")
def pipe():
    p = quiet_pipeline("random-sd")
    p.scheduler = DDIMScheduler.from_config(p.scheduler.config)
    return p


def _run(pipe, **extra):
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    return pipe(["a handwritten digit one", "a handwritten digit two"], generator=gens, num_inference_steps=STEPS,
                guidance_scale=3.0, output_type="pt", **extra).images


@pytest.fixture(scope="module")
def plain(pipe):
    return _run(pipe)


def test_units_follow_the_skip_branches(pipe):
    units = unet_units(pipe.unet)
    r = (len(units) - 1) // 2
    assert [u.side for u in units] == ["enc"] * r + ["mid"] + ["dec"] * r
    assert [u.branch for u in units if u.side == "enc"] == list(range(r))
    assert [u.branch for u in units if u.side == "dec"] == list(range(r - 1, -1, -1))
    assert units[0].modules == (pipe.unet.conv_in,) and units[r].modules == (pipe.unet.mid_block,)
    # every up-block resnet is in exactly one decoder unit; the upsampler rides with its block's last layer
    dec_mods = [m for u in units if u.side == "dec" for m in u.modules]
    for block in pipe.unet.up_blocks:
        assert all(sum(m is res for m in dec_mods) == 1 for res in block.resnets)


def test_no_reuse_plan_is_bit_exact_and_removal_restores(pipe, plain):
    apply_branch_reuse(pipe, no_reuse_plan(STEPS, pipe.unet))
    try:
        got = _run(pipe)
        counters = branch_reuse_counters(pipe)
    finally:
        remove_branch_reuse(pipe)
    assert torch.equal(got, plain)  # the same computation: exact equality
    assert counters.calls == STEPS and sum(counters.reused) == 0
    assert "_diffusers_hook" not in pipe.unet.__dict__  # nothing left behind
    assert torch.equal(_run(pipe), plain)


def test_encoder_propagation_is_a_special_case(pipe, plain):
    keys = [0, 2, 4]
    apply_branch_reuse(pipe, encoder_propagation_plan(STEPS, pipe.unet, keys))
    try:
        ours = _run(pipe)
        counters = branch_reuse_counters(pipe)
    finally:
        remove_branch_reuse(pipe)
    apply_encoder_propagation(pipe, EncoderPropagationConfig(key_steps=keys, noise_injection=None))
    try:
        gens = [torch.Generator().manual_seed(i) for i in range(2)]
        theirs = cached_call(pipe, prompt=["a handwritten digit one", "a handwritten digit two"], generator=gens,
                             num_inference_steps=STEPS, guidance_scale=3.0, output_type="pt").images
    finally:
        remove_encoder_propagation(pipe)
    assert torch.equal(ours, theirs)  # identical computations (sequential decoding, no noise injection)
    assert not torch.equal(ours, plain)
    units = unet_units(pipe.unet)
    assert all(counters.reused[i] == STEPS - len(keys) for i, u in enumerate(units) if u.side != "dec")
    assert all(counters.reused[i] == 0 for i, u in enumerate(units) if u.side == "dec")


@pytest.mark.parametrize(("interval", "branch"), [(2, 0), (3, 1), (3, 4)])
def test_deepcache_rule_equals_the_deepcache_package(pipe, interval, branch):
    deepcache = pytest.importorskip("DeepCache", reason="bench-only extra: pip install --no-deps deepcache")
    helper = deepcache.DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    try:
        theirs = _run(pipe)
    finally:
        helper.disable()
    apply_branch_reuse(pipe, deepcache_plan(STEPS, pipe.unet, interval, branch))
    try:
        ours = _run(pipe)
    finally:
        remove_branch_reuse(pipe)
    assert torch.equal(ours, theirs)  # same layers computed on the same inputs, the rest reused: bit-exact


def test_branch_mask_reading_and_plan_files(pipe, tmp_path):
    units = unet_units(pipe.unet)
    r = (len(units) - 1) // 2
    mask = torch.ones(3, r, dtype=torch.bool)
    mask[1, 1:] = False  # step 1: recompute only branch 0 (DeepCache branch-0 style cut)
    plan = branch_plan(mask, pipe.unet, {"kind": "test"})
    row = dict(zip((u.name for u in units), plan.mask[1].tolist(), strict=True))
    assert [v for k, v in row.items() if k.startswith("enc")] == [True] + [False] * (r - 1)
    assert not row["mid"] and [v for k, v in row.items() if k.startswith("dec_")][-1] is True
    path = plan.save(tmp_path / "p.branch.safetensors")
    back = BranchReusePlan.load(path)
    assert torch.equal(back.mask, plan.mask) and back.unit_names == plan.unit_names and back.metadata == {"kind":
                                                                                                          "test"}


def test_bad_plans_are_refused(pipe):
    n = len(unet_units(pipe.unet))
    with pytest.raises(ValueError, match="row 0"):
        BranchReusePlan(torch.zeros(2, n, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"2R \+ 1"):
        BranchReusePlan(torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="units"):
        apply_branch_reuse(pipe, BranchReusePlan(torch.ones(2, n + 2, dtype=torch.bool)))
    apply_branch_reuse(pipe, no_reuse_plan(STEPS + 1, pipe.unet))
    try:
        with pytest.raises(ValueError, match="steps"):
            _run(pipe)
        with pytest.raises(ValueError, match="already attached"):
            apply_branch_reuse(pipe, no_reuse_plan(STEPS, pipe.unet))
    finally:
        remove_branch_reuse(pipe)
    with pytest.raises(ValueError, match="interval"):
        deepcache_plan(STEPS, pipe.unet, 0)


def test_shipped_plans_fit_digits_sd():
    from diffaccel.caching import shipped_unet_plans
    from diffaccel.caching.branch_reuse import check_plan
    from diffaccel.caching.calibrate import plan_from_rows

    shipped = shipped_unet_plans()
    assert {"digits-sd-50-branch-reuse-1.70x", "digits-sd-50-branch-reuse-2.15x"} <= set(shipped)
    unet = load("digits-sd").unet
    for path in shipped.values():
        plan = BranchReusePlan.load(path)
        check_plan(plan, unet)
        assert plan.num_steps == 50 and plan.metadata["model"] == "digits-sd"
        rows = plan.metadata["rows"].split(",")
        assert torch.equal(plan_from_rows(rows, unet).mask, plan.mask)  # the row names rebuild the plan exactly
