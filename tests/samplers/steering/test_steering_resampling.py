"""Resamplers and log-weight numerics."""

import pytest
import torch
from diffaccel.samplers.steering.resampling import (
    RESAMPLERS,
    effective_sample_size,
    flat_indices,
    normalize_log_weights,
    resample,
)

K = 6
W = torch.tensor([0.02, 0.30, 0.05, 0.33, 0.0, 0.30], dtype=torch.float64)


@pytest.mark.parametrize("method", RESAMPLERS)
def test_resamplers_are_unbiased(method):
    """E[#copies of i] = k·ŵ_i: z-test per index over 20 000 independent draws with a fixed seed."""
    n = 20_000
    logw = W.log().expand(n, K)
    anc = resample(logw, method, torch.Generator().manual_seed(0))
    assert anc.shape == (n, K) and anc.dtype == torch.long
    counts = torch.nn.functional.one_hot(anc, K).sum(dim=1).double()  # [n, K] copies per draw
    mean, sd = counts.mean(0), counts.std(0)
    z = (mean - K * W).abs() / (sd / n**0.5).clamp_min(1e-12)
    assert torch.all(z < 4.5), (method, mean, K * W)
    assert counts[:, 4].sum() == 0  # zero weight is never drawn
    if method in ("systematic", "residual"):
        floor = torch.floor(K * W)
        assert torch.all(counts >= floor)
    if method == "systematic":
        assert torch.all(counts <= torch.ceil(K * W))


@pytest.mark.parametrize("method", RESAMPLERS)
def test_one_hot_and_all_dead_groups(method):
    logw = torch.full((2, K), float("-inf"))
    logw[0, 3] = 5.0
    with pytest.warns(RuntimeWarning, match="no finite weight"):
        anc = resample(logw, method, torch.Generator().manual_seed(1))
    assert torch.all(anc[0] == 3)
    assert normalize_log_weights(logw[1:], warn=False).exp().allclose(torch.full((1, K), 1 / K, dtype=torch.float64))


@pytest.mark.parametrize("method", RESAMPLERS)
def test_shift_invariance_and_huge_log_weights(method):
    """S4: logw + 1e4 gives the same normalised weights, ESS and ancestors (same generator); nothing overflows."""
    logw = torch.randn(3, K, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 3
    for shifted in (logw + 1e4, logw - 1e4):
        assert torch.allclose(normalize_log_weights(logw), normalize_log_weights(shifted), atol=1e-9)
        assert torch.allclose(effective_sample_size(logw), effective_sample_size(shifted))
        a = resample(logw, method, torch.Generator().manual_seed(3))
        b = resample(shifted, method, torch.Generator().manual_seed(3))
        assert torch.equal(a, b)
    big = torch.tensor([[1e4, -1e4, 0.0, 1e4 - 1.0, -1e4, 5.0]])
    lw = normalize_log_weights(big)
    assert torch.isfinite(lw.exp()).all() and lw.exp().sum().item() == pytest.approx(1.0)
    ess = effective_sample_size(big)
    assert 1.0 <= ess.item() <= K


def test_ess_bounds_and_values():
    assert effective_sample_size(torch.zeros(1, K)).item() == pytest.approx(K)
    assert effective_sample_size(torch.tensor([[0.0] + [float("-inf")] * (K - 1)])).item() == pytest.approx(1.0)
    w = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    assert effective_sample_size(w.log()).item() == pytest.approx(1 / (w**2).sum().item())


def test_nan_and_posinf_log_weights_count_as_dead():
    lw = normalize_log_weights(torch.tensor([[0.0, float("nan"), float("inf"), 0.0]]))
    assert lw.exp().tolist()[0] == pytest.approx([0.5, 0.0, 0.0, 0.5])


def test_unknown_resampler_and_flat_indices():
    with pytest.raises(ValueError, match="unknown resampler"):
        resample(torch.zeros(1, 3), "bogus")
    rows = flat_indices(torch.tensor([[2, 2, 0], [1, 0, 0]]))
    assert rows.tolist() == [2, 2, 0, 4, 3, 3]
