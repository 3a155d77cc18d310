"""`benchmarks/gpu_check.py`: the CPU dry run of every section, the budget / time-limit bookkeeping, the outputs."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[dict, str, str]:
    """One dry run for the whole file (about a minute of CPU): without --dry-run on a machine without CUDA, the
    script must announce the dry run in one line, run it and exit 0."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the no-CUDA path is not reachable")
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--threads", "1"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text(), proc.stderr


def test_without_cuda_says_so_in_one_line_and_runs_every_section(dry_run):
    report, md, stderr = dry_run
    no_cuda_lines = [line for line in stderr.splitlines() if "no CUDA device" in line]
    assert len(no_cuda_lines) == 1
    assert report["dry_run"] is True and report["device"] == "cpu"
    sections = report["sections"]
    assert list(sections) == ["environment", "zoo_dtypes", "unet_caching", "dit_caching", "attention",
                              "flux_blocks", "parallel_nccl", "compile"]
    bad = {name: (s["status"], s.get("reason"), s.get("traceback", "")[-800:]) for name, s in sections.items()
           if s["status"] != "ok"}
    assert not bad
    assert "DRY RUN" in md and "| compile | ok |" in md


def test_dry_run_measures_what_the_gpu_run_will(dry_run):
    report, md, _ = dry_run
    s = report["sections"]
    env = s["environment"]["result"]
    assert env["torch"] == torch.__version__ and env["cuda_available"] is False
    zoo = s["zoo_dtypes"]["result"]["pipelines"]
    assert zoo["digits-dit"]["float32"]["images_per_s"] > 0
    assert 0.0 <= zoo["digits-dit"]["float32"]["class_accuracy"] <= 1.0
    assert zoo["digits-dit"]["bfloat16"]["max_abs_diff_vs_fp32"] >= 0.0
    unet = s["unet_caching"]["result"]["rows"]
    assert {"plain", "ep_uniform-2_sequential", "ep_uniform-2_parallel"} <= set(unet)
    assert all(row["median_s"] > 0 and row["error"] is None for row in unet.values())
    # parallel decoding is exact with respect to sequential encoder propagation; both differ from plain
    assert unet["ep_uniform-2_parallel"]["max_rel_diff_vs_plain"] > 0
    dit = s["dit_caching"]["result"]["rows"]
    assert {"plain", "fora_n2", "fora_n3"} <= set(dit) and all(r["error"] is None for r in dit.values())
    assert s["attention"]["result"]["rows"]["sdpa"]["median_s"] > 0
    assert s["flux_blocks"]["result"]["projected_transformer_s_per_step"] > 0
    par = s["parallel_nccl"]["result"]
    assert "NOT a speed-up" in par["note"]
    for rank in par["summary"]:
        assert rank["error"] is None
        # sync mode is exact up to fp32 reassociation over a tiny UNet (~30 layers): relative error << 1e-4
        assert rank["sync_max_rel_err"] < 1e-4
        assert rank["sync_wire_bytes_per_call"] > 0 and rank["displaced_wire_bytes_per_call"] > 0
    comp = s["compile"]["result"]["rows"]
    assert {"dit_eager", "dit_regional", "dit_regional_fora_n2", "unet_eager", "unet_regional",
            "unet_regional_ep_parallel", "unet_full"} <= set(comp)
    assert comp["unet_full"]["graphs_compiled"] >= 1 and comp["dit_eager"]["compile_s"] is None
    assert "NOT a speed-up" in md


def test_budget_skips_and_time_limits_are_recorded(tmp_path, monkeypatch):
    gc = _load_script()

    def slow(ctx):
        ctx.partial["before_the_limit"] = 1
        end = time.monotonic() + 30
        while time.monotonic() < end:  # interrupted by the section's SIGALRM
            time.sleep(0.01)
        return {"never": True}

    def broken(ctx):
        raise RuntimeError("boom")

    monkeypatch.setattr(gc, "SECTIONS", [("environment", gc.section_environment), ("zoo_dtypes", slow),
                                         ("unet_caching", broken), ("compile", gc.section_compile)])
    monkeypatch.setattr(gc, "SECTION_SHARES", {"environment": 0.4, "zoo_dtypes": 0.1, "unet_caching": 0.1,
                                               "compile": 0.01})
    monkeypatch.setattr(gc, "MIN_START_S", {"environment": 0.0, "zoo_dtypes": 0.0, "unet_caching": 0.0,
                                            "compile": 1000.0})
    ctx = gc.Ctx(device=torch.device("cpu"), dry_run=False, out=tmp_path, budget_s=20.0)
    report = gc.run(ctx, "test")
    s = report["sections"]
    assert s["environment"]["status"] == "ok"
    assert s["zoo_dtypes"]["status"] == "timed out" and s["zoo_dtypes"]["result"] == {"before_the_limit": 1}
    assert s["zoo_dtypes"]["seconds"] < 15  # the alarm fired at its share of the budget, not after 30 s
    assert s["unet_caching"]["status"] == "error" and "boom" in s["unet_caching"]["reason"]
    assert s["compile"]["status"] == "skipped" and "budget" in s["compile"]["reason"]
    saved = json.loads((tmp_path / "gpu_check.json").read_text())  # strict JSON, written after every section
    assert saved["sections"]["compile"]["status"] == "skipped"
    assert "| zoo_dtypes | timed out" in (tmp_path / "gpu_check.md").read_text()
