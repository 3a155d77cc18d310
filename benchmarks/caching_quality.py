"""Encoder propagation quality on `digits-sd`: FID, CLIP score and class accuracy vs the plain pipeline.

Every row goes through the shared harness `diffaccel.evals.evaluate` (FID/KID on digits-features against the zoo
test split, CLIP score with `digits-clip`, prompted-class accuracy, FLOPs per image) with the same per-image seeds.
Rows per step count N:

* `baseline` — the plain pipeline;
* `ep-paper` / `ep-paper+inj` — the paper's schedule (`sd50` at 50 steps, `sd50-scaled` otherwise), without and
  with prior noise injection (alpha 0.003, tau 0.5 T);
* `ep-drift-up<j>` (+inj) — beyond the paper: propagate the encoder and the first j up blocks, with the fewest key
  steps whose UNet FLOPs ratio reaches --target-ratio, placed by `schedule_from_drift` on encoder-feature drift
  measured on prompts and seeds disjoint from the evaluation's.

    python benchmarks/caching_quality.py --steps 25 50 --num-images 300 --out benchmarks/results/caching_quality.json

Progress on stderr; a JSON summary on stdout (and --out), a markdown table with --md.
"""

from __future__ import annotations

import argparse
import inspect
import json
from pathlib import Path

import torch
from diffaccel import zoo
from diffaccel.caching import (
    CachedPipeline,
    EncoderPropagationConfig,
    apply_encoder_propagation,
    encoder_propagation_counters,
    get_schedule,
    measure_encoder_drift,
    remove_encoder_propagation,
    schedule_from_drift,
)
from diffaccel.core import make_generators
from diffaccel.core.flops import flop_counter
from diffaccel.core.timing import log


@torch.no_grad()
def unet_call_flops(pipe, propagate_up_blocks: int) -> tuple[int, int]:
    """FLOPs of one full CFG-pair UNet call and of one non-key call with this propagation depth."""
    unet = pipe.unet
    side = unet.config.sample_size
    conditional = getattr(unet.config, "cross_attention_dim", None) is not None
    rows = 2 if conditional else 1
    x = torch.randn(rows, unet.config.in_channels, side, side)
    extra = (torch.randn(rows, pipe.tokenizer.model_max_length, unet.config.cross_attention_dim),) if conditional \
        else ()
    with flop_counter() as full:
        unet(x, torch.tensor(981), *extra)
    apply_encoder_propagation(unet, EncoderPropagationConfig(key_steps=[0], noise_injection=None,
                                                             propagate_up_blocks=propagate_up_blocks))
    try:
        unet(x, torch.tensor(981), *extra)
        with flop_counter() as part:
            unet(x, torch.tensor(961), *extra)
    finally:
        remove_encoder_propagation(unet)
    return full.get_total_flops(), part.get_total_flops()


