"""HarmoniCa cache plans on the stock DiT / PixArt pipelines."""

import numpy as np
import pytest
import torch
from diffaccel import zoo
from diffaccel.caching import (
    CachePlan,
    Router,
    apply_cache_plan,
    cache_plan_counters,
    cached_call,
    fora_plan,
    random_plan,
    remove_cache_plan,
    shipped_plans,
)
from diffaccel.caching.harmonica import (
    STEP_HOOK,
    UNIT_HOOK,
    plan_flops_ratio,
    resample_plan,
    unit_flops,
    unit_modules,
)
from diffaccel.core import make_generators
from zoo_pipes import quiet_pipeline

STEPS = 4


@pytest.fixture(scope="module")
def dit():
    return quiet_pipeline("random-dit")


@pytest.fixture(scope="module")
def pixart():
    return quiet_pipeline("random-pixart")


def run_dit(pipe, labels=(1, 2), steps=STEPS, seed=0):
    return pipe(list(labels), num_inference_steps=steps, generator=make_generators(seed, len(labels)),
                output_type="np").images


def run_pixart(pipe, steps=3, seed=0):
    return pipe(["a digit", "the number"], num_inference_steps=steps, generator=make_generators(seed, 2),
                use_resolution_binning=False, clean_caption=False, output_type="np").images


def no_toolkit_hooks(model):
    for _, m in model.named_modules():
        reg = m.__dict__.get("_diffusers_hook")
        if reg is not None and (reg.get_hook(STEP_HOOK) or reg.get_hook(UNIT_HOOK)):
            return False
    return True


def test_unit_layout_dit_and_pixart(dit, pixart):
    names = [n for n, _ in unit_modules(dit.transformer)]
    assert names == ["transformer_blocks.0.attn1", "transformer_blocks.0.ff",
                     "transformer_blocks.1.attn1", "transformer_blocks.1.ff"]
    assert unit_modules(dit.transformer)[1][1] is dit.transformer.transformer_blocks[0].ff
    names = [n for n, _ in unit_modules(pixart.transformer)]
    assert names[:3] == ["transformer_blocks.0.attn1", "transformer_blocks.0.attn2", "transformer_blocks.0.ff"]


def test_all_compute_plan_is_bit_exact_and_removal_restores(dit):
    base = run_dit(dit)
    apply_cache_plan(dit, fora_plan(STEPS, 4, 1, model=dit))
    try:
        cached = run_dit(dit)
    finally:
        remove_cache_plan(dit)
    assert np.array_equal(base, cached)
    assert no_toolkit_hooks(dit.transformer)
    assert np.array_equal(base, run_dit(dit))


def test_plan_runs_in_stock_pipelines_obeys_plan_and_does_not_leak(dit, pixart):
    plan = random_plan(STEPS, 4, 0.4, seed=3, model=dit)
    base = run_dit(dit)
    apply_cache_plan(dit, plan)
    try:
        a = run_dit(dit)
        counters = cache_plan_counters(dit)
        run_dit(dit, labels=(5, 6, 7), seed=9)  # other batch size in between
        b = run_dit(dit)
        c = cached_call(dit, class_labels=[1, 2], num_inference_steps=STEPS, generator=make_generators(0, 2),
                        output_type="np").images
    finally:
        remove_cache_plan(dit)
    assert np.array_equal(a, b) and np.array_equal(a, c)
    assert not np.array_equal(a, base)
    computed = plan.mask.sum(dim=0).tolist()
    assert counters.runs == computed  # R5: real executions per unit = the plan's count
    assert counters.reuses == [STEPS - n for n in computed]
    assert sum(counters.reuses) == plan.skipped_units

    ref = run_pixart(pixart)
    apply_cache_plan(pixart, fora_plan(3, 6, 1, model=pixart))
    try:
        assert np.array_equal(run_pixart(pixart), ref)  # R1 on PixArt too
    finally:
        remove_cache_plan(pixart)
    apply_cache_plan(pixart, fora_plan(3, 6, 2, model=pixart))
    try:
        x, y = run_pixart(pixart), run_pixart(pixart)
        assert cache_plan_counters(pixart).runs == [2] * 6
    finally:
        remove_cache_plan(pixart)
    assert np.array_equal(x, y) and np.isfinite(x).all()


