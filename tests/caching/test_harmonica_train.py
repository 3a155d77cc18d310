"""HarmoniCa router training: soft forward, SDT gradients, IEPO weights, checkpoint/resume."""

import math

import pytest
import torch
from diffaccel import zoo
from diffaccel.caching import Router, apply_cache_plan, cache_plan_counters, remove_cache_plan
from diffaccel.caching.harmonica import attach_router, unit_modules
from diffaccel.caching.harmonica_train import TrainConfig, TrajectorySampler, generate, image_error_proxy, train_router
from tolerances import roundoff_atol
from zoo_pipes import quiet_pipeline

STEPS = 4


@pytest.fixture(scope="module")
def dit():
    return quiet_pipeline("random-dit")


def draw(sampler, seed=0, batch=2):
    return sampler.draw(batch, 10, torch.Generator().manual_seed(seed))


def test_sampler_matches_pipeline_and_soft_forward_with_r_one_is_exact(dit):
    sampler = TrajectorySampler(dit, STEPS, 4.0)
    x, labels = draw(sampler)
    state = attach_router(dit.transformer)
    try:
        soft = generate(sampler, state, x, labels, lambda k: torch.ones(4))  # Θ = +inf: r ≡ 1
        plain = generate(sampler, state, x, labels, lambda k: None)
    finally:
        remove_cache_plan(dit)
    sched = sampler.fresh_scheduler()
    ref = x
    with torch.no_grad():
        for t in sched.timesteps:
            ref = sched.step(sampler.eps(ref, t, labels, sched), t, ref).prev_sample
    assert torch.equal(soft, ref) and torch.equal(plain, ref)


def test_soft_blend_and_write_rule(dit):
    """y = r f + (1 - r) c; the cache takes the blended value only when r > τ; teacher mode leaves it alone."""
    sampler = TrajectorySampler(dit, STEPS, 1.0)
    x, labels = draw(sampler)
    state = attach_router(dit.transformer, threshold=0.5)
    unit = dit.transformer.transformer_blocks[0].attn1
    outs = []
    handle = unit.register_forward_hook(lambda m, i, o: outs.append(o.detach().clone()))
    try:
        sched = sampler.fresh_scheduler()
        t0, t1 = sched.timesteps[:2]
        state.clear()
        state.mode, state.gates = "soft", lambda k: None
        with torch.no_grad():
            sampler.eps(x, t0, labels, sched)
            c0 = state.cache[(0, 0)].clone()
            state.mode = "teacher"
            sampler.eps(x, t1, labels, sched)  # f at step 1, cache untouched
            f1 = outs[-1]
            assert torch.equal(state.cache[(0, 0)], c0)
            state.mode, state.gates = "soft", lambda k: torch.full((4,), 0.3)
            sampler.eps(x, t1, labels, sched)
            # the blend is two products and a sum per element: at most a few roundings of max(|f1|, |c0|)
            blend_atol = roundoff_atol(torch.float32, 3, magnitude=float(torch.maximum(f1.abs(), c0.abs()).max()))
            assert torch.allclose(outs[-1], 0.3 * f1 + 0.7 * c0, atol=blend_atol, rtol=0)
            assert torch.equal(state.cache[(0, 0)], c0)  # r = 0.3 <= τ = 0.5: no write
            state.gates = lambda k: torch.full((4,), 0.8)
            sampler.eps(x, t1, labels, sched)
            assert torch.equal(state.cache[(0, 0)], outs[-1])  # r > τ: the blended value is written
    finally:
        handle.remove()
        remove_cache_plan(dit)


