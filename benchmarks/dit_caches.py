"""DiT caches side by side on `digits-dit` (20 DDIM steps, CFG 4): FORA, HarmoniCa, calibrated plans, diffusers.

Every row goes through the shared harness (`diffaccel.evals.evaluate`) on the same labels and per-image seeds: FID
(digits-features) and class accuracy, paired PSNR / SSIM / feature distance against the uncached images of the
same seeds. Compute is what the transformer blocks actually ran over the whole evaluation: a counter on each
cache unit's first sub-module (`attn1.to_q`, `ff.net.0`: it runs only when the unit is computed, whichever cache
skipped it) gives the rows each unit computed, and the units' FLOPs (`caching.harmonica.unit_flops`) turn that
into the denoiser FLOPs ratio against the uncached run (adaptive caches skip differently per image, so one image's
FLOPs would not do). Rows:

* `plain`; `fora-<n>` (Selvaraju et al. 2024) — every unit every n-th step;
* `harmonica-b1/b2` — the shipped learned plans (Huang et al., ICML 2025);
* `calibrated-<r>x` — diffaccel's calibrated plans (`caching.calibrate.DiTCalibrator`: measured reuse errors of
  per-step row kinds, including depth splits, + dynamic programming) at FORA's denoiser FLOPs ratios, calibrated on
  labels and seeds disjoint from the evaluation's;
* diffusers' FirstBlockCache, TaylorSeer (on the same attn1/ff units) and MagCache (ratios calibrated on one
  generation of other seeds), made usable on `DiTPipeline` by `caching.diffusers_caches`.

    python benchmarks/dit_caches.py --num-images 200 --out benchmarks/results/dit_caches.json \\
        --md benchmarks/results/dit_caches.md --save-plans caching/plans

Progress on stderr; JSON on stdout (and --out).
"""

from __future__ import annotations

import time

import branch_reuse
import torch
from branch_reuse import cell, emit_summary, machine, quality_cells
from diffaccel.caching import CachePlan, apply_cache_plan, fora_plan, remove_cache_plan
from diffaccel.caching.calibrate import DiTCalibrator, rows_ratio
from diffaccel.caching.diffusers_caches import apply_diffusers_cache, calibrate_mag_ratios, remove_diffusers_cache
from diffaccel.caching.harmonica import example_inputs, unit_flops, unit_modules
from diffaccel.caching.harmonica.plan import _layout_of
from diffaccel.core import make_generators
from diffaccel.core.timing import log
from diffaccel.evals import evaluate
from diffaccel.zoo import load
from diffusers import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

UNIT_PATTERNS = [r"transformer_blocks\.\d+\.attn1", r"transformer_blocks\.\d+\.ff"]


def forecast_tag(order: int) -> str:
    """Row and plan name part of a forecast order: "forecast" (order 1, the names shipped first), "forecast2"."""
    return "forecast" if order == 1 else f"forecast{order}"


