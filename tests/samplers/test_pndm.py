"""PseudoNumericalScheduler: exactness of φ, equivalence with diffusers, NFE accounting, bad input, contract."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from diffaccel.samplers import METHODS, PseudoNumericalScheduler, nfe_for, transitions_for_nfe
from diffaccel.samplers.transfer import make_grid, transfer
from diffusers import DDIMScheduler, DDPMScheduler, PNDMScheduler
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import roundoff_atol

PHI_METHODS = ["ddim", "pie", "prk", "s-pndm", "f-pndm", "plms", "plms-ldm"]  # every method built on φ


def toy_model(x: torch.Tensor, t) -> torch.Tensor:
    """A smooth, time-dependent, nonlinear stand-in for eps_theta."""
    t = float(t)
    return x * (t / (t + 1.0)) + 0.1 * torch.sin(x * t / 300.0)


def run(scheduler, n: int, x: torch.Tensor, model=toy_model, shift_model_time: int = 0) -> torch.Tensor:
    scheduler.set_timesteps(n)
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, int(t) + shift_model_time), t, x).prev_sample
    return x


def as_float64(s):
    """diffusers computes coefficients from float32 arrays; cast them so both sides compute in float64."""
    s.alphas_cumprod = s.alphas_cumprod.double()
    s.final_alpha_cumprod = s.final_alpha_cumprod.double()
    return s


@pytest.fixture
def x64() -> torch.Tensor:
    return torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_transfer_is_exact_on_a_noise_free_pair():
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(3, 1, 8, 8, generator=g), torch.randn(3, 1, 8, 8, generator=g)
    acp = PseudoNumericalScheduler().alphas_cumprod.double()
    for a, b in [(999, 899), (500, 499), (10, 0), (0, 0)]:
        xa = (acp[a].sqrt() * x0 + (1 - acp[a]).sqrt() * eps).float()
        xb = acp[b].sqrt() * x0 + (1 - acp[b]).sqrt() * eps
        assert torch.allclose(transfer(xa, eps, acp[a], acp[b]), xb.float(), atol=1e-6, rtol=0)
    # per-sample target levels
    a_next = acp[torch.tensor([100, 200, 300])]
    x0, eps = x0.double(), eps.double()
    xa = acp[900].sqrt() * x0 + (1 - acp[900]).sqrt() * eps
    want = a_next.sqrt().view(-1, 1, 1, 1) * x0 + (1 - a_next).sqrt().view(-1, 1, 1, 1) * eps
    assert torch.allclose(transfer(xa, eps, acp[900], a_next), want, atol=1e-12)


@pytest.mark.parametrize("method", PHI_METHODS)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_every_phi_method_is_exact_on_a_noise_free_trajectory(method, prediction_type):
    """x built from known (x0, eps), the model returns the exact eps (or v): every state lands on the trajectory."""
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    s = PseudoNumericalScheduler(method=method, prediction_type=prediction_type, steps_offset=1)
    acp = s.alphas_cumprod.double()

    def on_traj(a):
        return a.sqrt() * x0 + (1 - a).sqrt() * eps

    def exact(x, t):
        a = acp[t]
        return eps if prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0

    s.set_timesteps(12)
    x = on_traj(acp[int(s.timesteps[0])])
    ends = 0
    for i, t in enumerate(s.timesteps):
        k, _, _, tgt = s.next_evaluation()
        x = s.step(exact(x, int(t)), t, x).prev_sample
        if i + 1 < len(s.timesteps) and s.next_evaluation()[0] != k:  # a transition ended: x is on the trajectory
            assert torch.allclose(x, on_traj(acp[tgt]), atol=1e-10, rtol=0)
            ends += 1
    assert ends == len(s.grid) - 1
    final = s.final_alpha_cumprod.double()
    assert torch.allclose(x, on_traj(final), atol=1e-10, rtol=0)


def test_fon_converges_on_a_noise_free_trajectory():
    """FON has a linear transfer, so it is not exact; its error must shrink as the grid refines."""
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64), torch.randn(2, 1, 4, 4, generator=g,
                                                                                      dtype=torch.float64)
    errs = []
    for n in (10, 50):
        s = PseudoNumericalScheduler(method="fon")
        acp = s.alphas_cumprod.double()
        s.set_timesteps(n)
        x = acp[int(s.timesteps[0])].sqrt() * x0 + (1 - acp[int(s.timesteps[0])]).sqrt() * eps
        for t in s.timesteps:
            x = s.step(eps, t, x).prev_sample
        a = s.final_alpha_cumprod.double()
        errs.append(float((x - (a.sqrt() * x0 + (1 - a).sqrt() * eps)).abs().max()))
    assert errs[1] < errs[0] / 2 and errs[1] < 0.1


@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
@pytest.mark.parametrize("n", [5, 10, 50])
def test_ddim_equals_diffusers_ddim(x64, offset, set_alpha_to_one, n):
    kw = dict(steps_offset=offset, set_alpha_to_one=set_alpha_to_one)
    ref = as_float64(DDIMScheduler(clip_sample=False, **kw))
    ours = PseudoNumericalScheduler(method="ddim", **kw)
    assert torch.allclose(run(ours, n, x64), run(ref, n, x64), atol=1e-10, rtol=0)
    assert torch.equal(ours.timesteps, ref.timesteps)


def test_v_prediction_ddim_equals_diffusers_and_multistep_converts_per_evaluation(x64):
    """One evaluation per transition: identical to diffusers. Multistep methods convert every v to eps at its own
    (x, t) before combining; diffusers PNDM combines raw v's and converts once with the source level, so those
    differ by design (documented in the module docstring)."""
    ref = as_float64(DDIMScheduler(clip_sample=False, prediction_type="v_prediction", set_alpha_to_one=False))
    ours = PseudoNumericalScheduler(method="ddim", prediction_type="v_prediction")
    assert torch.allclose(run(ours, 10, x64), run(ref, 10, x64), atol=1e-10, rtol=0)
    ref = as_float64(PNDMScheduler(skip_prk_steps=True, prediction_type="v_prediction"))
    ours = PseudoNumericalScheduler(method="plms-ldm", prediction_type="v_prediction")
    assert (run(ours, 10, x64) - run(ref, 10, x64)).abs().max() > 1e-8


@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
@pytest.mark.parametrize("n", [5, 10, 25, 50])
def test_plms_ldm_and_f_pndm_equal_diffusers_pndm(x64, offset, set_alpha_to_one, n):
    kw = dict(steps_offset=offset, set_alpha_to_one=set_alpha_to_one)
    for method, skip in [("plms-ldm", True), ("f-pndm", False)]:
        ref = as_float64(PNDMScheduler(skip_prk_steps=skip, **kw))
        ours = PseudoNumericalScheduler(method=method, **kw)
        out_ref, out = run(ref, n, x64), run(ours, n, x64)
        assert torch.equal(ours.timesteps, ref.timesteps), method
        assert torch.allclose(out, out_ref, atol=1e-10, rtol=0), method


def test_float32_agreement_with_stock_diffusers():
    """Stock (float32) diffusers schedulers on a float32 sample agree with ours (float64 coefficients).

    Tolerance: diffusers builds `alphas_cumprod` as a float32 cumulative product of T = 1000 factors (round-off
    ~ sqrt(T)·eps relative), and each of the 10 steps applies coefficients carrying that error to |x|. A wrong
    coefficient or a misplaced step moves the result by ~1e-2.
    """
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5)).clamp(-1, 1)
    for method, ref in [("plms-ldm", PNDMScheduler(skip_prk_steps=True, steps_offset=1)),
                        ("f-pndm", PNDMScheduler(steps_offset=1)),
                        ("ddim", DDIMScheduler(clip_sample=False, steps_offset=1, set_alpha_to_one=False))]:
        ours = PseudoNumericalScheduler(method=method, steps_offset=1)
        want = run(ref, 10, x)
        atol = roundoff_atol(torch.float32, [ref.config.num_train_timesteps] * 10, magnitude=float(want.abs().max()))
        assert (run(ours, 10, x) - want).abs().max() <= atol, method


def test_f_pndm_timesteps_match_the_documented_prk_layout():
    s = PseudoNumericalScheduler(method="f-pndm", steps_offset=1)
    s.set_timesteps(10)
    want = [901, 851, 851, 801, 801, 751, 751, 701, 701, 651, 651, 601, 601, 501, 401, 301, 201, 101, 1]
    assert s.timesteps.tolist() == want


def _diffusers_dummy_sample() -> torch.Tensor:
    """`dummy_sample_deter` of diffusers' scheduler tests."""
    b, c, h, w = 4, 3, 8, 8
    n = b * c * h * w
    return (torch.arange(n).flip(-1).reshape(c, h, w, b) / n).permute(3, 0, 1, 2)