def most_keys_reaching(steps: int, f_full: int, f_part: int, target: float) -> int | None:
    """The largest key-step count whose FLOPs ratio still reaches `target` (None if even one key step misses)."""
    best = None
    for k in range(1, steps + 1):
        if steps * f_full / (k * f_full + (steps - k) * f_part) >= target - 1e-9:
            best = k
        else:
            return best
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="digits-sd")
    ap.add_argument("--steps", type=int, nargs="+", default=[25, 50])
    ap.add_argument("--num-images", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--target-ratio", type=float, default=1.5, help="UNet FLOPs ratio the drift schedule must reach")
    ap.add_argument("--up-blocks", type=int, default=2, help="propagation depth j of the drift rows")
    ap.add_argument("--drift-images", type=int, default=20)
    ap.add_argument("--rows", nargs="+", default=["baseline", "ep-paper", "ep-paper+inj", "ep-drift", "ep-drift+inj"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--md", type=Path, default=None, help="also write a markdown table here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from diffaccel.evals import evaluate

    pipe = zoo.load(args.model)
    pipe.set_progress_bar_config(disable=True)
    conditional = "prompt" in inspect.signature(pipe.__call__).parameters
    injectable = "callback_on_step_end" in inspect.signature(pipe.__call__).parameters
    if not injectable:
        args.rows = [r for r in args.rows if not r.endswith("+inj")]
        log(f"{type(pipe).__name__} has no callback_on_step_end: rows with noise injection skipped")
    guidance = {"guidance_scale": args.guidance} if conditional else {}
    flops = {j: unet_call_flops(pipe, j) for j in sorted({0, args.up_blocks})}
    for j, (f, p) in flops.items():
        log(f"UNet FLOPs per CFG call: full {f / 1e6:.1f} M, non-key with {j} up blocks propagated {p / 1e6:.1f} M "
            f"(reused share {1 - p / f:.1%})")
    drift_prompts = [zoo.caption(d % 10) for d in range(args.drift_images)]
    rows = []
    for steps in args.steps:
        paper = "sd50" if steps == 50 else "sd50-scaled"
        configs: dict[str, EncoderPropagationConfig | None] = {}
        drift_keys = None
        if any(r.startswith("ep-drift") for r in args.rows):
            j = args.up_blocks
            k = most_keys_reaching(steps, *flops[j], args.target_ratio)
            if k is None:
                raise SystemExit(f"no schedule reaches a FLOPs ratio of {args.target_ratio} with {j} up blocks")
            cond = {"prompt": drift_prompts, "output_type": "latent"} if conditional else \
                {"batch_size": len(drift_prompts), "output_type": "np"}
            drift = measure_encoder_drift(pipe, propagate_up_blocks=j, num_inference_steps=steps, **cond, **guidance,
                                          generator=make_generators(10_000, len(drift_prompts)))
            drift_keys = schedule_from_drift(drift, k).key_steps(steps)
            log(f"{steps} steps: drift schedule with {k} key steps (j={j}): {drift_keys}")
        for name in args.rows:
            if name == "baseline":
                configs[name] = None
            elif name.startswith("ep-paper"):
                configs[name] = EncoderPropagationConfig(key_steps=paper, noise_injection=(0.003, 0.5)
                                                         if name.endswith("+inj") else None)
            elif name.startswith("ep-drift"):
                configs[name] = EncoderPropagationConfig(key_steps=drift_keys, propagate_up_blocks=args.up_blocks,
                                                         noise_injection=(0.003, 0.5) if name.endswith("+inj")
                                                         else None)
            else:
                raise SystemExit(f"unknown row {name!r}")
        for name, cfg in configs.items():
            log(f"{steps} steps, {name}: generating {args.num_images} images")
            target = pipe
            if cfg is not None:
                apply_encoder_propagation(pipe, cfg)
                target = CachedPipeline(pipe)
            try:
                res = evaluate(target, None, args.num_images, args.seed, name=f"{name}@{steps}",
                               batch_size=args.batch_size, num_inference_steps=steps, **guidance)
                counters = encoder_propagation_counters(pipe) if cfg is not None else None
            finally:
                if cfg is not None:
                    remove_encoder_propagation(pipe)
            j = cfg.propagate_up_blocks if cfg is not None else 0
            keys = get_schedule(cfg.key_steps).key_steps(steps) if cfg is not None else list(range(steps))
            f_full, f_part = flops[j] if cfg is not None else flops[0]
            unet_ratio = steps * f_full / (len(keys) * f_full + (steps - len(keys)) * f_part)
            row = {"steps": steps, "name": name, "key_steps": keys, "propagate_up_blocks": j,
                   "noise_injection": None if cfg is None or cfg.noise_injection is None
                   else [cfg.noise_injection.alpha, cfg.noise_injection.tau_frac],
                   "unet_flops_ratio": unet_ratio, "fid": res.fid, "kid": res.kid_mean,
                   "clip_score": res.clip_score, "class_accuracy": res.class_accuracy,
                   "flops_per_image": res.flops_per_image, "seconds_per_image": res.seconds_per_image,
                   "encoder_passes_last_call": None if counters is None else counters.encoder_passes}
            rows.append(row)
            write_partial(args, rows)
            log(f"  FID {res.fid:.3f}  CLIP {res.clip_score}  acc {res.class_accuracy}  "
                f"UNet FLOPs ratio {unet_ratio:.3f}  s/img {res.seconds_per_image:.4f}")
    base = {r["steps"]: r for r in rows if r["name"] == "baseline"}
    for r in rows:
        b = base.get(r["steps"])
        if b is not None:
            r["fid_change"] = r["fid"] / b["fid"] - 1
            r["clip_change"] = r["clip_score"] / b["clip_score"] - 1 if b["clip_score"] else None
            r["flops_ratio_end_to_end"] = b["flops_per_image"] / r["flops_per_image"] if r["flops_per_image"] else None
    summary = {"model": args.model, "device": "cpu", "threads": args.threads, "num_images": args.num_images,
               "seed": args.seed, "guidance_scale": args.guidance if conditional else None,
               "scheduler": type(pipe.scheduler).__name__,
               "unet_flops_per_cfg_call": {str(j): list(v) for j, v in flops.items()}, "rows": rows}
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    if args.md is not None:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(markdown(summary))
    return 0


def write_partial(args: argparse.Namespace, rows: list[dict]) -> None:
    """Keep the markdown table current after every row (a long run on a shared machine may be cut short)."""
    if args.md is not None:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        base = {r["steps"]: r for r in rows if r["name"] == "baseline"}
        shown = []
        for r in rows:
            b = base.get(r["steps"])
            r = dict(r)
            if b is not None:
                r["fid_change"] = r["fid"] / b["fid"] - 1
                r["clip_change"] = r["clip_score"] / b["clip_score"] - 1 if b["clip_score"] else None
            shown.append(r)
        args.md.write_text(markdown({"rows": shown}))


def markdown(summary: dict) -> str:
    lines = ["| steps | row | key steps | up blocks | injection | UNet FLOPs ratio | FID | ΔFID | CLIP | ΔCLIP | "
             "accuracy |", "|---|---|---|---|---|---|---|---|---|---|---|"]

    def fmt(v: float | None, spec: str) -> str:
        return "—" if v is None else format(v, spec)

    for r in summary["rows"]:
        inj = "—" if r["noise_injection"] is None else f"α={r['noise_injection'][0]}, τ={r['noise_injection'][1]}T"
        lines.append(
            f"| {r['steps']} | {r['name']} | {len(r['key_steps'])} | {r['propagate_up_blocks']} | {inj} | "
            f"{r['unet_flops_ratio']:.3f}× | {r['fid']:.3f} | {fmt(r.get('fid_change'), '+.1%')} | "
            f"{fmt(r['clip_score'], '.4f')} | {fmt(r.get('clip_change'), '+.2%')} | "
            f"{fmt(r['class_accuracy'], '.3f')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