class UnitRows:
    """Rows (batch entries) each cache unit computed: a pre-hook on the unit's first sub-module."""

    def __init__(self, transformer) -> None:
        self.rows = [0] * len(unit_modules(transformer))
        self.handles = []
        for u, (name, module) in enumerate(unit_modules(transformer)):
            first = module.to_q if name.endswith(".attn1") else module.net[0]
            self.handles.append(first.register_forward_pre_hook(self._count(u)))

    def _count(self, u: int):
        def hook(_module, args):
            self.rows[u] += int(args[0].shape[0])
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def main(argv: list[str] | None = None) -> int:
    ap = branch_reuse.calibration_parser(__doc__, num_images=200, steps=20, guidance=4.0, calibration_images=16)
    ap.add_argument("--fora", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--search", nargs="*", default=["dp", "greedy"], choices=["dp", "greedy", "local"],
                    help="how calibrated plans are chosen (caching.calibrate: error model + DP, greedy sampling, or "
                         "local: the best of FORA-like spacings, refined by moving full steps)")
    ap.add_argument("--calibrate-forecast", type=int, nargs="*", default=[0, 1],
                    help="calibrate plans without (0) and with the order-1 (1) or order-2 (2) forecast; FORA rows "
                         "with each forecast order given")
    ap.add_argument("--fbc", type=float, nargs="*", default=[0.05, 0.1, 0.2])
    ap.add_argument("--taylorseer", type=int, nargs="*", default=[2, 3])
    ap.add_argument("--taylorseer-orders", type=int, nargs="+", default=[1], choices=[1, 2],
                    help="max_order of diffusers' TaylorSeer rows (order 1 rows keep the plain name)")
    ap.add_argument("--magcache", type=float, nargs="*", default=[0.1, 0.25, 0.5])
    ap.add_argument("--harmonica", nargs="*", default=["digits-dit-20-harmonica-b1", "digits-dit-20-harmonica-b2"])
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = load("digits-dit")
    pipe.set_progress_bar_config(disable=True)
    tr = pipe.transformer
    labels = list(range(10))
    common = {"num_inference_steps": args.steps, "guidance_scale": args.guidance}
    ev = {"count_flops": False, "warmup": False, "keep_images": False, "clip_model": None,
          "batch_size": min(args.num_images, 50)}
    total_1, unit_1 = unit_flops(tr, **example_inputs(tr, batch=1))
    rows: list[dict] = []

    def run(name: str, method: str, attach=None, detach=None, extra: dict | None = None) -> dict:
        counter = UnitRows(tr)
        if attach is not None:
            attach()
        try:
            res = evaluate(pipe, labels, args.num_images, args.seed, name=name, paired_with="plain",
                           paired_reference=None if not rows else rows[0]["_images"],
                           **{**ev, "keep_images": not rows}, **common)
        finally:
            if detach is not None:
                detach()
            counter.close()
        full_rows = max(counter.rows) if not rows else rows[0]["_unit_rows"][0]
        skipped = sum((full_rows - r) * f for r, f in zip(counter.rows, unit_1, strict=True))
        plain = full_rows * total_1
        row = {"name": name, "method": method, "denoiser_flops_ratio": plain / (plain - skipped),
               "units_skipped": 1 - sum(counter.rows) / (full_rows * len(unit_1)), "fid": res.fid,
               "class_accuracy": res.class_accuracy, "seconds_per_image": res.seconds_per_image,
               "paired": res.paired.as_dict() if res.paired is not None else None, "_unit_rows": counter.rows,
               "_images": res.images, **(extra or {})}
        rows.append(row)
        p = row["paired"] or {}
        log(f"{name}: denoiser FLOPs ratio {row['denoiser_flops_ratio']:.3f}, skipped {row['units_skipped']:.1%}, "
            f"PSNR {p.get('psnr')}, SSIM {p.get('ssim')}, FID {res.fid:.3f}, acc {res.class_accuracy}")
        return row

    def plan_row(name: str, method: str, plan: CachePlan, extra: dict | None = None) -> dict:
        return run(name, method, lambda: apply_cache_plan(pipe, plan, force=True), lambda: remove_cache_plan(pipe),
                   extra)

    def diffusers_row(name: str, config) -> dict:
        return run(name, f"diffusers {type(config).__name__}", lambda: apply_diffusers_cache(pipe, config),
                   lambda: remove_diffusers_cache(pipe))

    log("plain")
    run("plain", "no cache")
    n_units = len(unit_1)
    for n in args.fora:
        plan_row(f"fora-{n}", "FORA", fora_plan(args.steps, n_units, n, model=pipe))
        for order in [o for o in args.calibrate_forecast if o] or [1]:
            plan_row(f"fora-{n}-{forecast_tag(order)}", f"FORA schedule, order-{order} forecast (diffaccel)",
                     fora_plan(args.steps, n_units, n, model=pipe, forecast=order))
    for name in args.harmonica:
        plan = CachePlan.load(name)
        plan_row(name.replace("digits-dit-20-", ""), "HarmoniCa (shipped router plan)", plan)

    for forecast in args.calibrate_forecast:
        t0 = time.perf_counter()
        calibrator = DiTCalibrator(pipe, labels, num_inference_steps=args.steps, guidance_scale=args.guidance,
                                   num_images=args.calibration_images, seed=args.calibration_seed, progress=True,
                                   forecast=forecast, measure_errors="dp" in args.search)
        measure_s = time.perf_counter() - t0
        reuse_all = calibrator.names.index("reuse-all")
        for search, n in [(s, n) for s in args.search for n in args.fora]:
            suffix = (f"-{forecast_tag(forecast)}" if forecast else "") + (f"-{search}" if search != "dp" else "")
            fora_rows = [-1 if s % n == 0 else reuse_all for s in range(args.steps)]
            target = rows_ratio(fora_rows, calibrator.costs, calibrator.full_cost)
            t0 = time.perf_counter()
            plan, rep = calibrator.check(target, basis="denoiser", search=search)
            name = f"calibrated-{target:.2f}x{suffix}"
            if args.save_plans is not None:
                plan = CachePlan(plan.mask, *_layout(pipe, plan), metadata={
                    **plan.metadata, "model": "digits-dit", "command": summary_command(argv)}, forecast=forecast)
                plan.save(args.save_plans / f"digits-dit-{args.steps}-{name}.safetensors")
            plan_row(name, f"diffaccel calibrated plan ({search}) at FORA-{n}'s denoiser FLOPs"
                     + (f", order-{forecast} forecast" if forecast else ""),
                     plan, {"calibration": rep.as_dict(),
                            "calibration_seconds": measure_s + time.perf_counter() - t0})

    for t in args.fbc:
        diffusers_row(f"diffusers-fbc-{t:g}", FirstBlockCacheConfig(threshold=t))
    for interval, order in [(i, o) for o in args.taylorseer_orders for i in args.taylorseer]:
        diffusers_row(f"diffusers-taylorseer-{interval}" + (f"-o{order}" if order > 1 else ""), TaylorSeerCacheConfig(
            cache_interval=interval, disable_cache_before_step=1, max_order=order, cache_identifiers=UNIT_PATTERNS))
    if args.magcache:
        ratios = calibrate_mag_ratios(pipe, args.steps, class_labels=labels, guidance_scale=args.guidance,
                                      generator=make_generators(args.calibration_seed, len(labels)))
        for t in args.magcache:
            diffusers_row(f"diffusers-magcache-{t:g}", MagCacheConfig(
                threshold=t, num_inference_steps=args.steps, mag_ratios=ratios))

    for r in rows:
        r.pop("_images")
        r.pop("_unit_rows")
    summary = {"model": "digits-dit", "steps": args.steps, "guidance_scale": args.guidance,
               "num_images": args.num_images, "seed": args.seed, "calibration_images": args.calibration_images,
               "calibration_seed": args.calibration_seed, "threads": args.threads, "machine": machine(),
               "command": summary_command(argv), "rows": rows}
    emit_summary(summary, args.out, args.md, markdown)
    return 0


def _layout(pipe, plan: CachePlan) -> tuple:
    layout = _layout_of(pipe, plan.num_units)
    return layout["model_class"], layout["num_blocks"], layout["units"], layout["scheduler_class"]


def summary_command(argv: list[str] | None) -> str:
    return branch_reuse.summary_command(argv, "dit_caches.py")


def markdown(summary: dict) -> str:
    lines = [branch_reuse.intro(summary, "calibrated plans from"), "",
             "| method | denoiser FLOPs ratio | units skipped | PSNR dB | SSIM | feature dist | FID | class acc |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(summary["rows"], key=lambda r: r["denoiser_flops_ratio"]):
        lines.append(f"| {r['name']} | {cell(r['denoiser_flops_ratio'], '.3f')} | {cell(r['units_skipped'], '.1%')} "
                     f"| {quality_cells(r)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
