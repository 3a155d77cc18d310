"""Scheduler constructor arguments are checked at construction, and Time-Shift over an index-shifted PNDM base
matches variance against the level the base really lands on (issue 14, defects 9, 10 and 12)."""

from __future__ import annotations

import pytest
import torch
from diffaccel.core import InputError
from diffaccel.samplers import PseudoNumericalScheduler, TimeShiftScheduler
from diffaccel.samplers.time_shift import _levels_by_time, select_shift


@pytest.mark.parametrize("kw,named", [({"window": 5000}, "window"), ({"window": -1}, "window"),
                                      ({"cutoff": -1000}, "cutoff"), ({"cutoff": 10**6}, "cutoff"),
                                      ({"window": 2.5}, "window"), ({"cutoff": "300"}, "cutoff")])
def test_time_shift_arguments_fail_at_construction(kw, named):
    with pytest.raises(InputError, match=named):
        TimeShiftScheduler.wrap(PseudoNumericalScheduler(method="ddim"), **kw)


@pytest.mark.parametrize("kw,named", [({"method": None}, "method"), ({"method": 3}, "method"),
                                      ({"num_train_timesteps": 0}, "num_train_timesteps"),
                                      ({"beta_start": -0.1}, "beta_start"), ({"beta_end": 1.5}, "beta_end"),
                                      ({"beta_start": 0.02, "beta_end": 0.001}, "beta_end"),
                                      ({"steps_offset": -1}, "steps_offset"),
                                      ({"alpha_index_shift": 2}, "alpha_index_shift")])
def test_pndm_arguments_fail_at_construction(kw, named):
    with pytest.raises(InputError, match=named):
        PseudoNumericalScheduler(**kw)


def _toy(x, t):
    return 0.9 * x


@pytest.mark.parametrize("shift", [0, 1])
def test_variance_is_matched_against_the_level_the_base_lands_on(shift):
    base = PseudoNumericalScheduler(method="s-pndm", alpha_index_shift=shift, timestep_spacing="pndm_uniform")
    table = _levels_by_time(base)
    taus = torch.arange(0, len(table))
    assert torch.equal(table.double(), base._level(taus).double())  # time τ -> the level the step lands on
    # a sample whose variance is exactly the level at τ* is matched to τ* (was τ* - 1 with shift 1)
    for tau in (120, 400, 777):
        level = 1 - float(table[tau])
        x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(tau), dtype=torch.float64)
        x = (x - x.mean()) / x.std() * level**0.5
        assert int(select_shift(x, tau + 5, 40, table)[0]) == tau


def test_index_shifted_base_with_a_window_at_the_top_runs():
    """Was an IndexError: the window's upper clip was T-1 instead of T-1-shift."""
    base = PseudoNumericalScheduler(method="s-pndm", alpha_index_shift=1, timestep_spacing="pndm_uniform")
    ts = TimeShiftScheduler.wrap(base, window=60, cutoff=0)
    ts.set_timesteps(100)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for t in ts.timesteps:
        x = ts.step(_toy(x, t), t, x).prev_sample
    assert torch.isfinite(x).all()
