"""The samplers on flow-matching (rectified-flow) schedulers: PNDM family, Time-Shift, refusals of VP-only methods."""

import numpy as np
import pytest
import torch
from diffaccel.samplers import PseudoNumericalScheduler, TimeShiftScheduler
from diffaccel.samplers.flow import flow_transfer, select_shift_flow
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

FLUX_LIKE = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                 max_image_seq_len=4096)
MU = 0.46  # FluxPipeline's mu for a 16-token latent


def velocity(x: torch.Tensor, t) -> torch.Tensor:
    """A smooth, nonlinear stand-in for a flow model (depends on the state and on the model time)."""
    return torch.sin(3 * x) + 0.3 * x * float(t) / 1000


def run(scheduler, n: int, x: torch.Tensor, **kw) -> torch.Tensor:
    scheduler.set_timesteps(n, **kw)
    for t in scheduler.timesteps:
        x = scheduler.step(velocity(x, t), t, x).prev_sample
    return x


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("n", [1, 4, 28])
@pytest.mark.parametrize("config, kw", [(FLUX_LIKE, dict(mu=MU)), (dict(shift=3.0), {})])
def test_ddim_on_a_flow_config_is_flow_match_euler_bit_for_bit(x, n, config, kw):
    """Same sigmas (shift, dynamic shift, FluxPipeline's custom sigmas) and the same float32 update: identical."""
    ref = FlowMatchEulerDiscreteScheduler(**config)
    ours = PseudoNumericalScheduler.from_config(ref.config, method="ddim")
    assert ours.is_flow and ours.config.prediction_type == "flow_prediction"
    kw = dict(kw, sigmas=np.linspace(1.0, 1 / n, n)) if "mu" in kw else kw
    out_ref, out = run(ref, n, x, **kw), run(ours, n, x, **kw)
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert torch.equal(out, out_ref)


def reference_classical(x: torch.Tensor, sigmas: list[float], method: str) -> torch.Tensor:
    """Independent textbook integrators of dx/dσ = v(x, 1000 σ): Heun, RK4, and RK4 warm-up + 4-step AB."""
    v = lambda y, s: velocity(y, np.float32(s) * 1000)  # noqa: E731 - model time as the scheduler feeds it
    hist = []
    for k in range(len(sigmas) - 1):
        s, s2 = sigmas[k], sigmas[k + 1]
        h = s2 - s
        k1 = v(x, s)
        if method == "pie":
            x = x + h * (k1 + v(x + h * k1, s2)) / 2
        elif method == "prk" or (method == "f-pndm" and k < 3):
            m = (s + s2) / 2
            k2 = v(x + (m - s) * k1, m)
            k3 = v(x + (m - s) * k2, m)
            k4 = v(x + h * k3, s2)
            x = x + h * (k1 + 2 * k2 + 2 * k3 + k4) / 6
        else:
            x = x + h * (55 * k1 - 59 * hist[-1] + 37 * hist[-2] - 9 * hist[-3]) / 24
        hist.append(k1)
    return x


@pytest.mark.parametrize("method", ["pie", "prk", "f-pndm"])
def test_on_a_flow_model_the_family_is_the_classical_method_in_sigma(x, method):
    ours = PseudoNumericalScheduler.from_config(FlowMatchEulerDiscreteScheduler(**FLUX_LIKE).config, method=method)
    out = run(ours, 8, x.double(), mu=MU)
    sig = ours.sigmas.double().tolist()
    ref = reference_classical(x.double(), sig, method)
    # float64 throughout; the only differences are the rounding of the midpoint times fed to the model (float32)
    assert torch.allclose(out, ref, atol=1e-6, rtol=0)


def test_fon_is_f_pndm_on_a_flow_model(x):
    cfg = FlowMatchEulerDiscreteScheduler(**FLUX_LIKE).config
    a = run(PseudoNumericalScheduler.from_config(cfg, method="fon"), 6, x, mu=MU)
    b = run(PseudoNumericalScheduler.from_config(cfg, method="f-pndm"), 6, x, mu=MU)
    assert torch.equal(a, b)


def test_flow_transfer_is_exact_on_the_straight_path():
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(4, 8, generator=g, dtype=torch.float64), torch.randn(4, 8, generator=g, dtype=torch.float64)
    out = flow_transfer(0.3 * x0 + 0.7 * eps, eps - x0, 0.7, torch.tensor([0.0, 0.2, 0.5, 1.0], dtype=torch.float64))
    want = torch.stack([(1 - s) * x0[i] + s * eps[i] for i, s in enumerate([0.0, 0.2, 0.5, 1.0])])
    assert torch.allclose(out, want, atol=1e-14, rtol=0)  # float64, a handful of operations


def test_from_config_of_unipc_in_flow_mode_takes_its_flow_shift():
    cfg = UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction").config
    ours = PseudoNumericalScheduler.from_config(cfg, method="s-pndm")
    assert ours.is_flow and ours.config.shift == 3.0


