"""The `diffaccel` command line. Every subcommand has --help; progress goes to stderr, results to stdout.

Exit codes: 0 ok; 1 unexpected error; 2 bad input (usage, unknown names, invalid values);
3 missing or corrupt weights.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _add_demo(sub: argparse._SubParsersAction) -> None:
    from .core.options import int_in, seed_option

    p = sub.add_parser("demo", help="run the main job on the bundled default model",
                       description="Generate the same digits with digits-sd under two schedulers and with its "
                                   "distilled one-step student (same prompts and seeds); print seconds per image, NFE "
                                   "and class accuracy for each.")
    p.add_argument("--model", default="digits-sd", help="zoo pipeline to run (default digits-sd)")
    p.add_argument("-n", "--num-images", type=int_in(1, 1000), default=10)
    p.add_argument("--seed", type=seed_option, default=0)
    p.add_argument("--out", type=Path, default=Path("outputs/demo"))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_demo)


#: zoo model -> its distilled one-step student, shown as a third row of the demo
ONE_STEP_STUDENTS = {"digits-sd": "digits-sd-onestep"}


def cmd_demo(args) -> int:
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    from .core import count_nfe, make_generators, measure, pipeline_output_to_uint8, tensor_to_pil
    from .zoo import caption, load

    pipe = load(args.model)
    pipe.set_progress_bar_config(disable=True)
    clf = load("digits-features")
    labels = [i % 10 for i in range(args.num_images)]
    prompts = [caption(y) for y in labels]
    configs = [
        ("DDIM, 25 steps", pipe, DDIMScheduler, 25, "ddim"),
        ("DPM-Solver++(2M), 10 steps", pipe, DPMSolverMultistepScheduler, 10, "dpmsolvermultistep"),
    ]
    student = ONE_STEP_STUDENTS.get(args.model)
    if student is not None:  # the distilled student of this model, when the zoo has one (no CFG: one call per step)
        student_pipe = load(student)
        student_pipe.set_progress_bar_config(disable=True)
        configs.append((f"one-step student ({student}), 1 step", student_pipe, None, 1, "onestep"))
    rows = []
    args.out.mkdir(parents=True, exist_ok=True)
    for label, p, cls, steps, tag in configs:
        if cls is not None:
            p.scheduler = cls.from_config(p.scheduler.config)
        print(f"running {args.model} with {label} ...", file=sys.stderr)

        def run(p=p, steps=steps):
            return p(prompts, num_inference_steps=steps, generator=make_generators(args.seed, len(prompts)),
                     output_type="np").images

        with count_nfe(p) as nfe:
            t = measure(run, warmup=1, repeats=1)
        images = pipeline_output_to_uint8(t.result)
        acc = float((clf.predict(images) == __import__("torch").tensor(labels)).float().mean())
        for i, im in enumerate(tensor_to_pil(images, value_range=(0, 255))):
            im.save(args.out / f"{tag}-{i:02d}.png")
        rows.append({"config": label, "seconds_per_image": t.median / len(prompts), "nfe": nfe.calls // 2,
                     "class_accuracy": acc, "num_images": len(prompts)})
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"{'configuration':48s} {'s/image':>9s} {'NFE':>5s} {'accuracy':>9s}")
        for r in rows:
            print(f"{r['config']:48s} {r['seconds_per_image']:9.4f} {r['nfe']:5d} {r['class_accuracy']:9.2%}")
        print(f"images written to {args.out}/", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .core.options import ArgumentParser
    from .zoo.cli import add_parser as add_zoo

    parser = ArgumentParser(prog="diffaccel", description="Accelerate diffusers pipelines, measured. Exit codes: "
                            "0 ok, 1 unexpected error, 2 bad input, 3 missing or damaged weights.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_zoo(sub)
    _add_demo(sub)
    # Subpackages that grow CLI subcommands expose `add_parser(subparsers)` in their `cli` module.
    import importlib

    for pkg in ("evals", "samplers", "caching", "parallel", "distill", "app", "protocol"):
        try:
            mod = importlib.import_module(f"{__package__}.{pkg}.cli")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__package__}.{pkg}.cli":
                raise
            continue
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; every error becomes `error: <one line>` on stderr and its exit code (core/errors.py)."""
    from .core.errors import run_command

    args = build_parser().parse_args(argv)
    return run_command(lambda: args.func(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
