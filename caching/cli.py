"""`diffaccel cache train-router | plan-info | calibrate`: HarmoniCa router training, cache-plan inspection, and
calibrating a UNet branch reuse plan for a target speed-up or a fidelity floor.

Exit codes: 0 ok; 2 bad input (unknown model or plan, invalid values, checkpoint/config mismatch); 1 unexpected.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from ..core.errors import InputError
from ..core.options import MAX_STEPS, batch_option, float_in, int_in, seed_option, steps_option, threads_option


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache", help="feature caching: train HarmoniCa routers, inspect cache plans",
                       description="Feature caching: train a HarmoniCa router (SDT + IEPO) and inspect cache plans.")
    csub = p.add_subparsers(dest="cache_cmd", required=True, metavar="{train-router,plan-info,calibrate}")

    q = csub.add_parser("train-router", help="train a HarmoniCa router and write its binary cache plan",
                        description="Train a HarmoniCa router (Step-wise Denoising Training with the Image-Error-Proxy "
                                    "objective) for a class-conditional DiT or a Flux pipeline and write the binary "
                                    "cache plan (safetensors), the router logits and a JSON card with this command.")
    q.add_argument("--model", default="digits-dit", help="zoo DiT or Flux pipeline (default digits-dit)")
    q.add_argument("--steps", type=steps_option, default=20, help="sampling steps the plan is for (default 20)")
    q.add_argument("--trajectories", type=int_in(1, 1_000_000), default=120, help="training trajectories (default 120)")
    q.add_argument("--batch-size", type=batch_option, default=16, help="images per trajectory; CFG doubles the rows")
    q.add_argument("--guidance", type=float_in(0.0, 100.0), default=None,
                   help="guidance scale used in training and inference (default: the pipeline's, 4.0 for DiT)")
    q.add_argument("--prompt", action="append", default=None,
                   help="text pipelines: a training prompt (repeatable; default the ten digit captions)")
    q.add_argument("--beta", type=float_in(0.0), default=1e-4, help="reuse incentive β: larger -> more cache reuse")
    q.add_argument("--lr", type=float_in(0.0, 10.0, lo_open=True), default=0.05,
                   help="AdamW learning rate on the router logits")
    q.add_argument("--threshold", type=float_in(0.0, 1.0, hi_open=True), default=0.1,
                   help="τ: compute where sigmoid(Θ) > τ (0.1)")
    q.add_argument("--lambda-every", type=int_in(1, 1_000_000), default=10,
                   help="trajectories between image-error-proxy refreshes")
    q.add_argument("--lambda-mode", choices=["released", "paper"], default="released",
                   help="IEPO weight: released code's incremental form (default) or the paper's")
    q.add_argument("--no-sdt", action="store_true", help="ablation: teacher trajectory, exact caches (L2C-like)")
    q.add_argument("--no-iepo", action="store_true", help="ablation: λ_s = 1 (per-step output matching only)")
    q.add_argument("--cost-weighted", action="store_true",
                   help="diffaccel extension: weight each unit's β term by its FLOPs share (not in the paper)")
    q.add_argument("--seed", type=seed_option, default=0)
    q.add_argument("--threads", type=threads_option, default=1,
                   help="torch CPU threads (default 1; results depend on it)")
    q.add_argument("--out", type=Path, required=True, help="plan file to write (.safetensors); the router goes to "
                   "<stem>.router.safetensors and the card to <stem>.json beside it")
    q.add_argument("--checkpoint", type=Path, default=None, help="checkpoint file (default <out stem>.ckpt.pt)")
    q.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    q.add_argument("--json", action="store_true", help="print the card as JSON on stdout")
    q.set_defaults(func=cmd_train_router)

    q = csub.add_parser("plan-info", help="describe a cache plan (file or shipped name); no NAME lists shipped plans",
                        description="Describe a cache plan: layout, steps, cache-usage ratio, per-step computed units "
                                    "and training metadata. Without NAME, list the plans shipped with diffaccel.")
    q.add_argument("name", nargs="?", default=None, help="plan file or shipped plan name")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_plan_info)

    q = csub.add_parser("calibrate", help="choose a cache plan for a target speed-up or PSNR floor",
                        description="Calibrate a cache plan (caching.calibrate): a branch reuse plan for a UNet "
                                    "text-to-image pipeline, a cache plan for a DiT. Measures reuse errors on a few "
                                    "prompts (labels) and seeds, chooses the plan by dynamic programming, then "
                                    "samples it and reports the measured whole-call FLOPs ratio and paired PSNR / "
                                    "SSIM against the uncached images.")
    q.add_argument("--model", default="digits-sd", help="zoo pipeline: UNet text-to-image or DiT (default digits-sd)")
    q.add_argument("--prompt", action="append", default=None, help="calibration prompt (repeatable; default: the "
                   "ten digit captions)")
    q.add_argument("--label", action="append", type=int_in(0), default=None, help="class label for DiT pipelines "
                   "(repeatable; default 0-9)")
    goal = q.add_mutually_exclusive_group(required=True)
    goal.add_argument("--speedup", type=float_in(1.0, 1000.0), help="target whole-call FLOPs ratio (e.g. 2.0)")
    goal.add_argument("--min-psnr", type=float_in(0.0, 1000.0),
                      help="fidelity floor in dB: the fastest plan found above it")
    q.add_argument("--steps", type=int_in(2, MAX_STEPS), default=50, help="DDIM steps the plan is for (default 50)")
    q.add_argument("--guidance", type=float_in(0.0, 100.0), default=None,
                   help="CFG scale (default 7.5 for UNets, 4.0 for DiTs)")
    q.add_argument("--images", type=int_in(1, 100_000), default=8, help="calibration images (default 8)")
    q.add_argument("--seed", type=seed_option, default=10_000,
                   help="first calibration seed (keep apart from evaluation)")
    q.add_argument("--threads", type=threads_option, default=None, help="torch CPU threads")
    q.add_argument("--out", type=Path, required=True, help="plan file to write (.safetensors)")
    q.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    q.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    q.set_defaults(func=cmd_calibrate)


def cmd_train_router(args: argparse.Namespace) -> int:
    import torch

    from .. import zoo
    from ..core.families import family_for
    from .harmonica_train import TrainConfig, train_router, write_card

    if args.threads < 1:
        raise InputError(f"--threads must be >= 1, got {args.threads}")
    if args.out.suffix != ".safetensors":
        raise InputError(f"--out must end in .safetensors, got {args.out}")
    torch.set_num_threads(args.threads)
    pipe = zoo.load(args.model)
    guidance = args.guidance if args.guidance is not None else family_for(pipe).default_guidance or 1.0
    config = TrainConfig(num_steps=args.steps, trajectories=args.trajectories, batch_size=args.batch_size,
                         guidance_scale=guidance, beta=args.beta, prompts=args.prompt, lr=args.lr,
                         threshold=args.threshold,
                         lambda_every=args.lambda_every, lambda_mode=args.lambda_mode, sdt=not args.no_sdt,
                         iepo=not args.no_iepo, seed=args.seed, cost_weighted=args.cost_weighted)
    ckpt = args.checkpoint or args.out.with_name(args.out.stem + ".ckpt.pt")
    result = train_router(pipe, config, checkpoint=ckpt, resume=args.resume)
    result.plan.metadata["model"] = args.model
    command = "diffaccel " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["cache"] else \
        f"diffaccel cache train-router --model {args.model} --steps {args.steps} ..."
    result.plan.metadata["command"] = command
    result.plan.save(args.out)
    result.router.save(args.out.with_name(args.out.stem + ".router.safetensors"))
    card_path = args.out.with_name(args.out.stem + ".json")
    write_card(card_path, result, config, command, args.model, {"history": result.history})
    summary = {"plan": str(args.out), "card": str(card_path), "usage_ratio": result.plan.usage_ratio,
               "train_seconds": round(result.seconds, 1), "first_loss": result.history[0]["loss"],
               "last_loss": result.history[-1]["loss"]}
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(f"plan {args.out}: cache-usage ratio {result.plan.usage_ratio:.1%}, "
              f"trained {result.seconds / 60:.1f} min, loss {summary['first_loss']:.3g} -> {summary['last_loss']:.3g}")
    return 0


def cmd_plan_info(args: argparse.Namespace) -> int:
    from .harmonica import CachePlan, shipped_plans

    if args.name is None:
        plans = {name: str(path) for name, path in shipped_plans().items()}
        if args.json:
            print(json.dumps(plans, indent=1))
        else:
            for name in plans:
                plan = CachePlan.load(plans[name])
                print(f"{name:40s} steps {plan.num_steps:3d}  units {plan.num_units:3d}  "
                      f"usage {plan.usage_ratio:6.1%}  {plan.model_class}")
        return 0
    plan = CachePlan.load(args.name)
    info = plan.describe()
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"model class      {info['model_class']} ({info['num_blocks']} blocks, units {info['unit_kind']})")
    print(f"scheduler        {info['scheduler_class']}, {info['steps']} steps")
    print(f"cache usage      {info['usage_ratio']:.1%} ({info['skipped_units']} of {info['steps'] * info['units']} "
          "(step, unit) pairs reused)")
    print("units computed per step: " + " ".join(str(c) for c in info["computed_units_per_step"]))
    for row in plan.mask.tolist():
        print("  " + "".join("#" if c else "." for c in row))
    for k, v in sorted(info["metadata"].items()):
        print(f"{k:16s} {v}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    import torch

    from ..zoo import ENTRIES, caption, load
    from .calibrate import calibrator_for

    if args.model not in ENTRIES:
        raise InputError(f"unknown zoo model {args.model!r}")
    if args.speedup is not None and args.speedup < 1.0:
        raise InputError(f"--speedup must be >= 1, got {args.speedup}")
    if args.images < 1 or args.steps < 2:
        raise InputError("--images must be >= 1 and --steps >= 2")
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = load(args.model)
    from diffusers import DDIMScheduler

    if getattr(pipe, "scheduler", None) is None:
        raise InputError(f"{args.model} is not a sampling pipeline")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    is_dit = getattr(pipe, "transformer", None) is not None
    if is_dit:
        if args.prompt:
            raise InputError(f"{args.model} is class-conditional: give --label, not --prompt")
        conditions = args.label or list(range(10))
    else:
        conditions = args.prompt or [caption(d) for d in range(10)]
    guidance = args.guidance if args.guidance is not None else (4.0 if is_dit else 7.5)
    try:
        cal = calibrator_for(pipe, conditions, num_inference_steps=args.steps, guidance_scale=guidance,
                             num_images=args.images, seed=args.seed, progress=not args.quiet)
        plan, rep = cal.check(args.speedup) if args.speedup is not None else cal.for_psnr(args.min_psnr)
    except (ValueError, TypeError) as exc:
        raise InputError(str(exc)) from exc
    plan.metadata.update(model=args.model, goal=f"speedup {args.speedup}" if args.speedup is not None
                         else f"min-psnr {args.min_psnr}", conditions=" | ".join(map(str, conditions)))
    path = plan.save(args.out)
    report = {**rep.as_dict(), "plan": str(path), "model": args.model}
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        goal = f"target speed-up {args.speedup:.3f}" if args.speedup is not None else f"PSNR floor {args.min_psnr} dB"
        print(f"{args.model}: {goal} -> measured FLOPs ratio {rep.measured_flops_ratio:.3f}, paired PSNR "
              f"{rep.psnr:.2f} dB, SSIM {rep.ssim:.4f} on {rep.calibration_images} calibration images; plan {path}")
    return 0