def test_reused_value_is_last_computed_output(dit):
    plan = fora_plan(STEPS, 4, 3, model=dit)  # compute at steps 0 and 3
    unit = dit.transformer.transformer_blocks[1].ff
    seen = []
    handle = unit.register_forward_hook(lambda m, i, o: seen.append(o))
    apply_cache_plan(dit, plan)
    try:
        run_dit(dit)
    finally:
        remove_cache_plan(dit)
        handle.remove()
    assert len(seen) == STEPS
    assert all(seen[s].data_ptr() == seen[0].data_ptr() and torch.equal(seen[s], seen[0]) for s in (1, 2))
    assert not torch.equal(seen[3], seen[0])
    snapshot = seen[0].clone()
    assert torch.equal(seen[0], snapshot)  # the block gates the cached tensor out of place: never mutated


def _ff_outputs(dit, plan: CachePlan, steps: int) -> tuple[list[torch.Tensor], list[int]]:
    """What block 1's ff unit handed out at each step under `plan` (a forward hook sees it, computed or not), and
    one entry per step it computed (its net[0] runs only then)."""
    unit = dit.transformer.transformer_blocks[1].ff
    handed, runs = [], []
    h1 = unit.register_forward_hook(lambda m, i, o: handed.append(o.clone()))
    h2 = unit.net[0].register_forward_pre_hook(lambda m, i: runs.append(1))
    apply_cache_plan(dit, plan)
    try:
        run_dit(dit, steps=steps)
    finally:
        remove_cache_plan(dit)
        h1.remove()
        h2.remove()
    return handed, runs


def test_forecast_hands_out_the_order_one_extrapolation(dit, tmp_path):
    """forecast=1: at a reused step s the unit's value is c1 + (c1 - c0) (s - s1) / (s1 - s0) from its two latest
    computed outputs (steps s0 < s1); with one computation only, the last output. Elementwise float32 arithmetic
    on the same tensors in the same order: exact."""
    steps = 7
    plan = fora_plan(steps, 4, 3, model=dit, forecast=1)  # compute at 0, 3, 6
    handed, runs = _ff_outputs(dit, plan, steps)
    assert len(handed) == steps and len(runs) == 3
    c0, c3 = handed[0], handed[3]
    assert torch.equal(handed[1], c0) and torch.equal(handed[2], c0)  # one computation so far: the last output
    assert torch.equal(handed[4], c3 + (c3 - c0) * (1 / 3)) and torch.equal(handed[5], c3 + (c3 - c0) * (2 / 3))
    back = CachePlan.load(plan.save(tmp_path / "f.safetensors"))
    assert back.forecast == 1 and torch.equal(back.mask, plan.mask)
    with pytest.raises(ValueError, match="forecast"):
        CachePlan(plan.mask, forecast=3)


def test_forecast_two_hands_out_taylorseers_order_two_expansion(dit):
    """forecast=2 with computations at the uneven steps 0, 1, 3, 6: the last output after one computation, the
    order-1 forecast after two, then c2 + f1 k + f2 k^2 / 2 (k = s - s2) from the last three, with the derivatives
    estimated as TaylorSeer does: f1 = (c2 - c1) / (s2 - s1), f2 = (f1 - (c1 - c0) / (s1 - s0)) / (s2 - s1). Written
    here in another order of float32 operations: a few roundings of terms of the outputs' size apart."""
    steps, full = 8, (0, 1, 3, 6)
    mask = torch.tensor([[s in full] * 4 for s in range(steps)])
    plan = CachePlan(mask, forecast=2)  # a generic plan: checked by its unit count only
    handed, runs = _ff_outputs(dit, plan, steps)
    assert len(handed) == steps and len(runs) == len(full)
    c = {s: handed[s] for s in full}
    assert torch.equal(handed[2], c[1] + (c[1] - c[0]) * ((2 - 1) / (1 - 0)))  # two computations: order 1
    scale = float(max(v.abs().max() for v in c.values()))
    for s in (4, 5, 7):
        s0, s1, s2 = [f for f in full if f < s][-3:]
        k = s - s2
        f1 = (c[s2] - c[s1]) / (s2 - s1)
        f2 = (f1 - (c[s1] - c[s0]) / (s1 - s0)) / (s2 - s1)
        expected = c[s2] + f1 * k + f2 * (k * k / 2)
        # terms up to ~4x the outputs' size (f2 k^2 / 2 with k <= 2, spacings >= 1), a few roundings each
        assert float((handed[s] - expected).abs().max()) <= 64 * torch.finfo(torch.float32).eps * scale, s
        assert not torch.allclose(handed[s], c[s2] + f1 * k)  # the second-order term is there


