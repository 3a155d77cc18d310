"""One-step distillation benchmark (issue #8): teacher vs 2-RF vs one-step student on digits-sd, same seeds.

    python benchmarks/distill.py --two-rf outputs/distill/2rf --student outputs/distill/onestep -n 300 --threads 1
    python benchmarks/distill.py --student zoo:digits-sd-onestep --two-rf zoo:digits-sd-2rf     # shipped weights

Rows: teacher (digits-sd, DDIM, CFG 7.5) at 25 and 1 steps; 2-RF (Euler, no CFG) at 25/4/1 steps; the one-step
student; optionally a guidance-distilled pipeline (`--guidance`). Each row goes through the evals harness
(`diffaccel.evals.evaluate`: FID/KID domain digits-features vs the test split, class accuracy, CLIP score,
s/image, true NFE). The paired columns compare each row's image with the 25-step teacher's image *from the same
noise and prompt* (a paired metric, with the digits-features embedding in place of LPIPS): mean squared
pixel difference in [0, 1] and mean squared feature distance. "s/img" is the harness's median over batches of
`--batch-size` images; "batch-1 s" the median latency of one-image calls (`diffaccel.core.measure`). Results:
`benchmarks/results/distill.{json,md}`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    return (f"{os.cpu_count()}-core {platform.machine()} CPU, torch {torch.__version__}, "
            f"threads {torch.get_num_threads()}")


def load_rf(spec: str):
    from diffaccel.distill import RectifiedFlowPipeline
    from diffaccel.zoo import load

    if spec.startswith("zoo:"):
        return load(spec[4:])
    return RectifiedFlowPipeline.from_pretrained(spec, local_files_only=True)


def teacher(steps: int):
    from diffaccel.zoo import load
    from diffusers import DDIMScheduler

    pipe = load("digits-sd")
    # one step on the shipped "leading" grid would start at t = 1 (no denoising at all); "trailing" starts at 999
    spacing = {"timestep_spacing": "trailing"} if steps == 1 else {}
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, **spacing)
    return pipe


def parser(default_out: str, description: str) -> argparse.ArgumentParser:
    """The options every distillation benchmark takes (`distill_flux.py` adds none of its own but the out path)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--two-rf", default=None, help="2-RF pipeline folder or zoo:NAME")
    p.add_argument("--student", default=None, help="one-step student folder or zoo:NAME")
    p.add_argument("-n", "--num-images", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--latency-repeats", type=int, default=7,
                   help="batch-1 latency: median of this many timed calls per row (0: skip)")
    p.add_argument("--out", default=str(RESULTS / default_out), help="results prefix (.json and .md are added)")
    return p


def measure_row(pipe, name: str, kw: dict, args: argparse.Namespace, ext, ref_images: torch.Tensor | None,
                t0: float, **evaluate_kwargs) -> tuple[dict, torch.Tensor]:
    """One row: the evals harness on `pipe` (digits 0-9 cycled), the median batch-1 latency, and the paired pixel /
    digits-feature distances to `ref_images` (this row's own images when None, i.e. the reference row).
    Returns the row and the reference images for the next rows."""
    from diffaccel.core import make_generators, measure
    from diffaccel.evals import evaluate
    from diffaccel.zoo import caption

    pipe.set_progress_bar_config(disable=True)
    r = evaluate(pipe, list(range(10)), num_images=args.num_images, seed=args.seed, name=name,
                 batch_size=args.batch_size, keep_images=True, **evaluate_kwargs, **kw)
    images = r.images
    ref = images if ref_images is None else ref_images
    a, b = images.float() / 255, ref.float() / 255
    with torch.no_grad():
        fa, fb = ext(images), ext(ref)
    row = r.as_dict()
    row.pop("images", None)
    latency = None
    if args.latency_repeats:
        latency = measure(lambda: pipe([caption(7)], generator=make_generators(0, 1), output_type="np", **kw),
                          warmup=1, repeats=args.latency_repeats).median
    row.update(latency_batch1_s=latency,
               paired_pixel_mse=float(((a - b) ** 2).mean()) if a.shape == b.shape else float("nan"),
               paired_feature_d2=float(((fa - fb) ** 2).sum(1).mean()), wall_s=time.time() - t0)
    print(f"{name}: FID {row['fid']:.3f}, acc {row['class_accuracy']:.3f}, {row['seconds_per_image']:.4f} s/img, "
          f"batch-1 {latency} s, NFE {row['nfe_per_image']:.0f}, paired pixel MSE {row['paired_pixel_mse']:.4f}",
          file=sys.stderr, flush=True)
    return row, ref


