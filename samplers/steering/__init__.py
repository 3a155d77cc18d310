"""Inference-time scaling with a reward: FK steering (Singhal et al. 2025) and noise search (Ma et al. 2025).

`FKSteering(pipe, reward, FKConfig(...))` is called like the pipeline and returns all
particles with rewards, weights, ESS trace and NFE; `best_of_n`, `zero_order_search` and `path_search` search the
sampler's noise under an NFE budget and return the winning noise. Rewards follow one protocol (`Reward`).
"""

from .fk import FKConfig, FKSteering, SteeringOutput, X0Recorder, check_sampler, sample_fk
from .noise_search import (
    SearchOutput,
    best_of_n,
    path_search,
    replay_path,
    zero_order_neighbours,
    zero_order_search,
)
from .potentials import POTENTIALS, ParticleSystem, resampling_events
from .resampling import RESAMPLERS, effective_sample_size, normalize_log_weights, resample
from .rewards import (
    CallableReward,
    ClassifierReward,
    CLIPReward,
    CompressibilityReward,
    ConstantReward,
    Reward,
    RewardError,
    as_reward,
    check_rewards,
)

__all__ = [
    "POTENTIALS",
    "RESAMPLERS",
    "CLIPReward",
    "CallableReward",
    "ClassifierReward",
    "CompressibilityReward",
    "ConstantReward",
    "FKConfig",
    "FKSteering",
    "ParticleSystem",
    "Reward",
    "RewardError",
    "SearchOutput",
    "SteeringOutput",
    "X0Recorder",
    "as_reward",
    "best_of_n",
    "check_rewards",
    "check_sampler",
    "effective_sample_size",
    "normalize_log_weights",
    "path_search",
    "replay_path",
    "resample",
    "resampling_events",
    "sample_fk",
    "zero_order_neighbours",
    "zero_order_search",
]