def test_usage_ratio_counts_skipped_units_and_baselines():
    plan = fora_plan(6, 4, 3)
    assert plan.skipped_units == int((~plan.mask).sum()) == 16
    assert plan.usage_ratio == pytest.approx(16 / 24)
    rp = random_plan(10, 8, 0.3, seed=1)
    assert rp.skipped_units == 24 and rp.usage_ratio == pytest.approx(0.3)
    assert rp.mask[0].all()
    assert torch.equal(rp.mask, random_plan(10, 8, 0.3, seed=1).mask)
    with pytest.raises(ValueError, match="reusable"):
        random_plan(2, 4, 0.9)
    with pytest.raises(ValueError, match="row 0"):
        CachePlan(torch.tensor([[True, False], [True, True]]))


def test_plan_and_router_save_load_round_trip(tmp_path, dit):
    router = Router.for_model(dit, STEPS, seed=5)
    with torch.no_grad():
        router.rows[1][2] = -4.0
    plan = router.to_plan(0.1)
    assert plan.mask[0].all() and not plan.mask[2, 2]
    plan.metadata["command"] = "diffaccel cache train-router --steps 4"
    p = plan.save(tmp_path / "p.safetensors")
    back = CachePlan.load(p)
    assert torch.equal(back.mask, plan.mask) and back.metadata == plan.metadata
    assert (back.model_class, back.num_blocks, back.units, back.scheduler_class) == \
        ("DiTTransformer2DModel", 2, ("attn1", "ff"), "DDIMScheduler")
    r = Router.load(router.save(tmp_path / "r.safetensors"))
    assert torch.equal(r.logits, router.logits) and torch.equal(r.to_plan().mask, plan.mask)
    assert r.logits[0].eq(5.0).all()


def test_import_released_router_flips_step_order(dit):
    n = STEPS
    released = {f"routers.{i}.prob": torch.full((4,), float(i)) for i in range(n)}  # stored by respaced index
    router = Router.from_released(released, model=dit)
    assert router.logits[1:, 0].tolist() == [float(n - 1 - s) for s in range(1, n)]
    assert router.logits[0].eq(5.0).all() and router.model_class == "DiTTransformer2DModel"
    with pytest.raises(ValueError, match="6 units per step but the model has 4"):
        Router.from_released({f"{i}.prob": torch.zeros(6) for i in range(n)}, model=dit)


def test_bad_input_errors_name_both_sides(dit, pixart):
    with pytest.raises(ValueError, match="PixArtTransformer2DModel.*DiTTransformer2DModel|DiTTransformer2DModel.*Pix"):
        apply_cache_plan(pixart, fora_plan(3, 4, 2, model=dit))
    deeper = CachePlan(torch.ones(STEPS, 6, dtype=torch.bool), "DiTTransformer2DModel", 3, ("attn1", "ff"))
    with pytest.raises(ValueError, match="3 transformer blocks but the model has 2"):
        apply_cache_plan(dit, deeper)
    with pytest.raises(ValueError, match="6 unit columns but the model has 4"):
        apply_cache_plan(dit, CachePlan(torch.ones(STEPS, 6, dtype=torch.bool)))
    other = CachePlan(torch.ones(STEPS, 4, dtype=torch.bool), "DiTTransformer2DModel", 2, ("attn1", "ff"),
                      "DPMSolverMultistepScheduler")
    with pytest.raises(ValueError, match="DDIMScheduler.*DPMSolverMultistepScheduler"):
        apply_cache_plan(dit, other)
    apply_cache_plan(dit, fora_plan(STEPS, 4, 2, model=dit))
    try:
        with pytest.raises(ValueError, match="already attached"):
            apply_cache_plan(dit, fora_plan(STEPS, 4, 2, model=dit))
        with pytest.raises(ValueError, match=f"runs 6 steps but the cache plan was made for {STEPS}"):
            run_dit(dit, steps=6)
        run_dit(dit)  # a refused generation does not poison the next one
    finally:
        remove_cache_plan(dit)
    apply_cache_plan(dit.transformer, fora_plan(STEPS, 4, 2, model=dit))  # bare transformer: checked per step
    try:
        with pytest.raises(ValueError, match=f"past the cache plan's {STEPS} steps"):
            run_dit(dit, steps=STEPS + 2)
    finally:
        remove_cache_plan(dit.transformer)
    block = dit.transformer.transformer_blocks[0]
    block.set_chunk_feed_forward(2, 1)
    try:
        with pytest.raises(ValueError, match="chunking"):
            apply_cache_plan(dit, fora_plan(STEPS, 4, 2, model=dit))
    finally:
        block.set_chunk_feed_forward(None, 0)
    assert no_toolkit_hooks(dit.transformer)


