"""TimeShiftScheduler: exact no-op at window 0, agreement with an independent reference of the TS-DPM rule,
selection rule details, wrapping of diffusers schedulers, save/load."""

from __future__ import annotations

import inspect

import pytest
import torch
from diffaccel.samplers import (
    PseudoNumericalScheduler,
    TimeShiftScheduler,
    nfe_for,
    sample_time_shift_paper,
    select_shift,
)
from diffaccel.samplers.transfer import transfer
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import roundoff_atol

T = 1000
ACP = PseudoNumericalScheduler().alphas_cumprod.double()


def gaussian_eps(scale: float = 1.0, sigma_data: float = 0.5):
    """Exact eps-prediction for data x0 ~ N(0, sigma_data^2 I) (times `scale`, to mimic exposure bias)."""

    def model(x, t):
        a = ACP[int(t)]
        return scale * (1 - a).sqrt() * x / (a * sigma_data**2 + 1 - a)

    return model


EXACT = gaussian_eps()


def run(scheduler, x, n=None, model=EXACT, timesteps=None, generator=None):
    scheduler.set_timesteps(n) if timesteps is None else scheduler.set_timesteps(timesteps=timesteps)
    for t in scheduler.timesteps:
        accepts = "generator" in inspect.signature(scheduler.step).parameters
        kw = {"generator": generator} if generator is not None and accepts else {}
        x = scheduler.step(model(x, int(t)), t, x, **kw).prev_sample
    return x


@pytest.fixture
def x64() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([0.95, 1.0, 1.03, 1.08], dtype=torch.float64).view(-1, 1, 1, 1)
    return torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64) * scale