@pytest.mark.parametrize(
    "kw,total,mean",
    [({}, 198.1318, 0.2580),
     ({"set_alpha_to_one": True, "beta_start": 0.01}, 230.0399, 0.2995),
     ({"set_alpha_to_one": False, "beta_start": 0.01}, 186.9482, 0.2434)],
)
def test_f_pndm_reproduces_diffusers_regression_anchor(kw, total, mean):
    s = PseudoNumericalScheduler(method="f-pndm", **kw)
    out = run(s, 10, _diffusers_dummy_sample(), model=lambda x, t: x * t / (t + 1))
    assert abs(out.abs().sum().item() - total) < 1e-2
    assert abs(out.abs().mean().item() - mean) < 1e-3


def test_s_pndm_is_plms_ldm_for_two_transitions_then_differs(x64):
    a, b = PseudoNumericalScheduler(method="s-pndm"), PseudoNumericalScheduler(method="plms-ldm")
    a.set_timesteps(10)
    b.set_timesteps(10)
    xa = xb = x64
    diffs = []
    for t in a.timesteps:
        xa = a.step(toy_model(xa, int(t)), t, xa).prev_sample
        xb = b.step(toy_model(xb, int(t)), t, xb).prev_sample
        diffs.append(float((xa - xb).abs().max()))
    # evaluations 0,1 = transition 1 (PIE), 2 = transition 2 (AB2 in both), 3 = transition 3 (AB2 vs AB3)
    assert max(diffs[:3]) == 0.0
    assert min(diffs[3:]) > 1e-6


