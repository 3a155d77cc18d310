"""FlowMatchSDEScheduler: eta 0 is FlowMatch-Euler, eta > 0 keeps the ODE's marginals (where diffusers' own
stochastic_sampling does not), the step contract, and its refusals."""

import math

import pytest
import torch
from diffaccel.core.errors import InputError
from diffaccel.core.schedulers import is_stochastic
from diffaccel.samplers.flow_sde import FlowMatchSDEScheduler, noise_std, stochastic_counterpart
from diffusers import FlowMatchEulerDiscreteScheduler

FLUX_GRID = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)

# two-mode toy: p(x0) = 0.5·N(−2, S²) + 0.5·N(2, S²), with the exact velocity E[ε − x0 | x_σ]
MU = torch.tensor([-2.0, 2.0], dtype=torch.float64)
S = 0.5


def toy_velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
    a = 1.0 - sigma
    xd = x.double()
    var = a * a * S * S + sigma * sigma  # Var[x_σ | component]
    pi = torch.softmax(-0.5 * (xd - a * MU) ** 2 / var, dim=-1)
    x0 = (pi * (MU + a * S * S / var * (xd - a * MU))).sum(-1, keepdim=True)  # posterior mean of x0
    return ((xd - x0) / sigma).to(x.dtype)


def sample_toy(scheduler, steps: int, n: int = 40_000, seed: int = 0, **step_kw) -> torch.Tensor:
    scheduler.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, generator=gen)
    for t in scheduler.timesteps:
        x = scheduler.step(toy_velocity(x, float(t) / 1000), t, x, generator=gen, **step_kw).prev_sample
    return x[:, 0].double()


def mode_std(x: torch.Tensor) -> float:
    return float(x[x > 0].std())


def test_eta_zero_is_flow_match_euler_bit_for_bit():
    """Same grid (dynamic shift), same float32 expression: equal at every step, whatever the configured eta."""
    euler = FlowMatchEulerDiscreteScheduler(**FLUX_GRID)
    sde = FlowMatchSDEScheduler(**FLUX_GRID, eta=1.0)
    for s in (euler, sde):
        s.set_timesteps(7, mu=0.8)
    assert torch.equal(euler.timesteps, sde.timesteps)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 16, generator=gen)
    a = b = x
    for t in euler.timesteps:
        v = torch.randn(x.shape, generator=gen)
        a = euler.step(v, t, a).prev_sample
        out = sde.step(v, t, b, eta=0.0)
        assert torch.equal(out.prev_sample, a)
        b = out.prev_sample


def test_first_and_last_steps_and_the_small_step_limit():
    """σ = 1: the posterior forgets x (s = η σ'); σ' = 0: no noise; small steps: s² -> 2σh/(1 − σ) (g² of the SDE)."""
    assert noise_std(1.0, 0.9, 1.0) == pytest.approx((0.9, 0.0))
    assert noise_std(1.0, 0.9, 0.5) == pytest.approx((0.45, math.sqrt(0.81 - 0.45**2)))
    assert noise_std(0.1, 0.0, 1.0) == (0.0, 0.0)
    sigma, h = 0.6, 1e-5
    s, c = noise_std(sigma, sigma - h, 1.0)
    assert s**2 == pytest.approx(2 * sigma * h / (1 - sigma), rel=1e-3)
    assert s**2 + c**2 == pytest.approx((sigma - h) ** 2, rel=1e-12)  # the marginal variance σ'² is kept
    assert noise_std(0.5, 0.4, 50.0)[0] == pytest.approx(0.4)  # large eta saturates at full re-noising


def test_sde_keeps_the_marginals_and_diffusers_stochastic_sampling_does_not():
    """Exact velocity of a two-mode mixture (per-mode std 0.5). 40 000 samples: the s.e. of a mode's std is
    0.5/sqrt(2·20 000) ≈ 0.0025. Ancestral steps (η = 1) converge to std 0.5 as steps grow (discretisation error
    O(1/N)); diffusers' stochastic_sampling re-noises x̂0 fully each step and its modes stay contracted (~0.35)."""
    runs = {n: sample_toy(FlowMatchSDEScheduler(eta=1.0), n) for n in (10, 50, 200)}
    errors = [abs(mode_std(x) - S) for x in runs.values()]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.015
    x = runs[200]
    assert abs(float((x > 0).double().mean()) - 0.5) < 0.01  # 4.5 s.e. of a proportion at n = 40 000
    diffusers_sde = sample_toy(FlowMatchEulerDiscreteScheduler(stochastic_sampling=True), 200)
    assert mode_std(diffusers_sde) < S - 0.1


def test_step_contract_noise_sources_and_x0():
    sde = FlowMatchSDEScheduler(**FLUX_GRID)
    sde.set_timesteps(4, mu=0.8)
    x, v = torch.randn(3, 8), torch.randn(3, 8)
    t = sde.timesteps[1]

    def step(**kw):
        sde._step_index = None  # as after set_timesteps: the step index is found from `t`
        return sde.step(v, t, x, **kw)

    a, b = step(generator=torch.Generator().manual_seed(5)), step(generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.prev_sample, b.prev_sample)
    assert not torch.equal(a.prev_sample, step(generator=torch.Generator().manual_seed(6)).prev_sample)
    sigma = sde.sigmas[1]
    assert torch.equal(a.pred_original_sample, x - sigma * v)
    sde.noise_generator = torch.Generator().manual_seed(5)  # stock pipelines pass no generator
    assert torch.equal(step().prev_sample, a.prev_sample)
    z = torch.randn(3, 8)
    s, c = noise_std(float(sigma), float(sde.sigmas[2]), 1.0)
    expected = (1 - sde.sigmas[2]) * (x - sigma * v) + c * (x + (1 - sigma) * v) + s * z
    torch.testing.assert_close(step(variance_noise=z).prev_sample, expected)
    assert step(return_dict=False)[0].shape == x.shape


def test_config_round_trip_capabilities_and_refusals(tmp_path):
    euler = FlowMatchEulerDiscreteScheduler(**FLUX_GRID)
    sde = stochastic_counterpart(euler)
    assert type(sde) is FlowMatchSDEScheduler and sde.config.eta == 1.0 and sde.config.shift == 3.0
    assert stochastic_counterpart(sde) is sde
    diffusers_sde = FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)
    assert stochastic_counterpart(diffusers_sde) is diffusers_sde
    FlowMatchSDEScheduler.from_config(euler.config, eta=0.3).save_config(tmp_path)
    assert FlowMatchSDEScheduler.from_pretrained(tmp_path).config.eta == 0.3
    assert is_stochastic(sde, eta=None) is True and is_stochastic(sde, eta=0.0) is False
    assert is_stochastic(FlowMatchSDEScheduler(eta=0.0), eta=None) is False
    for bad in (-0.1, float("nan"), float("inf"), "1"):
        with pytest.raises(InputError, match="eta must be"):
            FlowMatchSDEScheduler(eta=bad)
    with pytest.raises(InputError, match="stochastic_sampling"):
        FlowMatchSDEScheduler(stochastic_sampling=True)
    sde.set_timesteps(3, mu=0.8)
    with pytest.raises(InputError, match="integer index"):
        sde.step(torch.zeros(1), 0, torch.zeros(1))