def test_flops_ratio_and_resample(dit):
    total, per_unit = unit_flops(dit.transformer)
    assert len(per_unit) == 4 and all(f > 0 for f in per_unit) and sum(per_unit) < total
    assert plan_flops_ratio(fora_plan(STEPS, 4, 1), total, per_unit) == 1.0
    r2 = plan_flops_ratio(fora_plan(STEPS, 4, 2), total, per_unit)
    assert r2 == pytest.approx(STEPS * total / (STEPS * total - 2 * sum(per_unit)))
    big = zoo.load("random-dit")
    big.transformer.transformer_blocks.extend(list(big.transformer.transformer_blocks))  # 4 blocks (structure)
    plan = resample_plan(fora_plan(STEPS, 4, 2, model=dit), big)
    assert plan.num_units == 8 and plan.usage_ratio == pytest.approx(0.5)


def test_shipped_plans_load_and_fit_digits_dit():
    plans = {n: p for n, p in shipped_plans().items() if n.startswith("digits-dit-")}
    assert plans and all(n.startswith(("digits-dit-", "digits-flux-")) for n in shipped_plans())
    pipe = zoo.load("digits-dit")
    for path in plans.values():
        plan = CachePlan.load(path)
        apply_cache_plan(pipe, plan)
        remove_cache_plan(pipe)


def test_cli_plan_info(tmp_path, capsys):
    from diffaccel.cli import main

    path = fora_plan(5, 4, 2).save(tmp_path / "f.safetensors")
    assert main(["cache", "plan-info", str(path), "--json"]) == 0
    assert '"usage_ratio": 0.4' in capsys.readouterr().out
    assert main(["cache", "plan-info", str(tmp_path / "missing.safetensors")]) == 2
    assert "no cache plan file" in capsys.readouterr().err
    assert main(["cache", "plan-info"]) == 0


@pytest.mark.parametrize("name, skipped, order", [("digits-dit-20-calibrated-1.90x-forecast-greedy", 0.5, 1),
                                                  ("digits-dit-20-calibrated-2.61x-forecast-local", 0.65, 1),
                                                  ("digits-dit-20-calibrated-2.61x-forecast2-local", 0.65, 2)])
def test_shipped_calibrated_forecast_plans(name, skipped, order):
    """The calibrated plans of benchmarks/dit_caches.py skip as many units as FORA-2 / FORA-3 (the compute they
    are compared at), forecast what they reuse, compute every unit at step 0, and run through the protocol."""
    from diffaccel import accelerate

    plan = CachePlan.load(name)
    assert plan.forecast == order and plan.num_steps == 20 and bool(plan.mask[0].all())
    assert plan.usage_ratio == pytest.approx(skipped)  # usage: the fraction of unit outputs taken from the cache
    assert plan.metadata["search"] in ("greedy", "local") and "dit_caches.py" in plan.metadata["command"]
    pipe = zoo.load("digits-dit")
    pipe.set_progress_bar_config(disable=True)
    with accelerate(pipe, f"harmonica:{name}") as h:
        out = h(class_labels=[3], num_inference_steps=20, generator=torch.Generator().manual_seed(0),
                output_type="np").images
    assert out.shape[0] == 1 and np.isfinite(out).all()