def test_original_pndm_mode_matches_diffusers_with_shifted_model_time(x64):
    """alpha_index_shift=1 on the original grid == diffusers (steps_offset=1) with the model fed t - 1."""
    for method, skip in [("f-pndm", False), ("ddim", None)]:
        ours = PseudoNumericalScheduler(method=method, alpha_index_shift=1, timestep_spacing="pndm_uniform")
        if skip is None:
            ref = as_float64(DDIMScheduler(clip_sample=False, steps_offset=1, set_alpha_to_one=False))
        else:
            ref = as_float64(PNDMScheduler(skip_prk_steps=skip, steps_offset=1))
        for n in (10, 20, 50):
            out = run(ours, n, x64)
            out_ref = run(ref, n, x64, shift_model_time=-1)
            assert torch.allclose(out, out_ref, atol=1e-10, rtol=0), (method, n)


def test_trailing_grid_has_exactly_n_points():
    for n in (7, 10, 61, 999):
        g = make_grid("trailing", n, 1000)
        assert len(g) == n and g[0] == 999 and bool((np.diff(g) < 0).all())
    assert make_grid("trailing", 10, 1000).tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]


def test_original_grid_has_the_extra_transition_when_t_not_divisible():
    s = PseudoNumericalScheduler(method="ddim", timestep_spacing="pndm_uniform", alpha_index_shift=1)
    s.set_timesteps(15)
    assert len(s.grid) == 16 and s.grid[0] == 990
    assert len(s.timesteps) == 16


@pytest.mark.parametrize("method,extra", [("ddim", 0), ("s-pndm", 1), ("plms-ldm", 1), ("f-pndm", 9),
                                          ("plms", 9), ("fon", 9)])