def test_sdt_gradient_reaches_only_its_row_and_matches_finite_difference(dit):
    transformer = dit.transformer.double()
    try:
        sampler = TrajectorySampler(dit, STEPS, 4.0)
        x, labels = draw(sampler)
        x = x.double()
        router = Router.for_model(dit, STEPS, seed=1).double()
        flags = [p.requires_grad for p in transformer.parameters()]
        transformer.requires_grad_(False)
        state = attach_router(transformer, router)
        sched = sampler.fresh_scheduler()
        t0, t1 = sched.timesteps[:2]

        def loss_at(theta_row):
            state.clear()
            state.mode, state.gates = "soft", lambda k: None
            with torch.no_grad():
                eps0 = sampler.eps(x, t0, labels, sched)
                x1 = sched.step(eps0, t0, x).prev_sample
                state.mode = "teacher"
                eps_t = sampler.eps(x1, t1, labels, sched)
            r = torch.sigmoid(theta_row)
            state.mode, state.gates = "soft", lambda k: r
            eps_s = sampler.eps(x1, t1, labels, sched)
            return torch.mean((eps_t - eps_s) ** 2) + 1e-3 * r.sum()

        loss = loss_at(router.rows[0])
        loss.backward()
        grad = router.rows[0].grad
        assert grad is not None and grad.abs().sum() > 0
        assert all(p.grad is None for p in router.rows[1:])
        assert all(p.grad is None for p in transformer.parameters())
        h = 1e-6
        for u in range(4):
            e = torch.zeros(4, dtype=torch.float64)
            e[u] = h
            with torch.no_grad():
                fd = (loss_at(router.rows[0].detach() + e) - loss_at(router.rows[0].detach() - e)) / (2 * h)
            assert math.isclose(float(fd), float(grad[u]), rel_tol=1e-4, abs_tol=1e-10)
    finally:
        remove_cache_plan(transformer)
        for p, f in zip(transformer.parameters(), flags, strict=True):
            p.requires_grad_(f)
        transformer.float()


def test_lambda_forms_coincide_when_one_row_caches(dit):
    sampler = TrajectorySampler(dit, STEPS, 4.0)
    x, labels = draw(sampler, seed=3)
    router = Router.for_model(dit, STEPS)
    with torch.no_grad():
        for p in router.rows:
            p.fill_(100.0)  # sigmoid == 1 exactly: these rows compute
        router.rows[1].fill_(-1.0)  # only row 2 caches
    state = attach_router(dit.transformer, router)
    try:
        released = image_error_proxy(sampler, state, router, x, labels, "released")
        paper = image_error_proxy(sampler, state, router, x, labels, "paper")
        again = image_error_proxy(sampler, state, router, x, labels, "released")
    finally:
        remove_cache_plan(dit)
    assert released == again  # deterministic
    assert released[2] > 0 and all(v == 0 for i, v in enumerate(released) if i != 2)
    assert paper == pytest.approx(released, rel=1e-6, abs=0)
    assert not any(p.grad is not None for p in router.rows)


def test_tiny_training_run_loss_decreases_and_resume_is_exact(dit, tmp_path):
    cfg = TrainConfig(num_steps=3, trajectories=6, batch_size=2, beta=0.0, lr=0.5, lambda_every=3, seed=0)
    flags = [p.requires_grad for p in dit.transformer.parameters()]
    res = train_router(dit, cfg, progress=False)
    losses = [h["weighted_mse"] for h in res.history]
    assert len(losses) == 6 and losses[-1] < losses[0]  # β = 0: the router learns to compute, error falls
    assert res.lambda_refreshes == 2 and len(res.lambdas) == 3
    assert [p.requires_grad for p in dit.transformer.parameters()] == flags
    assert res.plan.mask[0].all() and res.plan.metadata["sdt"] == "True"

    ckpt = tmp_path / "r.ckpt.pt"
    short = TrainConfig(**{**cfg.__dict__, "trajectories": 4})
    train_router(dit, short, checkpoint=ckpt, checkpoint_every=2, progress=False)
    resumed = train_router(dit, cfg, checkpoint=ckpt, resume=True, progress=False)
    assert torch.equal(resumed.router.logits, res.router.logits)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in res.history]
    with pytest.raises(ValueError, match="other settings.*beta"):
        train_router(dit, TrainConfig(**{**cfg.__dict__, "beta": 1.0}), checkpoint=ckpt, resume=True,
                     progress=False)


