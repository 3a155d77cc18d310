"""`benchmarks/steering.py` on digits-flux: the rows spend the NFE they report (base T, best-of-N and FK k·T), FK runs
on the stochastic flow sampler, and the report names the flow samplers."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load_script():
    sys.path.insert(0, str(BENCH))  # the script imports its sibling `plots`
    spec = importlib.util.spec_from_file_location("steering_bench_under_test", BENCH / "steering.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_flux_rows_count_their_nfe_and_report_the_flow_samplers(tmp_path):
    torch.set_num_threads(1)
    bench = _load_script()
    out = tmp_path / "steer.jsonl"
    bench.main(["--model", "digits-flux", "--prompts", "2", "--steps", "5", "--budgets", "2", "--potentials", "max",
                "--guidance", "1", "--target", "unconditional", "--lmbda", "1",
                "--methods", "base", "base eta=1", "best-of-N", "FK max", "--out", str(out)])
    rows = {(r["method"], r["budget"]): r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {("base", 1), ("base eta=1", 1), ("best-of-N", 2), ("FK max", 2)}
    assert rows["base", 1]["nfe"] == 5 and rows["base eta=1", 1]["nfe"] == 5
    assert rows["best-of-N", 2]["nfe"] == 10 and rows["FK max", 2]["nfe"] == 10
    for r in rows.values():
        assert r["model"] == "digits-flux" and len(r["rewards"]) == 2 and 0 <= r["accuracy"] <= 1
        assert all(v <= 0 for v in r["rewards"])  # log-probabilities
    report = out.with_suffix(".md").read_text()
    assert "on digits-flux" in report and "FlowMatchSDEScheduler eta = 1" in report and "DDIM" not in report
