"""Key-step schedules and the drift-chosen schedule."""

import itertools

import pytest
import torch
from diffaccel.caching import (
    explicit,
    flops_ratio_limit,
    get_schedule,
    schedule_from_drift,
    sd50,
    sd50_scaled,
    uniform,
)
from hypothesis import given, settings
from hypothesis import strategies as st


def test_sd50_groups_match_the_reference():
    groups = sd50().groups(50)
    assert [g[0] for g in groups] == [0, 1, 2, 3, 5, 10, 15, 25, 35]
    assert groups[3] == [3, 4] and groups[4] == list(range(5, 10)) and groups[-1] == list(range(35, 50))
    assert max(len(g) for g in groups) == 15


def test_uniform_pyramid_and_named():
    assert uniform(4).key_steps(10) == [0, 4, 8]
    assert get_schedule("uniform-2").key_steps(5) == [0, 2, 4]
    assert get_schedule("pyramid").key_steps(45) == [0, 2, 5, 9, 14, 20, 27, 35, 44]
    assert get_schedule("all").key_steps(3) == [0, 1, 2]
    assert get_schedule("if100").key_steps(100)[:11] == list(range(10)) + [10]
    assert get_schedule(lambda s, n: False).key_steps(4) == [0]  # step 0 forced


def test_sd50_scaled_rule():
    assert sd50_scaled().key_steps(50) == sd50().key_steps(50)
    assert sd50_scaled().key_steps(25) == [0, 1, 2, 3, 5, 8, 13, 18]


def test_invalid_schedules_raise_clear_errors():
    with pytest.raises(ValueError, match="start at step 0"):
        explicit([1, 5])
    with pytest.raises(ValueError, match=">= 0"):
        explicit([0, -1])
    with pytest.raises(ValueError, match="empty"):
        explicit([])
    with pytest.raises(ValueError, match="duplicates"):
        explicit([0, 3, 3])
    with pytest.raises(TypeError, match="ints"):
        explicit([0, 2.5])
    with pytest.raises(ValueError, match="out of range"):
        explicit([0, 10]).validate(10)
    with pytest.raises(ValueError, match="defined for 50 steps"):
        sd50().key_steps(25)
    with pytest.raises(ValueError, match="number of steps"):
        sd50_scaled().validate(None)
    with pytest.raises(ValueError, match="unknown key-step schedule"):
        get_schedule("sd51")
    with pytest.raises(ValueError):
        uniform(0)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 80), k=st.integers(1, 9), extra=st.lists(st.integers(1, 79), max_size=10))
def test_groups_partition_all_steps(n, k, extra):
    for sched in (uniform(k), explicit([0, *sorted({e for e in extra if e < n})])):
        groups = sched.groups(n)
        assert [s for g in groups for s in g] == list(range(n))
        assert all(sched.is_key(g[0], n) and not any(sched.is_key(s, n) for s in g[1:]) for g in groups)


def test_flops_ratio_limit_of_the_paper_schedule():
    assert flops_ratio_limit(0.31, 9, 50) == pytest.approx(1.341, abs=1e-3)
    assert flops_ratio_limit(0.31, 50, 50) == 1.0


def _cost(drift, keys):
    return sum(float(drift[max(x for x in keys if x <= s), s]) for s in range(drift.shape[0]) if s not in keys)


def _brute_force(drift, k):
    n = drift.shape[0]
    best, arg = float("inf"), None
    for rest in itertools.combinations(range(1, n), k - 1):
        keys = (0, *rest)
        cost = _cost(drift, keys)
        if cost < best:
            best, arg = cost, list(keys)
    return arg, best


def test_schedule_from_drift_is_optimal_on_small_problems():
    g = torch.Generator().manual_seed(0)
    for n, k in [(7, 3), (8, 2), (9, 4), (6, 6)]:
        x = torch.rand(n, n, generator=g, dtype=torch.float64).cumsum(1)
        drift = torch.triu(x - x.diagonal()[:, None])
        keys, _ = _brute_force(drift, k)
        sched = schedule_from_drift(drift, k)
        got = sched.key_steps(n)
        assert len(got) == k and got[0] == 0 and _cost(drift, got) == pytest.approx(_cost(drift, keys))
    with pytest.raises(ValueError):
        schedule_from_drift(torch.zeros(4, 4), 5)
