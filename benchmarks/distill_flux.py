"""One-step distillation from the flow teacher (issue #17): digits-flux vs its 2-RF vs the one-step student, same seeds.

    python benchmarks/distill_flux.py --two-rf outputs/distill/flux-2rf --student outputs/distill/flux-onestep \
        -n 300 --threads 1
    python benchmarks/distill_flux.py --student zoo:digits-flux-onestep -n 300 --threads 1     # shipped weights

Rows: the teacher (digits-flux, FlowMatchEuler at its default 28 steps) with true CFG 4 against the empty prompt
(the guidance the pairs were made with: 2 transformer calls per step) and without guidance (FluxPipeline's default
call); the teacher at 1 step; optionally the 2-RF at 28/4/1 steps; the one-step student (1 call, no guidance).
Every row goes through the evals harness as `benchmarks/distill.py` does (FID/KID domain digits-features vs the test
split, prompted-class accuracy, CLIP score, s/image, true NFE). Speed-ups are against both teacher rows, measured in
this one run; "batch-1 s" is the median latency of one-image calls (`diffaccel.core.measure`). The paired columns
compare each row's image with the guided teacher's image from the same noise and prompt. Results:
`benchmarks/results/distill_flux.{json,md}`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from distill import measure_row, parser, save_rows

TEACHER_STEPS, TEACHER_CFG = 28, 4.0


def load_flux(spec: str):
    from diffaccel.distill.teachers import load_pipeline

    return load_pipeline(spec[4:] if spec.startswith("zoo:") else spec)


def rows(args: argparse.Namespace) -> list[tuple[str, str, dict]]:
    cfg = {"true_cfg_scale": TEACHER_CFG, "negative_prompt": ""}
    out = [(f"digits-flux {TEACHER_STEPS} steps, true CFG {TEACHER_CFG:g} (teacher of the pairs)", "digits-flux",
            {"num_inference_steps": TEACHER_STEPS, **cfg}),
           (f"digits-flux {TEACHER_STEPS} steps, no CFG (pipeline default)", "digits-flux",
            {"num_inference_steps": TEACHER_STEPS}),
           (f"digits-flux 1 step, true CFG {TEACHER_CFG:g}", "digits-flux", {"num_inference_steps": 1, **cfg})]
    if args.two_rf:
        out += [(f"2-RF {k} steps", args.two_rf, {"num_inference_steps": k}) for k in (TEACHER_STEPS, 4, 1)]
    if args.student:
        out.append(("one-step student", args.student, {"num_inference_steps": 1}))
    return out


def main(argv: list[str] | None = None) -> int:
    p = parser("distill_flux", __doc__)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffaccel.core.families.flux import text_length_kwargs
    from diffaccel.evals import load_extractor

    ext = load_extractor("digits")
    results, ref_images = [], None
    for name, spec, kw in rows(args):
        t0 = time.time()
        pipe = load_flux(spec)
        kw = {**kw, **text_length_kwargs(pipe.tokenizer_2)}
        row, ref_images = measure_row(pipe, name, kw, args, ext, ref_images, t0, count_flops=False)
        row.update(model=spec, call=kw)
        results.append(row)
    meta, out = save_rows("distill_flux.py", argv, args, results)
    out.with_suffix(".md").write_text(report(meta, results))
    print(report(meta, results))
    return 0


def report(meta: dict, results: list[dict]) -> str:
    guided, default = results[0], results[1]
    lines = [f"# One-step distillation from digits-flux\n\n`{meta['command']}` on {meta['machine']}; n = "
             f"{meta['num_images']} images per row (seeds {meta['seed']}..{meta['seed'] + meta['num_images'] - 1}, "
             f"digits 0-9 cycled), batch {meta['batch_size']}. FID/KID: domain digits-features (d=128) vs the zoo "
             "test split (n_b = 360). Speed-ups: against the teacher with true CFG (56 calls per image) / at its "
             "default call (28 calls), both measured in this run. Paired columns: against the guided teacher's "
             "image from the same noise and prompt.\n",
             "| configuration | NFE | s/img | speed-up | batch-1 s | speed-up | FID | KIDx1e3 | acc | CLIP | "
             "paired pixel MSE | paired feature d² |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        t, lat = r["seconds_per_image"], r["latency_batch1_s"]
        speed = f"{guided['seconds_per_image'] / t:.1f}x / {default['seconds_per_image'] / t:.1f}x"
        lat_cols = (f"{lat:.4f} | {guided['latency_batch1_s'] / lat:.1f}x / {default['latency_batch1_s'] / lat:.1f}x"
                    if lat else "- | -")
        lines.append(f"| {r['name']} | {r['nfe_per_image']:.0f} | {t:.4f} | {speed} | {lat_cols} | {r['fid']:.3f} | "
                     f"{1e3 * r['kid_mean']:.2f} | {100 * r['class_accuracy']:.1f}% | {r['clip_score']:.2f} | "
                     f"{r['paired_pixel_mse']:.4f} | {r['paired_feature_d2']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
