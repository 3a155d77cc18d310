"""diffaccel's FORA unit plans vs diffusers' own caches on `digits-flux`, side by side in one run (issue #16).

    python benchmarks/flux_caches.py                 # 28 steps, 200 images per row, every shipped digits-flux plan
    python benchmarks/flux_caches.py --report-only   # rebuild flux_caches.md from flux_caches.jsonl

Rows: the uncached pipeline (the reference of the paired metrics), diffaccel FORA plans through the HarmoniCa engine
(double-stream attn/ff/ff_context and single-stream attn/proj_mlp units reused every n-th step), the HarmoniCa plans
learned for digits-flux (`caching/plans/digits-flux-*`, router training at 28 steps), each of these plans again with
the order-1 forecast of reused outputs (`CachePlan.forecast = 1`: TaylorSeer's finite-difference rule, Liu et al.
2025, Eq. 6, on the plan's schedule; the learned plans were trained without it), the FORA plans with the order-2
forecast (`forecast = 2`), and diffusers' `FirstBlockCacheConfig`, `TaylorSeerCacheConfig` (max_order 1 and 2) and
`MagCacheConfig` through `transformer.enable_cache` (MagCache
calibrated as its docstring says: one `calibrate=True` run, on seeds disjoint from the measured ones). Compute is
compared as the measured FLOPs of one 28-step generation (`core.flops`, executed ops only) relative to uncached;
FID/accuracy against the digits test split; PSNR/SSIM image by image against the uncached output of the same seeds.
The report marks, for paired PSNR against compute, which rows no other row dominates and whether any peer row
(diffusers' caches) dominates each diffaccel row. Every run gets a run id; the report shows the latest run only.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import io
import json
import sys
import time
from pathlib import Path

import torch
from diffaccel.caching import apply_cache_plan, remove_cache_plan
from diffaccel.caching.harmonica import CachePlan, fora_plan, shipped_plans, unit_modules
from diffaccel.core import make_generators
from diffaccel.core.flops import flop_counter
from diffaccel.evals import evaluate
from diffaccel.zoo import load
from diffaccel.zoo.quality import flux_call_kwargs
from flow_samplers import common_parser, machine, run_and_report

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "digits-flux"
FORA_INTERVALS = (2, 3, 4, 5, 6)


def calibrate_magcache(pipe, steps: int, kw: dict) -> list[float]:
    from diffusers import MagCacheConfig

    pipe.transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), torch.no_grad():
        pipe([f"a handwritten digit {w}" for w in ("three", "eight")], num_inference_steps=steps,
             generator=make_generators(10_000, 2), output_type="latent", **kw)
    pipe.transformer.disable_cache()
    line = next(x for x in buf.getvalue().splitlines() if x.strip().startswith("[") and "MagCache" not in x)
    return ast.literal_eval(line.strip())


def learned_plans(steps: int, names: list[str] | None) -> dict[str, CachePlan]:
    """The HarmoniCa plans to compare: the given files/names, else every shipped plan for MODEL at `steps` steps."""
    if names is None:
        names = [n for n in shipped_plans() if n.startswith(f"{MODEL}-{steps}-")]
    return {n: CachePlan.load(n) for n in names}


def configs(pipe, steps: int, kw: dict, plans: dict[str, CachePlan]) -> list[tuple[str, callable, callable]]:
    """(name, attach, detach) for every row."""
    from diffusers import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    n_units = len(unit_modules(pipe.transformer))
    out = [("uncached", lambda: None, lambda: None)]
    def plan_row(name: str, plan: CachePlan) -> tuple[str, callable, callable]:
        return name, (lambda: apply_cache_plan(pipe, plan)), (lambda: remove_cache_plan(pipe))

    for forecast in (0, 1, 2):
        suffix = ["", " + forecast", " + order-2 forecast"][forecast]
        for k in FORA_INTERVALS:
            out.append(plan_row(f"diffaccel FORA n={k}{suffix}", fora_plan(steps, n_units, k, model=pipe,
                                                                         forecast=forecast)))
        for name, plan in plans.items():
            if forecast == 2 or (forecast and plan.forecast):  # the learned plans: without and with order 1 only
                continue  # a plan that already forecasts has its row above
            out.append(plan_row(f"diffaccel HarmoniCa {Path(name).stem}{suffix}",
                                dataclasses.replace(plan, forecast=forecast or plan.forecast)))

    def diffusers_cache(config):
        return (lambda: pipe.transformer.enable_cache(config)), (lambda: pipe.transformer.disable_cache())

    for t in (0.1, 0.2, 0.4):
        out.append((f"diffusers FirstBlockCache t={t}", *diffusers_cache(FirstBlockCacheConfig(threshold=t))))
    for order, interval in [(o, i) for o in (1, 2) for i in (2, 3, 4)]:
        out.append((f"diffusers TaylorSeer interval={interval}" + (f" order={order}" if order > 1 else ""),
                    *diffusers_cache(TaylorSeerCacheConfig(cache_interval=interval, disable_cache_before_step=1,
                                                           max_order=order, taylor_factors_dtype=torch.float32))))
    ratios = calibrate_magcache(pipe, steps, kw)
    for t in (0.12, 0.24, 0.5):
        out.append((f"diffusers MagCache t={t}",
                    *diffusers_cache(MagCacheConfig(threshold=t, num_inference_steps=steps, mag_ratios=ratios))))
    return out


def gflops_per_image(pipe, steps: int, kw: dict) -> float:
    with flop_counter() as fc, torch.no_grad():
        pipe(["a handwritten digit seven"], num_inference_steps=steps, generator=make_generators(123, 1),
             output_type="latent", **kw)
    return fc.get_total_flops() / 1e9


def run(args: argparse.Namespace) -> None:
    args.results.mkdir(parents=True, exist_ok=True)
    jsonl = args.results / "flux_caches.jsonl"
    pipe = load(MODEL)
    pipe.set_progress_bar_config(disable=True)
    kw = flux_call_kwargs(pipe, 0, None)
    ref = None
    base_flops = None
    run_id = time.strftime("%Y%m%dT%H%M%S")
    for name, attach, detach in configs(pipe, args.steps, kw, learned_plans(args.steps, args.plans)):
        attach()
        try:
            flops = gflops_per_image(pipe, args.steps, kw)
            t0 = time.perf_counter()
            res = evaluate(pipe, list(range(10)), args.num_images, args.seed, name=name, batch_size=args.batch_size,
                           count_flops=False, clip_model=None, keep_images=ref is None,
                           paired_reference=None if ref is None else ref.images,
                           paired_with=None if ref is None else "uncached", num_inference_steps=args.steps, **kw)
        finally:
            detach()
        if ref is None:
            ref, base_flops = res, flops
        p = res.paired.as_dict() if res.paired is not None else {}
        row = {"run": run_id, "model": MODEL, "config": name, "steps": args.steps, "gflops_per_image": flops,
               "compute_fraction": flops / base_flops, "fid": res.fid, "class_accuracy": res.class_accuracy,
               "psnr": p.get("psnr"), "ssim": p.get("ssim"), "seconds_per_image": res.seconds_per_image,
               "num_images": args.num_images, "seed": args.seed, "machine": machine(), "command": args.command}
        with jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"[caches] {name:34s} compute {row['compute_fraction']:.3f} FID {res.fid:.3f} "
              f"acc {res.class_accuracy:.3f} PSNR {row['psnr']} SSIM {row['ssim']} "
              f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)


def report(args: argparse.Namespace) -> str:
    path = args.results / "flux_caches.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    if not rows:
        return "no rows yet\n"
    r0 = rows[-1]
    latest = {r["config"]: r for r in rows if r.get("run") == r0.get("run")}
    front = pareto_marks(list(latest.values()))
    out = [f"### {MODEL}: caches at matched compute ({r0['steps']} FlowMatch-Euler steps, {r0['num_images']} images "
           "per row, paired metrics vs the uncached images of the same seeds)\n",
           f"Command: `{r0['command']}`; machine: {r0['machine']}.\n",
           "| configuration | compute (FLOPs vs uncached) | skipped | FID | accuracy | PSNR (dB) | SSIM | PSNR vs "
           "compute |",
           "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in sorted(latest.values(), key=lambda r: -r["compute_fraction"]):
        psnr = "—" if r["psnr"] is None else f"{r['psnr']:.1f}"
        ssim = "—" if r["ssim"] is None else f"{r['ssim']:.3f}"
        out.append(f"| {r['config']} | {r['compute_fraction']:.3f} | {1 - r['compute_fraction']:.1%} | "
                   f"{r['fid']:.2f} | {r['class_accuracy']:.1%} | {psnr} | {ssim} | {front[r['config']]} |")
    text = "\n".join(out) + "\n"
    (args.results / "flux_caches.md").write_text(text)
    return text


def pareto_marks(rows: list[dict]) -> dict[str, str]:
    """Per row: "front" when no other cached row has at most its compute and at least its PSNR (one strictly),
    else the rows dominating it; diffaccel rows also say whether a peer (diffusers) row dominates them."""
    cached = [r for r in rows if r["psnr"] is not None]

    def dominates(a: dict, b: dict) -> bool:
        return (a["compute_fraction"] <= b["compute_fraction"] and a["psnr"] >= b["psnr"]
                and (a["compute_fraction"] < b["compute_fraction"] or a["psnr"] > b["psnr"]))

    out = {r["config"]: "reference" for r in rows if r["psnr"] is None}
    for r in cached:
        by = [o["config"] for o in cached if o is not r and dominates(o, r)]
        mark = "front" if not by else "dominated by " + ", ".join(by)
        if r["config"].startswith("diffaccel"):
            peers = [b for b in by if b.startswith("diffusers")]
            mark += "; no peer dominates it" if not peers else ""
        out[r["config"]] = mark
    return out


def main(argv: list[str] | None = None) -> int:
    p = common_parser(__doc__)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--plans", nargs="*", default=None,
                   help="learned plan files or shipped names (default: every shipped digits-flux plan at --steps)")
    return run_and_report(p, argv, "flux_caches.py", run, report)


if __name__ == "__main__":
    sys.exit(main())