def ts_dpm_grid(steps: int) -> list[int]:
    """The committed TS-DPM grid: [k + 1 for k in range(0, T, T // S)] without its largest element."""
    return [k + 1 for k in range(0, T, T // steps)][:-1][::-1]


def reference_ts(x, grid, model, window, cutoff, method):
    """Independent re-statement of TS-DPM's target shift for DDIM, S-PNDM and F-PNDM, per sample.

    F-PNDM follows our documented drop-in deviation: PRK stage *model times* stay nominal, stage *targets* move
    (midpoint level floor((i + s) / 2), end level s)."""
    h = window // 2
    hist = []

    def lvl(t):
        return ACP[t]

    for k, i in enumerate(grid):
        j = grid[k + 1] if k + 1 < len(grid) else 0
        s = torch.full((x.shape[0],), j)
        if k >= 1 and j > cutoff:
            taus = torch.arange(max(0, j - h), min(T - 1, j + h) + 1)
            var = x.float().flatten(1).var(dim=1).double()
            s = taus[((var[:, None] - (1 - ACP[taus])[None]) ** 2).argmin(1)]
        a_i, a_s, a_ms = lvl(i), lvl(s), lvl(s + (i - s) // 2)
        e = model(x, i)
        if method == "f-pndm" and k < 3:  # pseudo Runge-Kutta from the start point
            mid = j + (i - j) // 2
            e2 = model(transfer(x, e, a_i, a_ms), mid)
            e3 = model(transfer(x, e2, a_i, a_ms), mid)
            e4 = model(transfer(x, e3, a_i, a_s), j)
            e_prime = (e + 2 * e2 + 2 * e3 + e4) / 6
        elif method == "f-pndm":
            e_prime = (55 * e - 59 * hist[-1] + 37 * hist[-2] - 9 * hist[-3]) / 24
        elif method == "s-pndm" and k == 0:  # pseudo improved Euler (never shifted: first transition)
            e_prime = (e + model(transfer(x, e, a_i, a_s), j)) / 2
        elif method == "s-pndm":
            e_prime = (3 * e - hist[-1]) / 2
        else:
            e_prime = e
        hist.append(e)
        x = transfer(x, e_prime, a_i, a_s)
    return x


@pytest.mark.parametrize("method", ["ddim", "s-pndm", "f-pndm"])
@pytest.mark.parametrize("steps,window", [(10, 40), (20, 30), (50, 8), (10, 2)])
@pytest.mark.parametrize("scale", [1.0, 1.02])
def test_target_mode_matches_the_reference_rule(x64, method, steps, window, scale):
    grid = ts_dpm_grid(steps)
    model = gaussian_eps(scale)
    want = reference_ts(x64, grid, model, window, 300, method)
    ts = TimeShiftScheduler.wrap(PseudoNumericalScheduler(method=method), window=window, cutoff=300)
    got = run(ts, x64, timesteps=grid, model=model)
    assert torch.allclose(got, want, atol=1e-10, rtol=0)
    plain = run(PseudoNumericalScheduler(method=method), x64, timesteps=grid, model=model)
    assert (got - plain).abs().max() > 1e-4  # the shift really acted


@pytest.mark.parametrize(
    "base",
    [DDIMScheduler(clip_sample=False), DDPMScheduler(), DPMSolverMultistepScheduler(), UniPCMultistepScheduler(),
     DEISMultistepScheduler(), *(PseudoNumericalScheduler(method=m) for m in ["ddim", "s-pndm", "f-pndm", "prk"])],
    ids=lambda b: getattr(b.config, "method", type(b).__name__),
)
@pytest.mark.parametrize("ts_kw", [{"window": 0, "cutoff": 300}, {"window": 40, "cutoff": 999}])
def test_window_zero_or_high_cutoff_is_bitwise_the_base(x64, base, ts_kw):
    n = 12
    x = x64.float()
    wrapped = TimeShiftScheduler.wrap(base, **ts_kw)
    a = run(wrapped, x, n, generator=torch.Generator().manual_seed(1))
    b = run(base, x, n, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert torch.equal(wrapped.timesteps, base.timesteps)


def test_generic_ray_equals_native_shift_for_ddim(x64):
    """Two independent mechanisms (moving diffusers DDIM's output along its ray vs. our native target level)."""
    for window in (8, 40):
        generic = TimeShiftScheduler.wrap(DDIMScheduler(clip_sample=False, set_alpha_to_one=False), window=window,
                                          cutoff=300)
        native = TimeShiftScheduler.wrap(PseudoNumericalScheduler(method="ddim"), window=window, cutoff=300)
        a, b = run(generic, x64, 10), run(native, x64, 10)
        # diffusers' DDIM keeps a float32 `alphas_cumprod` (a cumulative product of T factors): each of the 10 steps
        # applies coefficients carrying ~sqrt(T)·eps32 relative error to |x|
        T = generic.base.config.num_train_timesteps
        atol = roundoff_atol(torch.float32, [T] * 10, magnitude=float(b.abs().max()))
        assert torch.allclose(a, b, atol=atol, rtol=0)
        assert (a - run(PseudoNumericalScheduler(method="ddim"), x64, 10)).abs().max() > 1e-4


def test_shift_acts_on_dpm_solver_and_keeps_nfe(x64):
    base = DPMSolverMultistepScheduler()
    ts = TimeShiftScheduler.wrap(base, window=30, cutoff=300)
    calls = []
    out = run(ts, x64, 5, model=lambda x, t: calls.append(t) or gaussian_eps(1.02)(x, t))
    assert len(calls) == 5 == len(ts.timesteps)
    assert torch.isfinite(out).all()
    assert (out - run(base, x64, 5, model=gaussian_eps(1.02))).abs().max() > 1e-4


def test_selection_rule_details():
    acp = ACP.float()
    target = 1 - acp
    # per sample: a sample whose variance equals 1 - A[t] picks t
    x = torch.stack([torch.randn(1, 64, 64) * 0 + 1.0, torch.randn(1, 64, 64)])  # var 0 and ~1
    x[0] = torch.tensor([-1.0, 1.0]).repeat(64 * 32).view(1, 64, 64) * float(target[480].sqrt())
    s = select_shift(x, 500, 40, acp)
    assert s[0].item() == 480 and s[1].item() == 520  # window [480, 520]; ~unit variance goes to the top edge
    # clipping at the ends of the schedule
    assert select_shift(torch.zeros(1, 1, 2, 2), 5, 40, acp).item() == 0
    assert select_shift(torch.randn(1, 1, 64, 64) * 10, 990, 40, acp).item() == 999
    # ties resolve to the smallest time: a flat schedule makes every candidate equal
    flat = torch.full((1000,), 0.5)
    assert select_shift(torch.randn(2, 1, 4, 4), 500, 10, flat).tolist() == [495, 495]
    # full half-width rule (DEIS wrapper) doubles the window
    assert select_shift(torch.zeros(1, 1, 2, 2), 500, 10, acp, "full").item() == 490
    # fp16 input: variance computed in fp32, same choice as the fp32 input
    y = torch.randn(3, 1, 16, 16) * 0.9
    assert torch.equal(select_shift(y.half(), 400, 30, acp), select_shift(y.half().float(), 400, 30, acp))


def test_first_transition_never_shifted_and_cutoff_strict_on_nominal_target(x64):
    def shifts_for(cutoff):
        ts = TimeShiftScheduler.wrap(PseudoNumericalScheduler(method="ddim"), window=40, cutoff=cutoff)
        ts.set_timesteps(10)  # transitions 900 -> 800 -> 700 -> ... -> 0 -> final
        out, x = [], x64
        for t in ts.timesteps:
            x = ts.step(gaussian_eps()(x, t), t, x).prev_sample
            out.append(ts.last_shift is not None)
        return out

    assert shifts_for(700) == [False] * 10  # 800 -> 700: target 700 is not > 700
    assert shifts_for(699) == [False, True] + [False] * 8
    assert shifts_for(500) == [False, True, True] + [False] * 7  # first transition (target 800) never


def test_save_load_round_trip(tmp_path, x64):
    for base in (PseudoNumericalScheduler(method="f-pndm", steps_offset=1), DPMSolverMultistepScheduler()):
        ts = TimeShiftScheduler.wrap(base, window=30, cutoff=300)
        ts.save_pretrained(tmp_path / type(base).__name__)
        back = TimeShiftScheduler.from_pretrained(tmp_path / type(base).__name__)
        assert type(back.base) is type(base)
        assert back.config.window == 30 and back.config.cutoff == 300
        assert torch.equal(run(back, x64, 10), run(ts, x64, 10))


def test_from_config_swaps_and_bad_input():
    ts = TimeShiftScheduler.from_config(DDIMScheduler(steps_offset=1).config, window=8, cutoff=200)
    assert type(ts.base) is DDIMScheduler and ts.base.config.steps_offset == 1
    ts = TimeShiftScheduler.from_config(PseudoNumericalScheduler(method="s-pndm").config, window=8)
    assert ts.base.method == "s-pndm"
    # configs built in code carry no _class_name, and converted ones keep foreign keys: the base is inferred
    converted = PseudoNumericalScheduler.from_config(DDIMScheduler(clip_sample=True).config, method="f-pndm")
    assert TimeShiftScheduler.from_config(converted.config).base.method == "f-pndm"
    for cls in (DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler, DEISMultistepScheduler):
        assert type(TimeShiftScheduler.from_config(cls.from_config(DDIMScheduler().config).config).base) is cls
    ts = TimeShiftScheduler.from_config(DDPMScheduler().config, base_class="PseudoNumericalScheduler",
                                        base_kwargs={"method": "f-pndm"}, window=4)
    assert ts.base.method == "f-pndm"
    with pytest.raises(ValueError, match="cannot wrap 'EulerDiscreteScheduler'"):
        TimeShiftScheduler.wrap(EulerDiscreteScheduler())
    with pytest.raises(ValueError, match="window must be >= 0"):
        TimeShiftScheduler(window=-1)
    with pytest.raises(ValueError, match="prediction_type='sample'"):
        TimeShiftScheduler.wrap(DDIMScheduler(prediction_type="sample"))
    with pytest.raises(ValueError, match="fon"):
        run(TimeShiftScheduler.wrap(PseudoNumericalScheduler(method="fon"), window=40, cutoff=300),
            torch.randn(1, 1, 4, 4), 10)


def test_paper_model_time_shift_loop(x64):
    """Algorithm 3: window 0 is plain DDIM; otherwise the model sees per-sample shifted times after step 1."""
    sched = PseudoNumericalScheduler(method="ddim")
    plain = run(PseudoNumericalScheduler(method="ddim"), x64, 10)

    def batched_exact(x, t):  # per-sample times, shape (B,)
        return torch.cat([EXACT(x[b:b + 1], t[b]) for b in range(x.shape[0])])

    same = sample_time_shift_paper(batched_exact, x64, sched, 10, window=0, cutoff=300)
    assert torch.allclose(same, plain, atol=1e-12, rtol=0)
    seen = []
    out = sample_time_shift_paper(batched_exact, x64, sched, 10, window=40, cutoff=300,
                                  callback=lambda d: seen.append(d["t_in"].clone()))
    assert seen[0].tolist() == [900] * 4  # first transition: nominal
    assert any(bool((s != s[0]).any()) or int(s[0]) % 100 != 0 for s in seen[1:7])  # shifted, per sample
    assert all(s.tolist() == [int(s[0])] * 4 and int(s[0]) % 100 == 0 for s in seen[8:])  # below cutoff
    assert torch.isfinite(out).all() and (out - plain).abs().max() > 1e-4
    with pytest.raises(ValueError, match="method='ddim'"):
        sample_time_shift_paper(batched_exact, x64, PseudoNumericalScheduler(method="s-pndm"), 10, 40, 300)


def test_paper_loop_is_algorithm_3_written_out(x64):
    """The loop on `loop.sample` equals Algorithm 3 spelt out transition by transition (identical float64 ops)."""
    from diffaccel.samplers.time_shift import _levels_by_time

    def model(x, t):
        return torch.sin(x * (1 + t.to(x.dtype).reshape(-1, 1, 1, 1) / 1000))

    sched = PseudoNumericalScheduler(method="ddim")
    out = sample_time_shift_paper(model, x64, sched, 10, window=40, cutoff=300)
    x, t_in = x64, torch.full((x64.shape[0],), int(sched.grid[0]), dtype=torch.int64)
    for k, t in enumerate(sched.grid):
        tgt = sched._target(k)
        x = transfer(x, model(x, t_in), sched._level(t_in), sched._level(tgt))
        shifted = int(t) > 300 and tgt >= 0
        t_in = (select_shift(x, tgt, 40, _levels_by_time(sched), "floor_half") if shifted
                else torch.full((x.shape[0],), max(tgt, 0), dtype=torch.int64))
    assert torch.equal(out, x)


@settings(max_examples=12, deadline=None)
@given(
    n=st.integers(4, 60),
    method=st.sampled_from(["ddim", "s-pndm", "f-pndm", "plms-ldm", "prk"]),
    window=st.integers(0, 100),
    cutoff=st.integers(0, 999),
    scale=st.floats(0.9, 1.1),
)
def test_property_time_shift_keeps_nfe_and_stays_finite(n, method, window, cutoff, scale):
    base = PseudoNumericalScheduler(method=method, timestep_spacing="trailing")
    ts = TimeShiftScheduler.wrap(base, window=window, cutoff=cutoff)
    calls = []
    x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    out = run(ts, x, n, model=lambda x, t: calls.append(t) or gaussian_eps(scale)(x, t))
    assert len(calls) == len(ts.timesteps) == len(ts.base.timesteps) == nfe_for(method, n)
    assert torch.isfinite(out).all()


def test_variance_source_model_output_changes_the_choice(x64):
    """`model_output` (official DPM-Solver wrapper) measures the model output's variance, not the sample's."""
    def shifts(source):
        ts = TimeShiftScheduler.wrap(DPMSolverMultistepScheduler(), window=40, cutoff=300, variance_source=source)
        ts.set_timesteps(6)
        x, out = x64, []
        for t in ts.timesteps:
            x = ts.step(0.3 * EXACT(x, t), t, x).prev_sample  # a model output with a much smaller variance
            out.append(None if ts.last_shift is None else ts.last_shift.tolist())
        return out

    a, b = shifts("sample"), shifts("model_output")
    assert a[1] is not None and b[1] is not None and a != b


def test_config_mirrors_the_base_num_train_timesteps():
    """Pipelines and hooks read `scheduler.config.num_train_timesteps`; the wrapper carries the base's T."""
    base = DDIMScheduler(num_train_timesteps=500)
    ts = TimeShiftScheduler.wrap(base, window=3, cutoff=300)
    assert ts.config.num_train_timesteps == 500
    assert TimeShiftScheduler.from_config(ts.config).config.num_train_timesteps == 500
    with pytest.raises(ValueError, match="disagrees with the base"):
        TimeShiftScheduler.wrap(base, window=3, cutoff=300, num_train_timesteps=1000)
