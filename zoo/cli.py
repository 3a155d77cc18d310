"""`diffaccel zoo list|train|sample|quality`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("zoo", help="the bundled model zoo: list, train, sample, measure quality",
                       description="The bundled model zoo: tiny diffusers pipelines trained on scikit-learn's digits.")
    zsub = p.add_subparsers(dest="zoo_cmd", required=True, metavar="{list,train,sample,quality}")

    q = zsub.add_parser("list", help="list the zoo's entries", description="List the zoo's entries.")
    q.add_argument("--json", action="store_true", help="print a JSON list on stdout")
    q.set_defaults(func=cmd_list)

    q = zsub.add_parser("train", help="retrain an entry from scratch (reproduces the shipped weights)",
                        description="Retrain a zoo entry with its fixed seed and settings and overwrite its weights "
                                    "(atomically). NAME 'all' trains every entry in dependency order.")
    q.add_argument("name", help="zoo entry, or 'all'")
    q.add_argument("--iterations", type=int, default=None, help="override the number of training iterations")
    q.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2; results depend on it)")
    q.add_argument("--out", type=Path, default=None, help="write into this folder instead of the package's zoo")
    q.add_argument("--quality-samples", type=int, default=500,
                   help="images sampled after training to measure the quality floor (0: skip)")
    q.add_argument("--json", action="store_true", help="print the written card(s) as JSON on stdout")
    q.set_defaults(func=cmd_train)

    q = zsub.add_parser("sample", help="generate images with a zoo pipeline and report time and NFE",
                        description="Generate images with a zoo pipeline; print seconds per image and NFE.")
    q.add_argument("name", help="a generator entry: digits-sd, digits-dit, digits-ddpm or random-*")
    q.add_argument("--prompt", default=None, help="prompt for text-to-image entries (default: 'a handwritten digit N')")
    q.add_argument("--label", type=int, default=None, help="digit 0-9 for digits-dit (default: cycle through 0-9)")
    q.add_argument("-n", "--num-images", type=int, default=8)
    q.add_argument("--steps", type=int, default=25)
    q.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--device", default="cpu")
    q.add_argument("--dtype", default=None, help="fp32 (default), bf16, fp16 (CUDA only)")
    q.add_argument("--out", type=Path, default=Path("outputs/samples"), help="folder for the PNG files")
    q.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    q.set_defaults(func=cmd_sample)

    q = zsub.add_parser("quality", help="measure a generator's quality floor with digits-features",
                        description="Sample N images and score them with the zoo classifier.")
    q.add_argument("name")
    q.add_argument("-n", "--num-images", type=int, default=500)
    q.add_argument("--steps", type=int, default=25)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_quality)


def _size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20 if path.exists() else 0.0


def cmd_list(args) -> int:
    from .registry import ENTRIES, entry_path

    rows = []
    for e in ENTRIES.values():
        p = entry_path(e.name)
        rows.append({"name": e.name, "returns": e.kind, "trained": e.trained, "description": e.description,
                     "size_mb": round(_size_mb(p), 2) if e.trained else 0.0,
                     "present": p.is_dir() if e.trained else True})
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        for r in rows:
            state = f"{r['size_mb']:6.2f} MB" if r["trained"] else "  random "
            missing = "" if r["present"] else "  (weights missing: diffaccel zoo train " + r["name"] + ")"
            print(f"{r['name']:18s} {r['returns']:24s} {state}  {r['description']}{missing}")
    return 0


def cmd_train(args) -> int:
    from .training import TRAIN_ORDER, train

    names = TRAIN_ORDER if args.name == "all" else [args.name]
    cards = []
    for name in names:
        path = train(name, iterations=args.iterations, out_root=args.out, threads=args.threads,
                     quality_samples=args.quality_samples)
        card = json.loads((path / "card.json").read_text())
        cards.append(card)
        print(f"wrote {path} in {card['train_seconds']} s: {card['train_metrics']}", file=sys.stderr)
    if args.json:
        print(json.dumps(cards, indent=1))
    return 0


def cmd_sample(args) -> int:
    from ..core import count_nfe, make_generators, measure, pipeline_output_to_uint8, tensor_to_pil
    from .data import caption
    from .registry import load

    if args.num_images < 1:
        raise ValueError(f"--num-images must be >= 1, got {args.num_images}")
    pipe = load(args.name, device=args.device, dtype=args.dtype)
    if not hasattr(pipe, "scheduler"):
        raise ValueError(f"{args.name} is a {type(pipe).__name__}, not a pipeline: it cannot sample")
    pipe.set_progress_bar_config(disable=True)
    n = args.num_images
    kw: dict = {"num_inference_steps": args.steps, "output_type": "np"}
    cls = type(pipe).__name__
    if cls in ("StableDiffusionPipeline", "PixArtAlphaPipeline", "RectifiedFlowPipeline"):
        prompts = [args.prompt] * n if args.prompt else [caption(i % 10) for i in range(n)]
        call_args: tuple = (prompts,)
        if args.guidance is not None:
            kw["guidance_scale"] = args.guidance
        if cls == "PixArtAlphaPipeline":
            kw.update(use_resolution_binning=False, clean_caption=False)
    elif cls == "DiTPipeline":
        call_args = ([args.label] * n if args.label is not None else [i % 10 for i in range(n)],)
        if args.guidance is not None:
            kw["guidance_scale"] = args.guidance
    else:
        call_args = ()
        kw["batch_size"] = n

    def run():
        return pipe(*call_args, generator=make_generators(args.seed, n), **kw).images

    with count_nfe(pipe) as nfe:
        timing = measure(run, warmup=1, repeats=1, device=args.device)
    calls_per_run = nfe.calls // 2  # warm-up and timed run
    images = pipeline_output_to_uint8(timing.result)
    args.out.mkdir(parents=True, exist_ok=True)
    files = []
    for i, im in enumerate(tensor_to_pil(images, value_range=(0, 255))):
        f = args.out / f"{args.name}-seed{args.seed + i}.png"
        im.save(f)
        files.append(str(f))
    res = {"model": args.name, "pipeline": cls, "num_images": n, "steps": args.steps,
           "seconds_per_image": timing.median / n, "nfe": calls_per_run, "files": files}
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        print(f"{args.name}: {n} images, {args.steps} steps, {res['seconds_per_image']:.4f} s/image, "
              f"NFE {calls_per_run} -> {args.out}")
    return 0


def cmd_quality(args) -> int:
    from .quality import measure_quality

    res = measure_quality(args.name, n=args.num_images, steps=args.steps, seed=args.seed)
    print(json.dumps(res, indent=1) if args.json else " ".join(f"{k}={v}" for k, v in res.items()))
    return 0