@pytest.mark.parametrize("n", [4, 10, 25])
def test_nfe_matches_the_spec_table(method, extra, n):
    s = PseudoNumericalScheduler(method=method)
    calls = []
    run(s, n, torch.zeros(1, 1, 2, 2), model=lambda x, t: calls.append(t) or torch.zeros_like(x))
    assert len(calls) == len(s.timesteps) == n + extra == nfe_for(method, n)


def test_pie_and_prk_cost_two_and_four_calls_per_transition():
    assert nfe_for("pie", 7) == 14 and nfe_for("prk", 7) == 28
    assert transitions_for_nfe("f-pndm", 20) == 11 and transitions_for_nfe("f-pndm", 10) is None
    assert transitions_for_nfe("s-pndm", 10) == 9 and transitions_for_nfe("ddim", 5) == 5


@pytest.mark.parametrize(
    "kwargs,n,match",
    [({"method": "f-pndm"}, 3, "at least 4"),
     ({"method": "fon"}, 2, "at least 4"),
     ({"method": "ddim"}, 1001, "between 1 and num_train_timesteps=1000"),
     ({"method": "ddim"}, 0, "between 1"),
     ({"method": "ddim", "steps_offset": 1}, 1000, "must be <= 999"),
     ({"method": "ddim", "timestep_spacing": "quad"}, 900, "not strictly decreasing")],
)
def test_bad_step_counts_raise_value_error_naming_the_limit(kwargs, n, match):
    with pytest.raises(ValueError, match=match):
        PseudoNumericalScheduler(**kwargs).set_timesteps(n)


def test_bad_config_raises_value_error():
    with pytest.raises(ValueError, match="unknown method 'heun'"):
        PseudoNumericalScheduler(method="heun")
    with pytest.raises(ValueError, match="'epsilon', 'v_prediction' or 'flow_prediction'"):
        PseudoNumericalScheduler(prediction_type="sample")
    with pytest.raises(ValueError, match="'epsilon', 'v_prediction' or 'flow_prediction'"):
        PseudoNumericalScheduler.from_config(DDPMScheduler(prediction_type="sample").config)
    with pytest.raises(ValueError, match="timestep_spacing"):
        PseudoNumericalScheduler(timestep_spacing="karras")
    s = PseudoNumericalScheduler(method="ddim")
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(torch.zeros(1), 0, torch.zeros(1))
    s.set_timesteps(2)
    with pytest.raises(ValueError, match="got timestep 3 but entry 0 of `timesteps` is 500"):
        s.step(torch.zeros(1), 3, torch.zeros(1))
    for t in s.timesteps:
        s.step(torch.zeros(1), t, torch.zeros(1))
    with pytest.raises(ValueError, match="2 model evaluations"):
        s.step(torch.zeros(1), 0, torch.zeros(1))