def test_ablations_run_and_large_beta_reuses_more(dit):
    base = dict(num_steps=3, trajectories=3, batch_size=2, lr=0.5, lambda_every=3)
    no_sdt = train_router(dit, TrainConfig(**base, sdt=False, beta=1e-3), progress=False)
    no_iepo = train_router(dit, TrainConfig(**base, iepo=False, beta=1e-3), progress=False)
    assert no_sdt.plan.metadata["sdt"] == "False" and no_iepo.lambda_refreshes == 0
    weighted = train_router(dit, TrainConfig(**base, iepo=False, beta=1e-3, cost_weighted=True), progress=False)
    assert weighted.plan.metadata["cost_weighted"] == "True"
    hi = train_router(dit, TrainConfig(**base, iepo=False, beta=10.0), progress=False)
    assert hi.plan.usage_ratio > no_iepo.plan.usage_ratio


def test_bad_training_input(dit):
    with pytest.raises(ValueError, match="lambda_mode"):
        TrainConfig(lambda_mode="other")
    with pytest.raises(ValueError, match="num_steps"):
        TrainConfig(num_steps=1)
    with pytest.raises(ValueError, match="DiTPipeline"):  # InputError (exit code 2)
        TrajectorySampler(zoo.load("random-pixart"), 3, 4.0)


# ---------------------------------------------------------------------------------------------------------------------
# FluxPipeline (MMDiT double- and single-stream units, flow matching, packed latents, text conditioning)


@pytest.fixture(scope="module")
def flux():
    pipe = quiet_pipeline("random-flux")
    pipe.default_sample_size = 8  # 16 px -> 8x8 latents -> 16 packed tokens (the pipeline default is 256 px)
    return pipe


def test_flux_sampler_reproduces_the_stock_pipeline(flux):
    sampler = TrajectorySampler(flux, STEPS, 3.5)
    x, cond = draw(sampler, seed=1)
    state = attach_router(flux.transformer)
    try:
        plain = generate(sampler, state, x, cond, lambda k: None)
        soft = generate(sampler, state, x, cond, lambda k: torch.ones(state.num_units))  # r ≡ 1
    finally:
        remove_cache_plan(flux)
    with torch.no_grad():
        ref = flux(prompt_embeds=cond["embeds"], pooled_prompt_embeds=cond["pooled"], latents=x,
                   num_inference_steps=STEPS, guidance_scale=3.5, height=16, width=16, output_type="latent").images
    assert torch.equal(plain, ref) and torch.equal(soft, ref)  # same operations in the same order: bit-exact


def test_flux_router_training_gives_a_valid_plan_the_pipeline_obeys(flux):
    base = dict(num_steps=3, trajectories=2, batch_size=2, lr=0.5, lambda_every=2, guidance_scale=3.5)
    res = train_router(flux, TrainConfig(**base, beta=0.0), progress=False)
    hi = train_router(flux, TrainConfig(**base, beta=10.0, iepo=False), progress=False)
    assert res.lambda_refreshes == 1 and len(res.lambdas) == 3 and all(v >= 0 for v in res.lambdas)
    assert all(math.isfinite(h["loss"]) for h in res.history)
    n_units = len(unit_modules(flux.transformer))
    plan = hi.plan
    assert plan.model_class == "FluxTransformer2DModel" and plan.num_units == n_units and plan.mask[0].all()
    assert plan.scheduler_class == "FlowMatchEulerDiscreteScheduler"
    assert hi.plan.usage_ratio > res.plan.usage_ratio  # β is the reuse incentive
    apply_cache_plan(flux, plan)
    try:
        flux("a handwritten digit two", num_inference_steps=3, height=16, width=16, output_type="latent",
             generator=torch.Generator().manual_seed(0))
        runs = cache_plan_counters(flux).runs
    finally:
        remove_cache_plan(flux)
    assert runs == plan.mask.sum(0).tolist()  # every unit ran exactly at its plan's compute steps
