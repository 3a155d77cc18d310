import pytest
from diffaccel.core.schedulers import is_stochastic
from diffaccel.samplers import PseudoNumericalScheduler, TimeShiftScheduler
from diffaccel.samplers.steering.fk import FKConfig, check_sampler
from diffusers import DDIMScheduler

CONFIG = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)


def test_pndm_family_is_deterministic_and_stateful():
    sched = PseudoNumericalScheduler(**CONFIG, method="s-pndm")
    assert is_stochastic(sched, eta=1.0) is False
    with pytest.raises(ValueError, match="per-row history"):
        check_sampler(sched, 1.0, FKConfig(num_particles=2, potential="max"))


def test_time_shift_wrapper_is_judged_by_its_base():
    ddim = DDIMScheduler(**CONFIG)
    assert is_stochastic(TimeShiftScheduler.wrap(ddim, window=0, cutoff=300), eta=1.0) is True
    assert is_stochastic(TimeShiftScheduler.wrap(ddim, window=0, cutoff=300), eta=0.0) is False
    wrapped = TimeShiftScheduler.wrap(PseudoNumericalScheduler(**CONFIG, method="s-pndm"), window=0, cutoff=300)
    assert is_stochastic(wrapped, eta=1.0) is False
