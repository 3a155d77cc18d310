"""Potentials, the product condition and the reference-compatible weighting."""

import math

import pytest
import torch
from diffaccel.samplers.steering.fk import FKConfig
from diffaccel.samplers.steering.potentials import ParticleSystem, resampling_events


def run_events(system: ParticleSystem, rewards: list[torch.Tensor]) -> list[torch.Tensor]:
    """Feed reward tensors [B, k] (indexed by *current* particle) and return the final rewards in particle order."""
    last = None
    for j, r in enumerate(rewards):
        anc = system.event(r, final=j == len(rewards) - 1)
        last = r.double()[torch.arange(system.groups)[:, None], anc]
    return last


@pytest.mark.parametrize("potential", ["diff", "max", "sum", "immediate"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_product_condition_along_every_surviving_ancestry(potential, adaptive):
    """S5: Σ log-potentials applied along each surviving path = λ·r_final (diff: up to its floor, here 0)."""
    gen = torch.Generator().manual_seed(0)
    for trial in range(5):
        system = ParticleSystem(3, 8, potential, lmbda=2.5, adaptive=adaptive, resampler="multinomial",
                                generator=torch.Generator().manual_seed(trial))
        rewards = [torch.randn(3, 8, generator=gen) * 3 - 1 for _ in range(6)]
        final = run_events(system, rewards)
        assert torch.allclose(system.acc, 2.5 * final, atol=1e-9), potential


def test_max_default_floor_sees_negative_rewards():
    """Textbook `max` starts its running max at −inf: negative rewards still steer (the reference's 0.0 does not)."""
    r = torch.tensor([[-3.0, -1.0, -2.0, -5.0]])
    textbook = ParticleSystem(1, 4, "max", lmbda=1.0)
    textbook.event(r)
    assert textbook.ess_trace[0].item() < 4.0
    reference = ParticleSystem(1, 4, "max", lmbda=1.0, compat="reference")
    reference.event(r)
    assert reference.ess_trace[0].item() == pytest.approx(4.0)  # blind: max(0, r) = 0 for all


def test_textbook_carries_weights_reference_does_not():
    """Adaptive mode without resampling: textbook accumulates increments, the reference keeps only the current one."""
    r1 = torch.tensor([[0.0, 0.1, 0.0, 0.0]])
    r2 = torch.tensor([[0.0, 0.0, 0.0, 0.1]])
    tb = ParticleSystem(1, 4, "immediate", lmbda=1.0, adaptive=True)
    ref = ParticleSystem(1, 4, "immediate", lmbda=1.0, adaptive=True, compat="reference")
    for s in (tb, ref):
        s.event(r1)
        s.event(r2)
    assert not any(bool(d.any()) for d in tb.resampled + ref.resampled)  # ESS stayed high
    assert tb.log_weights[0].tolist() == pytest.approx([0.0, 0.1, 0.0, 0.1], abs=1e-6)  # r1 and r2 both kept
    assert ref.log_weights.abs().max().item() == 0.0  # weights are not carried in reference mode


def test_reference_clamps_weights_at_1e10():
    """λ·r = 30 and 40 both exceed log(1e10) ≈ 23: the reference clamp makes them equal, textbook keeps e^{10}."""
    r = torch.tensor([[30.0, 40.0]])
    ref = ParticleSystem(1, 2, "immediate", lmbda=1.0, compat="reference", adaptive=True, ess_threshold=0.1)
    ref.event(r)
    assert ref.ess_trace[0].item() == pytest.approx(2.0)
    tb = ParticleSystem(1, 2, "immediate", lmbda=1.0, adaptive=True, ess_threshold=0.1)
    tb.event(r)
    assert tb.ess_trace[0].item() == pytest.approx(1 / (1 / (1 + math.exp(-10)) ** 2 + 1 / (1 + math.exp(10)) ** 2))


def test_group_isolation_and_direction():
    """S7: two groups with opposite rewards; ancestors never leave their block, each block follows its reward."""
    system = ParticleSystem(2, 16, "diff", lmbda=5.0, resampler="systematic",
                            generator=torch.Generator().manual_seed(0))
    x = torch.linspace(-1, 1, 16)
    anc = system.event(torch.stack([x, -x]), final=True)
    assert anc.min() >= 0 and anc.max() < 16
    assert x[anc[0]].mean() > 0.5 and x[anc[1]].mean() < -0.5


def test_huge_rewards_keep_finite_log_weights():
    """λ·r up to ±1e4: normalised weights finite, ESS in [1, k]."""
    system = ParticleSystem(1, 4, "immediate", lmbda=1.0, adaptive=True)
    system.event(torch.tensor([[1e4, -1e4, 1e4 - 2, 0.0]]))
    w = system.normalized_log_weights().exp()
    assert torch.isfinite(w).all() and w.sum().item() == pytest.approx(1.0)
    assert 1.0 <= system.ess_trace[0].item() <= 4.0


def test_nonfinite_rewards_get_zero_weight():
    system = ParticleSystem(1, 4, "max", lmbda=1.0, resampler="systematic")
    anc = system.event(torch.tensor([[float("nan"), float("inf"), 0.0, 0.0]]), final=True)
    assert set(anc[0].tolist()) <= {2, 3}


def test_bon_picks_the_best_and_is_does_not_resample():
    bon = ParticleSystem(1, 3, "bon")
    bon.event(torch.tensor([[0.1, 0.7, 0.3]]), final=True)
    assert bon.normalized_log_weights().exp()[0].tolist() == pytest.approx([0.0, 1.0, 0.0])
    is_ = ParticleSystem(1, 3, "is", lmbda=1.0)
    is_.event(torch.tensor([[0.0, 1.0, 2.0]]), final=True)
    assert not is_.resampled[0].any()
    assert is_.normalized_log_weights().exp()[0].tolist() == pytest.approx(torch.softmax(torch.arange(3.0), 0).tolist())


def test_schedule_and_bad_inputs():
    assert resampling_events(100, 20, 20, 80) == [20, 40, 60, 80, 99]
    assert resampling_events(10, 3, 0, None) == [0, 3, 6, 9]
    assert resampling_events(10, 3, 0, None, potential="bon") == [9]
    assert resampling_events(10, 1, 0, None, steps=[2, 5]) == [2, 5, 9]
    with pytest.raises(ValueError, match="outside the schedule"):
        resampling_events(25, 20, 20, 80)
    with pytest.raises(ValueError, match="outside the schedule"):
        resampling_events(10, 1, 0, None, steps=[3, 10])
    with pytest.raises(ValueError, match="outside the schedule"):
        FKConfig(resample_steps=[-1]).events(10)
    with pytest.raises(ValueError, match="k\\) must be an integer >= 1"):
        FKConfig(num_particles=0)
    with pytest.raises(ValueError, match="must be >= 0"):
        FKConfig(lmbda=-0.5)
    with pytest.raises(ValueError, match="unknown potential"):
        FKConfig(potential="product")
    with pytest.raises(ValueError, match="unknown resampler"):
        FKConfig(resampler="bogus")
