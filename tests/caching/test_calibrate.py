"""Calibration of branch reuse plans: a real (tiny) pipeline, measured ratios, the DP, the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffaccel.caching.branch_reuse import BranchReusePlan, unet_units
from diffaccel.caching.calibrate import UNetCalibrator, ddim_weights, dp_rows, plan_for_ratio, rows_ratio
from diffaccel.cli import main
from diffaccel.zoo import load
from diffusers import DDIMScheduler

STEPS = 8


@pytest.fixture(scope="module")
def calibrator():
    pipe = load("random-sd")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return UNetCalibrator(pipe, ["a handwritten digit one", "a handwritten digit two"], num_inference_steps=STEPS,
                          guidance_scale=3.0, num_images=2, seed=123, max_age=2)


def test_reuse_errors_are_measured_where_defined(calibrator):
    err = calibrator.err
    assert err.shape == (STEPS, len(calibrator.kinds), 2)
    assert torch.isnan(err[0]).all() and torch.isnan(err[1, :, 1]).all()  # no cache older than the trajectory
    finite = err[~torch.isnan(err)]
    assert (finite >= 0).all() and (finite > 0).any()
    # recomputing more of the UNet from the same caches cannot be worse on average than reusing everything
    names = list(calibrator.kinds)
    assert float(err[1:, names.index("cut0"), 0].mean()) <= float(err[1:, names.index("reuse-all"), 0].mean())


def test_plan_meets_the_target_and_the_model_matches_the_measurement(calibrator):
    target = 1.4
    plan, rep = calibrator.check(target)
    assert isinstance(plan, BranchReusePlan) and plan.num_steps == STEPS
    assert plan.num_units == len(unet_units(calibrator.pipe.unet)) and bool(plan.mask[0].all())
    # FLOP counts are exact integers of the executed ops: the modelled whole-call ratio (per-row UNet FLOPs plus
    # the rest of the call) and the measured one differ only by how the non-UNet work is split per image
    assert rep.measured_flops_ratio >= target * 0.99
    assert rep.measured_flops_ratio == pytest.approx(target, rel=0.25)
    assert math.isfinite(rep.psnr) and 0 < rep.ssim < 1
    json.dumps(rep.as_dict(), allow_nan=False)
    with pytest.raises(ValueError, match="beyond"):
        calibrator.check(calibrator.max_speedup() * 1.5)


def test_dp_trades_error_for_compute():
    # two kinds: "cheap" (cost 0, error 1 at any age) and "dear" (cost 0.5, error 0.1); 5 steps
    err = torch.tensor([[1.0, 0.1]] * 5, dtype=torch.float64)[:, :, None].repeat(1, 1, 4)
    err[0] = math.nan
    w, costs = torch.ones(5, dtype=torch.float64), torch.tensor([0.0, 0.5], dtype=torch.float64)
    assert dp_rows(err, w, costs, 1.0, lam=1e-6) == [-1] * 5  # compute is free: every row full
    assert dp_rows(err, w, costs, 1.0, lam=1e6) == [-1, 0, 0, 0, 0]  # compute is dear: cheapest rows
    rows = plan_for_ratio(err, w, costs, 1.0, target=1.6)
    assert rows_ratio(rows, costs, 1.0) >= 1.6 and rows[0] == -1


def test_ddim_weights_are_positive(calibrator):
    w = ddim_weights(calibrator.pipe.scheduler, [981.0, 741.0, 501.0, 261.0, 21.0])
    assert w.shape == (5,) and bool((w > 0).all())


def test_cli_calibrate(tmp_path, capsys):
    out = tmp_path / "p.branch.safetensors"
    code = main(["cache", "calibrate", "--model", "random-sd", "--speedup", "1.3", "--steps", "6", "--images", "1",
                 "--guidance", "3.0", "--out", str(out), "--json", "-q"])
    assert code == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["measured_flops_ratio"] >= 1.3 * 0.99 and out.is_file()
    assert BranchReusePlan.load(out).metadata["model"] == "random-sd"
    assert main(["cache", "calibrate", "--model", "digits-ddpm", "--speedup", "2", "--out", str(out), "-q"]) == 2
    assert main(["cache", "calibrate", "--model", "random-dit", "--prompt", "x", "--speedup", "2", "--out",
                 str(out), "-q"]) == 2


def test_dit_calibration_plan_and_cli(tmp_path, capsys):
    from diffaccel.caching import CachePlan

    out = tmp_path / "dit.safetensors"
    code = main(["cache", "calibrate", "--model", "random-dit", "--speedup", "1.2", "--steps", "6", "--images", "2",
                 "--out", str(out), "--json", "-q"])
    assert code == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["measured_flops_ratio"] >= 1.2 * 0.99  # the tiny DiT: VAE decoding caps the ratio near 1.3
    plan = CachePlan.load(out)
    assert plan.num_steps == 6 and bool(plan.mask[0].all()) and plan.metadata["model"] == "random-dit"


def test_dit_depth_row_kinds_and_the_denoiser_basis():
    """Depth splits are complementary row kinds; a denoiser-basis target is met by the modelled denoiser ratio
    (FORA-2's ratio here), which is above the whole-call ratio (the VAE always runs)."""
    from diffaccel.caching.calibrate import DiTCalibrator
    from zoo_pipes import quiet_pipeline

    cal = DiTCalibrator(quiet_pipeline("random-dit"), [1, 7], num_inference_steps=6, guidance_scale=4.0,
                        num_images=2, max_age=2)
    depth = len(cal.model.transformer_blocks)
    assert {f"shallow{d}" for d in range(1, depth)} <= set(cal.names)
    for d in range(1, depth):
        assert bool((cal.kinds[f"shallow{d}"] ^ cal.kinds[f"deep{d}"]).all())
    fora2 = [-1 if s % 2 == 0 else cal.names.index("reuse-all") for s in range(6)]
    target = rows_ratio(fora2, cal.costs, cal.full_cost)
    plan, rep = cal.check(target, basis="denoiser")
    assert rep.modelled_flops_ratio >= target * (1 - 1e-12)
    assert 1.0 < rep.measured_flops_ratio < rep.modelled_flops_ratio
    with pytest.raises(ValueError, match="basis"):
        cal.check(1.1, basis="wall")
    # the greedy search samples candidates instead of using the error model; its path is reused for lower targets
    plan, rep = cal.check(target, basis="denoiser", search="greedy")
    assert rep.modelled_flops_ratio >= target * (1 - 1e-12) and set(rep.rows) <= {"full", "reuse-all"}
    assert rep.rows[0] == "full" and plan.metadata["search"] == "greedy"
    assert cal.greedy_rows(1.0) == [-1] * 6
    # the local search starts from FORA's spacing: at FORA-2's ratio on 6 steps that is FORA-2 itself, and the
    # refined plan keeps its number of full steps (same modelled ratio) and is no worse on the calibration images
    assert cal.spaced_rows(target) == fora2
    start = cal.fidelity(cal._plan_from(fora2, {})).psnr
    plan, rep = cal.check(target, basis="denoiser", search="local")
    assert rep.rows.count("full") == fora2.count(-1) and rep.rows[0] == "full"
    assert rep.modelled_flops_ratio == pytest.approx(target, rel=1e-12) and rep.psnr >= start
    with pytest.raises(ValueError, match="search"):
        cal.check(target, basis="denoiser", search="anneal")


def test_spread_schedules_hold_fora_and_taylorseer_and_keep_the_count():
    """The local search's starts: step 0 full, `count` distinct full steps each; FORA-3's and diffusers'
    TaylorSeer (interval 3, one warm-up step: 0, 2, 5, ...) schedules at 7 of 20 steps are both among them, as is
    FORA-2 at 10 of 20; bad counts are refused."""
    from diffaccel.caching.calibrate import spread_schedules

    for steps, count in [(20, 7), (20, 10), (6, 3), (5, 2), (3, 3), (50, 17)]:
        starts = spread_schedules(steps, count)
        assert starts and len({tuple(s) for s in starts}) == len(starts)
        for full in starts:
            assert full[0] == 0 and len(set(full)) == count and all(0 <= s < steps for s in full)
    seven = spread_schedules(20, 7)
    assert list(range(0, 20, 3)) in seven and [0, 2, 5, 8, 11, 14, 17] in seven
    assert list(range(0, 20, 2)) in spread_schedules(20, 10)
    assert spread_schedules(20, 1) == [[0]] and spread_schedules(4, 4) == [[0, 1, 2, 3]]
    for bad in (0, 21):
        with pytest.raises(ValueError, match="count"):
            spread_schedules(20, bad)
