"""Displaced (DistriFusion) and PCPP modes: fixed point, first-order error, PCPP special cases."""

import pytest


@pytest.mark.parametrize("world", [2, 4])
def test_fixed_point_and_warmup(run_suite, world):
    for res in run_suite(world, "displaced"):
        r = res["displaced"]
        for fam in ("unet", "dit", "pixart"):
            assert r[f"{fam}_fixed_point_corrected"] <= 1e-5, fam
            assert r[f"{fam}_warmup_covers_all"] <= 1e-5, fam
        if world == 2:
            for gn in ("substitute", "stale"):
                assert r[f"unet_fixed_point_{gn}"] <= 1e-5


@pytest.mark.parametrize("world", [2, 4])
def test_pcpp_equals_masked_single_device_attention(run_suite, world):
    """At its fixed point PCPP equals the single-device model whose self-attention is masked to the own band plus
    m border rows of each neighbour; f = 0 is own-band attention; far context is lost for f < 1."""
    for res in run_suite(world, "displaced"):
        r = res["displaced"]
        fams = ("unet", "dit", "pixart") if world == 2 else ("dit", "pixart")
        for fam in fams:
            fracs = (0.5,) if fam == "unet" else (0.0, 0.25, 0.5, 1.0)
            for f in fracs:
                assert r[f"{fam}_pcpp{f}_vs_masked"] <= 1e-5, (fam, f)
                assert r[f"{fam}_pcpp{f}_calls"] < 80, (fam, f)  # it converged
            if fam != "unet":
                assert r[f"{fam}_pcpp1.0_vs_full"] <= 1e-5 if world == 2 else r[f"{fam}_pcpp1.0_vs_full"] > 1e-4
                assert r[f"{fam}_pcpp0.0_vs_full"] > 1e-3  # dropping context changes the model
        if world == 2:
            for fam in ("unet", "dit", "pixart"):
                assert r[f"{fam}_pcpp1_vs_displaced"] <= 1e-6, fam  # N = 2, f >= 1 is DistriFusion
                assert r[f"{fam}_displaced_vs_fresh"] > 0


def test_error_is_first_order_in_input_change(run_suite):
    """fp64, sync call on x then displaced call on x + delta*d: error / delta stays constant (x10 per decade)."""
    r = run_suite(2, "first_order")[0]["first_order"]
    for key, errs in r.items():
        assert errs[-1] > 0, key
        for big, small in zip(errs, errs[1:], strict=False):
            assert 7 < big / small < 13, (key, errs)
