"""Samplers: the PNDM family, the Time-Shift sampler and a stochastic flow sampler as drop-in diffusers schedulers.

    pipe.scheduler = PseudoNumericalScheduler.from_config(pipe.scheduler.config, method="f-pndm")
    pipe.scheduler = TimeShiftScheduler.from_config(pipe.scheduler.config, window=30, cutoff=300)  # wraps it
    pipe.scheduler = FlowMatchSDEScheduler.from_config(pipe.scheduler.config, eta=1.0)  # Flux / SD3

`num_inference_steps` counts transitions; `len(pipe.scheduler.timesteps)` is the number of model calls
(`nfe_for(method, n)`; `transitions_for_nfe(method, nfe)` inverts it).
"""

from .flow_sde import FlowMatchSDEScheduler
from .pndm import METHODS, PseudoNumericalScheduler, nfe_for, transitions_for_nfe
from .steering import (
    CallableReward,
    ClassifierReward,
    CLIPReward,
    CompressibilityReward,
    FKConfig,
    FKSteering,
    Reward,
    SteeringOutput,
    best_of_n,
    path_search,
    zero_order_search,
)
from .time_shift import TimeShiftScheduler, sample_time_shift_paper, select_shift
from .transfer import make_grid, transfer

__all__ = [
    "CLIPReward",
    "CallableReward",
    "ClassifierReward",
    "CompressibilityReward",
    "FKConfig",
    "FKSteering",
    "FlowMatchSDEScheduler",
    "Reward",
    "SteeringOutput",
    "best_of_n",
    "path_search",
    "zero_order_search",
    "METHODS",
    "PseudoNumericalScheduler",
    "TimeShiftScheduler",
    "make_grid",
    "sample_time_shift_paper",
    "nfe_for",
    "select_shift",
    "transfer",
    "transitions_for_nfe",
]