def test_vp_arguments_and_flow_arguments_do_not_mix():
    with pytest.raises(ValueError, match="flow-matching arguments"):
        PseudoNumericalScheduler(method="ddim").set_timesteps(10, mu=0.5)
    with pytest.raises(ValueError, match="mu"):  # FlowMatchEuler's own message: dynamic shifting needs mu
        PseudoNumericalScheduler.from_config(FlowMatchEulerDiscreteScheduler(**FLUX_LIKE).config).set_timesteps(10)


# ------------------------------------------------------------------------------------------------ Time-Shift
@pytest.mark.parametrize("base", ["euler", "pndm"])
def test_time_shift_window_zero_equals_the_flow_base(x, base):
    cfg = FlowMatchEulerDiscreteScheduler(**FLUX_LIKE).config
    make = (lambda: FlowMatchEulerDiscreteScheduler.from_config(cfg)) if base == "euler" else (
        lambda: PseudoNumericalScheduler.from_config(cfg, method="s-pndm"))
    ref = run(make(), 10, x, mu=MU)
    assert torch.equal(run(TimeShiftScheduler.wrap(make(), window=0, cutoff=0), 10, x, mu=MU), ref)
    shifted = TimeShiftScheduler.wrap(make(), window=40, cutoff=0)
    out = run(shifted, 10, x, mu=MU)
    assert not torch.equal(out, ref)  # window 40 does move the targets


def test_flow_shift_rule_picks_the_sigma_whose_noise_variance_matches():
    g = torch.Generator().manual_seed(2)
    sample = 0.6 * torch.randn(2, 64, 64, generator=g)  # variance 0.36 -> sigma 0.6
    chosen = select_shift_flow(sample, center=0.58, window=40, num_train_timesteps=1000)
    assert torch.allclose(chosen, torch.full((2,), 0.6, dtype=torch.float64), atol=0.006)  # sampling error of var
    edge = select_shift_flow(sample, center=0.3, window=40, num_train_timesteps=1000)
    assert torch.equal(edge, torch.full((2,), 0.32, dtype=torch.float64))  # clipped to the window's upper edge


def test_time_shift_on_flow_pndm_moves_targets_per_sample(x):
    cfg = FlowMatchEulerDiscreteScheduler(**FLUX_LIKE).config
    ts = TimeShiftScheduler.wrap(PseudoNumericalScheduler.from_config(cfg, method="ddim"), window=40, cutoff=0)
    ts.set_timesteps(6, mu=MU)
    seen = []
    y = x
    for t in ts.timesteps:
        y = ts.step(velocity(y, t), t, y).prev_sample
        if ts.last_shift is not None:
            seen.append(ts.last_shift)
    assert len(seen) >= 3 and all(s.dtype == torch.float64 and ((s > 0) & (s <= 1)).all() for s in seen)


# ------------------------------------------------------------------------------------------------ refusals
def test_vp_only_methods_refuse_a_flow_scheduler_with_the_reason():
    from diffaccel.samplers.steering.fk import predict_x0
    from diffaccel.samplers.time_shift import sample_time_shift_paper

    flow = PseudoNumericalScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config, method="ddim")
    with pytest.raises(ValueError, match="flow-matching mode"):
        sample_time_shift_paper(lambda x, t: x, torch.zeros(1, 4), flow, 4, window=10, cutoff=0)
    euler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    with pytest.raises(ValueError, match="variance-preserving.*FlowMatchEulerDiscreteScheduler is a flow-matching"):
        predict_x0(euler, torch.zeros(1, 4), 500, torch.zeros(1, 4))


def test_time_shift_refuses_a_stochastic_flow_sampler():
    with pytest.raises(ValueError, match="deterministic"):
        TimeShiftScheduler.wrap(FlowMatchEulerDiscreteScheduler(stochastic_sampling=True), window=10)


def test_in_a_stock_flux_pipeline_ddim_and_time_shift_window_zero_equal_flow_match_euler():
    """FluxPipeline passes custom sigmas and mu to set_timesteps; both wrappers must accept them and agree exactly."""
    from diffaccel import zoo
    from diffaccel.core import make_generators

    pipe = zoo.load("random-flux")
    pipe.set_progress_bar_config(disable=True)
    kw = dict(height=32, width=32, max_sequence_length=16, num_inference_steps=4, output_type="latent")

    def sample():
        return pipe(["a handwritten digit seven"] * 2, generator=make_generators(0, 2), **kw).images

    ref = sample()
    euler = pipe.scheduler
    pipe.scheduler = PseudoNumericalScheduler.from_config(euler.config, method="ddim")
    assert torch.equal(sample(), ref)
    pipe.scheduler = TimeShiftScheduler.wrap(FlowMatchEulerDiscreteScheduler.from_config(euler.config), window=0)
    assert torch.equal(sample(), ref)
    pipe.scheduler = PseudoNumericalScheduler.from_config(euler.config, method="s-pndm")
    out = sample()
    assert out.shape == ref.shape and torch.isfinite(out).all() and not torch.equal(out, ref)