def test_method_names_accept_underscores_and_aliases():
    assert PseudoNumericalScheduler(method="f_pndm").method == "f-pndm"
    assert PseudoNumericalScheduler(method="PLMS").method == "f-pndm"
    assert set(METHODS) >= {"ddim", "pie", "prk", "plms", "s-pndm", "f-pndm", "plms-ldm", "fon"}


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 1000),
    method=st.sampled_from(["ddim", "pie", "prk", "s-pndm", "f-pndm", "plms-ldm", "fon"]),
    spacing=st.sampled_from(["leading", "trailing", "linspace", "pndm_uniform", "quad"]),
    schedule=st.sampled_from(["linear", "scaled_linear", "squaredcos_cap_v2"]),
    shift=st.sampled_from([0, 1]),
)
def test_property_any_step_count_and_schedule(n, method, spacing, schedule, shift):
    kw = dict(method=method, timestep_spacing=spacing, beta_schedule=schedule, alpha_index_shift=shift)
    if schedule == "scaled_linear":
        kw.update(beta_start=0.00085, beta_end=0.012)
    s = PseudoNumericalScheduler(**kw)
    try:
        grid = make_grid(spacing, n, 1000)
    except ValueError:  # the quadratic grid repeats times for large n
        grid = None
    if grid is None or len(grid) < {"f-pndm": 4, "fon": 4}.get(method, 1) or grid[0] + shift > 999:
        with pytest.raises(ValueError):
            s.set_timesteps(n)
        return
    s.set_timesteps(n)
    ts = s.timesteps
    assert ts.dtype == torch.int64
    assert len(ts) == nfe_for(method, len(s.grid))
    if spacing != "pndm_uniform":
        assert len(s.grid) == n
    assert bool((ts[1:] <= ts[:-1]).all()), "timesteps must never increase"
    assert bool((np.diff(s.grid) < 0).all()), "transition grid must be strictly decreasing"
    x = torch.randn(1, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    for t in ts:
        x = s.step(0.9 * x, t, x).prev_sample
    assert torch.isfinite(x).all()


def test_determinism_reuse_and_deepcopy(x64):
    s = PseudoNumericalScheduler(method="f-pndm")
    a, b = run(s, 10, x64), run(s, 10, x64)
    assert torch.equal(a, b)  # state is reset by set_timesteps
    s.set_timesteps(10)
    x = x64
    for i, t in enumerate(s.timesteps):
        if i == 6:
            clone, x_clone = copy.deepcopy(s), x.clone()
        x = s.step(toy_model(x, int(t)), t, x).prev_sample
    for t in clone.timesteps[6:]:
        x_clone = clone.step(toy_model(x_clone, int(t)), t, x_clone).prev_sample
    assert torch.equal(x, x_clone)


def test_config_round_trip_and_swaps(tmp_path):
    s = PseudoNumericalScheduler(method="s-pndm", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                 steps_offset=1, prediction_type="v_prediction")
    s.save_pretrained(tmp_path)
    r = PseudoNumericalScheduler.from_pretrained(tmp_path)
    public = [k for k in s.config if not k.startswith("_")]
    assert {k: r.config[k] for k in public} == {k: s.config[k] for k in public} and r.method == "s-pndm"
    sd15 = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
            "steps_offset": 1, "trained_betas": None, "clip_sample": False}
    for cfg in [DDIMScheduler(beta_schedule="scaled_linear", steps_offset=1).config,
                DDPMScheduler(prediction_type="v_prediction").config, PNDMScheduler().config, sd15]:
        o = PseudoNumericalScheduler.from_config(cfg, method="f-pndm")
        for key in ("beta_schedule", "steps_offset", "prediction_type", "beta_start"):
            if key in cfg:
                assert o.config[key] == cfg[key], key
        back = DDIMScheduler.from_config(o.config)  # and back
        assert back.config.beta_schedule == o.config.beta_schedule


def test_device_dtype_and_contract():
    s = PseudoNumericalScheduler(method="f-pndm")
    s.set_timesteps(5, device="cpu")
    assert s.timesteps.dtype == torch.int64 and s.timesteps.device.type == "cpu"
    x16 = torch.randn(1, 1, 4, 4).half()
    out = s.step(x16, int(s.timesteps[0]), x16, return_dict=False)[0]  # int timestep, tuple return
    assert out.dtype == torch.float16
    out = s.step(x16, s.timesteps[1], out, eta=0.0, generator=None, use_clipped_model_output=False).prev_sample
    assert out.dtype == torch.float16
    x = torch.randn(3, 1, 4, 4)
    assert torch.equal(s.scale_model_input(x, 5), x)
    noise, t = torch.randn(3, 1, 4, 4), torch.tensor([0, 500, 999])
    assert torch.allclose(s.add_noise(x, noise, t), DDPMScheduler().add_noise(x, noise, t))
    assert len(s) == 1000


def test_set_begin_index_is_explicit_for_warm_up_methods():
    s = PseudoNumericalScheduler(method="f-pndm")
    s.set_timesteps(10)
    s.set_begin_index(0)
    with pytest.raises(ValueError, match="cannot start at timesteps index 4"):
        s.set_begin_index(4)
    d = PseudoNumericalScheduler(method="ddim")
    d.set_timesteps(10)
    d.set_begin_index(4)
    x = torch.randn(1, 1, 2, 2, dtype=torch.float64)
    for t in d.timesteps[4:]:
        x = d.step(toy_model(x, int(t)), t, x).prev_sample
    assert torch.isfinite(x).all()
