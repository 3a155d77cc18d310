"""UNet caches side by side on `digits-sd` (50 DDIM steps, CFG 7.5): DeepCache, encoder propagation, branch reuse.

Every row goes through the shared harness (`diffaccel.evals.evaluate`) with the same prompts and per-image seeds:
FLOPs per image over the whole pipeline call (`core.flops.flop_counter`), FID (domain: digits-features) and
prompted-class accuracy, and paired PSNR / SSIM / feature distance against the plain pipeline's images of the same
seeds. Rows:

* `plain` — no cache;
* `deepcache-i{2,3,5}-b0` — the `deepcache` package itself (`pip install --no-deps deepcache`), interval N,
  branch 0 (skipped with a note when the package is missing);
* `ep-sd50` / `ep-uniform-2` — encoder propagation (sequential decoding, no noise injection), paper schedule and
  every other step;
* `branch-reuse-<ratio>x` — diffaccel's branch reuse plans calibrated (`caching.calibrate.calibrate_unet`) on
  prompts and seeds disjoint from the evaluation's, at the FLOPs ratios DeepCache reaches (and `--targets`).

    python benchmarks/branch_reuse.py --num-images 50 --out benchmarks/results/branch_reuse.json \
        --md benchmarks/results/branch_reuse.md --save-plans caching/plans/branch_reuse

Progress on stderr; JSON on stdout (and --out).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from diffaccel.caching import (
    EncoderPropagationConfig,
    apply_branch_reuse,
    apply_encoder_propagation,
    remove_branch_reuse,
    remove_encoder_propagation,
)
from diffaccel.caching.calibrate import UNetCalibrator
from diffaccel.core.timing import log
from diffaccel.evals import evaluate
from diffaccel.zoo import caption, load
from diffusers import DDIMScheduler


def sd_pipe():
    pipe = load("digits-sd")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def calibration_parser(doc: str, *, num_images: int, steps: int, guidance: float,
                       calibration_images: int) -> argparse.ArgumentParser:
    """The options the calibrated-cache benchmarks share (evaluation and calibration seeds, outputs)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--num-images", type=int, default=num_images)
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--guidance", type=float, default=guidance)
    ap.add_argument("--seed", type=int, default=0, help="evaluation seeds seed .. seed + n - 1")
    ap.add_argument("--calibration-images", type=int, default=calibration_images)
    ap.add_argument("--calibration-seed", type=int, default=10_000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--save-plans", type=Path, default=None, help="write the calibrated plans into this folder")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--md", type=Path, default=None)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = calibration_parser(__doc__, num_images=50, steps=50, guidance=7.5, calibration_images=8)
    ap.add_argument("--intervals", type=int, nargs="+", default=[2, 3, 5], help="DeepCache intervals (branch 0)")
    ap.add_argument("--targets", type=float, nargs="*", default=[],
                    help="extra branch reuse FLOPs-ratio targets (DeepCache's measured ratios are always added)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = sd_pipe()
    labels = list(range(10))
    common = {"num_inference_steps": args.steps, "guidance_scale": args.guidance}
    ev = {"count_flops": True, "keep_images": False, "clip_model": None, "batch_size": min(args.num_images, 25)}
    rows: list[dict] = []
    notes: list[str] = []

    def record(name: str, res, extra: dict | None = None) -> None:
        row = {"name": name, "flops_per_image": res.flops_per_image, "fid": res.fid,
               "class_accuracy": res.class_accuracy, "seconds_per_image": res.seconds_per_image,
               "paired": res.paired.as_dict() if res.paired is not None else None, **(extra or {})}
        base = rows[0] if rows else None
        if base is not None and base["flops_per_image"] and res.flops_per_image:
            row["flops_ratio"] = base["flops_per_image"] / res.flops_per_image
            row["wall_speedup"] = base["seconds_per_image"] / res.seconds_per_image  # idle machine only
        rows.append(row)
        p = row["paired"] or {}
        log(f"{name}: FLOPs ratio {row.get('flops_ratio', 1.0):.3f}, PSNR {p.get('psnr')}, SSIM {p.get('ssim')}, "
            f"FID {res.fid:.3f}, acc {res.class_accuracy}")

    log("plain")
    plain = evaluate(pipe, labels, args.num_images, args.seed, name="plain", **{**ev, "keep_images": True}, **common)
    record("plain", plain)
    ref = plain.images

    def run(name: str, extra: dict | None = None) -> None:
        res = evaluate(pipe, labels, args.num_images, args.seed, name=name, paired_reference=ref,
                       paired_with="plain", **ev, **common)
        record(name, res, extra)

    deepcache_ratios = []
    try:
        from DeepCache import DeepCacheSDHelper
    except ImportError:
        DeepCacheSDHelper = None
        notes.append("deepcache not installed (pip install --no-deps deepcache): DeepCache rows skipped")
    if DeepCacheSDHelper is not None:
        for interval in args.intervals:
            helper = DeepCacheSDHelper(pipe=pipe)
            helper.set_params(cache_interval=interval, cache_branch_id=0)
            helper.enable()
            try:
                run(f"deepcache-i{interval}-b0", {"method": "DeepCache (pip deepcache 0.1.1)"})
            finally:
                helper.disable()
            deepcache_ratios.append(rows[-1]["flops_ratio"])
    for schedule in ("sd50", "uniform-2"):
        apply_encoder_propagation(pipe, EncoderPropagationConfig(key_steps=schedule, noise_injection=None))
        try:
            run(f"ep-{schedule}", {"method": "encoder propagation, sequential, no noise injection"})
        finally:
            remove_encoder_propagation(pipe)

    prompts = [caption(d) for d in range(10)]
    targets = sorted({round(r, 3) for r in deepcache_ratios} | set(args.targets))
    t0 = time.perf_counter()
    calibrator = UNetCalibrator(pipe, prompts, num_inference_steps=args.steps, guidance_scale=args.guidance,
                                num_images=args.calibration_images, seed=args.calibration_seed, progress=True)
    measure_s = time.perf_counter() - t0
    for target in targets:
        log(f"calibrating branch reuse for FLOPs ratio {target:.3f}")
        t0 = time.perf_counter()
        plan, rep = calibrator.check(target)
        cal_s = measure_s + time.perf_counter() - t0
        name = f"branch-reuse-{target:.2f}x"
        if args.save_plans is not None:
            plan.metadata.update(model="digits-sd", command=summary_command(argv))
            plan.save(args.save_plans / f"digits-sd-{args.steps}-branch-reuse-{target:.2f}x.safetensors")
        apply_branch_reuse(pipe, plan)
        try:
            run(name, {"method": "diffaccel branch reuse, calibrated", "calibration": rep.as_dict(),
                       "calibration_seconds": cal_s})
        finally:
            remove_branch_reuse(pipe)

    summary = {"model": "digits-sd", "steps": args.steps, "guidance_scale": args.guidance,
               "num_images": args.num_images, "seed": args.seed, "calibration_images": args.calibration_images,
               "calibration_seed": args.calibration_seed, "threads": args.threads, "machine": machine(),
               "command": summary_command(argv),
               "rows": rows, "notes": notes}
    emit_summary(summary, args.out, args.md, markdown)
    return 0


def emit_summary(summary: dict, out: Path | None, md: Path | None, to_markdown) -> None:
    """Print the summary as JSON (non-finite floats as null) and write it to `out` and, rendered, to `md`."""
    text = json.dumps(summary, indent=1, default=lambda o: None if isinstance(o, float) and not math.isfinite(o)
                      else str(o))
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    if md:
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(to_markdown(summary))


def summary_command(argv: list[str] | None, script: str = "branch_reuse.py") -> str:
    return f"python benchmarks/{script} " + " ".join(argv if argv is not None else sys.argv[1:])


def machine() -> str:
    import os
    import platform

    return f"{os.cpu_count()}-core {platform.machine()} CPU, torch {torch.__version__}"


def markdown(summary: dict) -> str:
    lines = [intro(summary, "branch reuse calibrated on"), "",
             "| method | FLOPs ratio | PSNR dB | SSIM | feature dist | FID | class acc |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in summary["rows"]:
        lines.append(f"| {r['name']} | {cell(r.get('flops_ratio', 1.0), '.3f')} | {quality_cells(r)} |")
    lines += [f"- {n}" for n in summary["notes"]]
    return "\n".join(lines) + "\n"


def intro(summary: dict, calibrated: str) -> str:
    """The report's first line: command, machine, model, steps, CFG, seeds and calibration images."""
    return (f"`{summary['command']}` — {summary['machine']}, {summary['threads']} thread(s); {summary['model']}, "
            f"{summary['steps']} DDIM steps, CFG {summary['guidance_scale']}, {summary['num_images']} images "
            f"(seeds {summary['seed']}..), paired metrics against the uncached images of the same seeds; {calibrated} "
            f"{summary['calibration_images']} other images (seeds {summary['calibration_seed']}..).")


def cell(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def quality_cells(r: dict) -> str:
    """A row's `PSNR dB | SSIM | feature dist | FID | class acc` table cells."""
    p = r.get("paired") or {}
    return (f"{cell(p.get('psnr'), '.2f')} | {cell(p.get('ssim'), '.4f')} | {cell(p.get('feature_dist'), '.4f')} | "
            f"{cell(r['fid'], '.3f')} | {cell(r['class_accuracy'], '.3f')}")


if __name__ == "__main__":
    raise SystemExit(main())