def save_rows(script: str, argv: list[str] | None, args: argparse.Namespace, results: list[dict]) -> tuple[dict, Path]:
    """Write `{meta, rows}` to `<--out>.json`; returns the metadata and the results prefix (for the `.md`)."""
    meta = {"machine": machine(), "command": f"python benchmarks/{script} " + " ".join(argv or sys.argv[1:]),
            "num_images": args.num_images, "seed": args.seed, "batch_size": args.batch_size}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": results}, indent=1) + "\n")
    return meta, out


def main(argv: list[str] | None = None) -> int:
    p = parser("distill", __doc__)
    p.add_argument("--guidance", default=None, help="guidance-distilled pipeline folder (StableDiffusion, w baked in)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffaccel.evals import load_extractor

    rows = [("digits-sd DDIM-25 cfg7.5 (teacher)", lambda: teacher(25), {"num_inference_steps": 25,
                                                                          "guidance_scale": 7.5}),
            ("digits-sd DDIM-1 (trailing) cfg7.5", lambda: teacher(1), {"num_inference_steps": 1,
                                                                         "guidance_scale": 7.5})]
    if args.two_rf:
        for k in (25, 4, 1):
            rows.append((f"2-RF Euler-{k}", lambda: load_rf(args.two_rf), {"num_inference_steps": k}))
    if args.student:
        rows.append(("one-step student", lambda: load_rf(args.student), {"num_inference_steps": 1}))
    if args.guidance:
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        def guided():
            pipe = StableDiffusionPipeline.from_pretrained(args.guidance, local_files_only=True)
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
            return pipe

        rows.append(("guidance-distilled DDIM-25 (w baked in)", guided, {"num_inference_steps": 25,
                                                                         "guidance_scale": 1.0}))
    ext = load_extractor("digits")
    results, ref_images = [], None
    for name, factory, kw in rows:
        t0 = time.time()
        row, ref_images = measure_row(factory(), name, kw, args, ext, ref_images, t0)
        results.append(row)
    meta, out = save_rows("distill.py", argv, args, results)
    t_ref = results[0]["seconds_per_image"]
    lat_ref = results[0]["latency_batch1_s"]
    lines = [f"# One-step distillation on digits-sd\n\n`{meta['command']}` on {meta['machine']}; n = "
             f"{args.num_images} images per row (seeds {args.seed}..{args.seed + args.num_images - 1}, digits 0-9 "
             f"cycled), batch {args.batch_size}. FID/KID: domain digits-features (d=128) vs the zoo test split "
             "(n_b = 360). Paired columns: against the 25-step teacher's image from the same noise and prompt.\n",
             "| configuration | NFE | s/img | speed-up | batch-1 s | speed-up | FID | KIDx1e3 | acc | CLIP | "
             "paired pixel MSE | paired feature d² |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lat = r["latency_batch1_s"]
        lat_cols = f"{lat:.4f} | {lat_ref / lat:.1f}x" if lat and lat_ref else "- | -"
        lines.append(f"| {r['name']} | {r['nfe_per_image']:.0f} | {r['seconds_per_image']:.4f} | "
                     f"{t_ref / r['seconds_per_image']:.1f}x | {lat_cols} | {r['fid']:.3f} | "
                     f"{1e3 * r['kid_mean']:.2f} | "
                     f"{100 * r['class_accuracy']:.1f}% | {r['clip_score']:.2f} | {r['paired_pixel_mse']:.4f} | "
                     f"{r['paired_feature_d2']:.3f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
