"""The Pareto suite's rows, front, table and plot (the full run is `diffaccel bench --suite pareto`)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffaccel.protocol import parse_recipe
from diffaccel.protocol.pareto import ROWS, markdown_table, pareto_front, pareto_suite, plot, report_rows


def test_every_method_and_at_least_four_compositions_per_family():
    kinds = set()
    for model, (reference, recipes) in ROWS.items():
        parsed = [parse_recipe(r) for r in [reference, *recipes]]
        compositions = [p for p in parsed if len({m.slot for m in p} - {"sampler"}) >= 1 and len(p) >= 2]
        assert len(compositions) >= 4, model
        kinds |= {type(m).__name__ for p in parsed for m in p}
    assert kinds >= {"Sampler", "TimeShift", "EncoderPropagation", "HarmoniCa", "FORA", "FKSteering", "BestOfN",
                     "OneStep"}


def test_suite_pairs_every_row_with_its_family_reference():
    configs = pareto_suite()
    names = [c.name for c in configs]
    assert len(names) == len(set(names)) == sum(1 + len(r) for _, r in ROWS.values())
    for c in configs:
        model = c.name.split(" | ")[0]
        assert c.reference == f"{model} | {ROWS[model][0]}" and model in c.requires


@pytest.mark.parametrize("points, front", [
    ([(1.0, 10.0), (2.0, 12.0), (3.0, 11.0), (0.5, 9.0)], [0, 2, 3]),
    ([(1.0, 10.0), (1.0, 10.0)], [0, 1]),  # ties dominate nothing
    ([(2.0, 5.0), (1.0, 6.0)], [0]),
])
def test_pareto_front(points, front):
    assert pareto_front(points) == front


def _result(name, s, fid, ref):
    paired = None if name == ref else SimpleNamespace(psnr=30.0, ssim=0.9)
    return SimpleNamespace(name=name, paired_with=ref, seconds_per_image=s, nfe_per_image=10.0,
                           denoiser_rows_per_image=20.0, flops_per_image=1e9, fid=fid, kid_mean=0.001,
                           class_accuracy=0.9, clip_score=70.0, paired=paired, num_images=8)


def test_table_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    ref = "digits-dit | ddim@25:grid=model"
    results = [_result(ref, 1.0, 10.0, ref), _result("digits-dit | ddim@10", 0.4, 12.0, ref),
               _result("digits-dit | ddim@20 + fora:2", 0.5, 13.0, ref)]
    rows = report_rows(results)
    assert [round(r["speedup"], 2) for r in rows] == [1.0, 2.5, 2.0]
    assert [r["flops_speedup"] for r in rows] == [1.0, 1.0, 1.0]  # same FLOPs everywhere in this fake run
    assert [bool(r.get("pareto")) for r in rows] == [True, False, False]  # front by FLOPs ratio: only the best FID
    table = markdown_table(rows)
    assert table.count("\n") == 4 and "2.50×" in table and "★" in table
    png = plot(rows, tmp_path / "p.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_digits_flux_family_builds_its_rows():
    """digits-flux: reference = the model's default (FlowMatch-Euler, 28 steps, no guidance); rows without a
    sampler run that scheduler at 28 steps, rows with one run the sampler's own step count; the learned plans are
    shipped and bound to that scheduler. Every row's recipe applies to the stock pipeline."""
    from diffaccel.caching.harmonica import CachePlan, attached_plan
    from diffaccel.protocol.samplers import Sampler

    configs = pareto_suite(models=("digits-flux",))
    assert configs[0].name == "digits-flux | plain" == configs[0].reference
    kinds = set()
    for c in configs:
        methods = parse_recipe(c.name.split(" | ", 1)[1])
        kinds |= {type(m).__name__ for m in methods}
        assert {k: c.call_kwargs[k] for k in ("height", "width", "max_sequence_length")} == \
            {"height": 32, "width": 32, "max_sequence_length": 16}
        has_sampler = any(isinstance(m, Sampler) for m in methods)
        assert c.call_kwargs.get("num_inference_steps") == (None if has_sampler else 28), c.name
        assert c.reference == "digits-flux | plain" and c.requires == ("digits-flux",)
        pipe = c.factory()  # applies the recipe (MagCache rows calibrate here)
        plan = attached_plan(pipe.handle.pipe) if "harmonica" in c.name else None
        if plan is not None:
            shipped = CachePlan.load(c.name.split("harmonica:", 1)[1])
            assert plan.num_steps == 28 and plan.scheduler_class == "FlowMatchEulerDiscreteScheduler"
            assert torch.equal(plan.mask, shipped.mask)
    assert kinds >= {"Sampler", "FORA", "HarmoniCa", "MagCache"}
    compositions = [c for c in configs if " + " in c.name and any(k in c.name for k in ("fora", "magcache"))]
    assert len(compositions) >= 4
