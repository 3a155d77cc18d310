"""`benchmarks/flux_caches.py`: the rows it builds (FORA, FORA + forecast of order 1 and 2, learned plans with and
without the forecast, diffusers' caches) attach what they say, and the PSNR-vs-compute Pareto marks."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "flux_caches.py"
STEPS = 4


def _load_script():
    if str(SCRIPT.parent) not in sys.path:
        sys.path.insert(0, str(SCRIPT.parent))  # the script imports its sibling `flow_samplers`
    spec = importlib.util.spec_from_file_location("flux_caches_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load_script()


def test_rows_attach_the_plans_they_name(bench, tmp_path):
    from diffaccel import zoo
    from diffaccel.caching.harmonica import attached_plan, random_plan, unit_modules
    from diffaccel.zoo.quality import flux_call_kwargs

    torch.set_num_threads(1)
    pipe = zoo.load("random-flux")
    pipe.set_progress_bar_config(disable=True)
    n_units = len(unit_modules(pipe.transformer))
    learned = random_plan(STEPS, n_units, 0.4, seed=3, model=pipe).save(tmp_path / "learned.safetensors")
    rows = bench.configs(pipe, STEPS, flux_call_kwargs(pipe, 0, None), bench.learned_plans(STEPS, [str(learned)]))
    names = [r[0] for r in rows]
    assert names[0] == "uncached" and len(names) == len(set(names))
    for k in bench.FORA_INTERVALS:
        assert {f"diffaccel FORA n={k}{s}" for s in ("", " + forecast", " + order-2 forecast")} <= set(names)
    assert "diffaccel HarmoniCa learned" in names and "diffaccel HarmoniCa learned + forecast" in names
    assert "diffaccel HarmoniCa learned + order-2 forecast" not in names
    assert sum(n.startswith("diffusers ") for n in names) == 12  # FBC x3, TaylorSeer x3 at order 1 and 2, MagCache x3
    by_name = {name: (attach, detach) for name, attach, detach in rows}
    for name, forecast, mask in [("diffaccel FORA n=3 + forecast", 1, torch.arange(STEPS) % 3 == 0),
                                 ("diffaccel FORA n=2 + order-2 forecast", 2, torch.arange(STEPS) % 2 == 0),
                                 ("diffaccel FORA n=3", 0, torch.arange(STEPS) % 3 == 0),
                                 ("diffaccel HarmoniCa learned", 0, None),
                                 ("diffaccel HarmoniCa learned + forecast", 1, None)]:
        attach, detach = by_name[name]
        attach()
        try:
            plan = attached_plan(pipe)
            assert plan.forecast == forecast, name
            if mask is None:
                mask = random_plan(STEPS, n_units, 0.4, seed=3).mask
                assert torch.equal(plan.mask, mask), name
            else:
                assert torch.equal(plan.mask, mask[:, None].expand(STEPS, n_units)), name
        finally:
            detach()
        assert attached_plan(pipe) is None


def test_pareto_marks(bench):
    rows = [{"config": "uncached", "compute_fraction": 1.0, "psnr": None},
            {"config": "diffaccel A", "compute_fraction": 0.5, "psnr": 40.0},
            {"config": "diffusers B", "compute_fraction": 0.5, "psnr": 38.0},
            {"config": "diffusers C", "compute_fraction": 0.4, "psnr": 41.0},
            {"config": "diffaccel D", "compute_fraction": 0.6, "psnr": 39.0}]
    marks = bench.pareto_marks(rows)
    assert marks["uncached"] == "reference"
    assert marks["diffusers C"] == "front"
    assert marks["diffaccel A"] == "dominated by diffusers C"
    assert marks["diffusers B"] == "dominated by diffaccel A, diffusers C"
    assert marks["diffaccel D"] == "dominated by diffaccel A, diffusers C"
