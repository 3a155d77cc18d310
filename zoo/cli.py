"""`diffaccel zoo list|train|sample|quality`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..core.errors import InputError
from ..core.options import (
    MAX_IMAGES,
    MAX_STEPS,
    batch_option,
    float_in,
    images_option,
    int_in,
    seed_option,
    steps_option,
    threads_option,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("zoo", help="the bundled model zoo: list, train, sample, measure quality",
                       description="The bundled model zoo: tiny diffusers pipelines trained on scikit-learn's digits.")
    zsub = p.add_subparsers(dest="zoo_cmd", required=True, metavar="{list,train,rehash,sample,quality}")

    q = zsub.add_parser("list", help="list the zoo's entries", description="List the zoo's entries.")
    q.add_argument("--json", action="store_true", help="print a JSON list on stdout")
    q.set_defaults(func=cmd_list)

    q = zsub.add_parser("train", help="retrain an entry from scratch (reproduces the shipped weights)",
                        description="Retrain a zoo entry with its fixed seed and settings and overwrite its weights "
                                    "(atomically). NAME 'all' trains every entry in dependency order.")
    q.add_argument("name", help="zoo entry, or 'all'")
    q.add_argument("--iterations", type=int_in(1, 10_000_000), default=None,
                   help="override the number of training iterations")
    q.add_argument("--threads", type=threads_option, default=2,
                   help="torch CPU threads (default 2; results depend on it)")
    q.add_argument("--out", type=Path, default=None, help="write into this folder instead of the package's zoo")
    q.add_argument("--quality-samples", type=int_in(0, MAX_IMAGES), default=500,
                   help="images sampled after training to measure the quality floor (0: skip)")
    q.add_argument("--json", action="store_true", help="print the written card(s) as JSON on stdout")
    q.set_defaults(func=cmd_train)

    q = zsub.add_parser("rehash", help="(re)write the SHA-256 of every file into entries' card.json",
                        description="Record the SHA-256 of every file of a trained entry in its card.json (what "
                                    "loading verifies). Run it after changing an entry's files by hand; `zoo train` "
                                    "and the distill export record them themselves. NAME 'all' does every trained "
                                    "entry that is present.")
    q.add_argument("name", help="zoo entry, or 'all'")
    q.add_argument("--json", action="store_true", help="print {entry: {file: sha256}} as JSON on stdout")
    q.set_defaults(func=cmd_rehash)

    q = zsub.add_parser("sample", help="generate images with a zoo pipeline and report time and NFE",
                        description="Generate images with a zoo pipeline in batches (progress on stderr); write one "
                                    "PNG per image and print seconds per image and NFE. Existing files are not "
                                    "replaced without --force.")
    q.add_argument("name", help="a generator entry: digits-sd, digits-dit, digits-ddpm, digits-flux, "
                                "digits-sd-onestep, digits-flux-onestep or random-*")
    q.add_argument("--prompt", default=None, help="prompt for text-to-image entries (default: 'a handwritten digit N')")
    q.add_argument("--label", type=int_in(0), default=None,
                   help="class for DiT entries, digit drawn by text entries (default: cycle through 0-9)")
    q.add_argument("-n", "--num-images", type=images_option, default=8, help=f"images (1..{MAX_IMAGES})")
    q.add_argument("--batch-size", type=batch_option, default=16, help="images per pipeline call (default 16)")
    q.add_argument("--steps", type=steps_option, default=None,
                   help=f"sampling steps (1..{MAX_STEPS}; default: the entry's own, 25, digits-flux 28, the one-step "
                        "students 1)")
    q.add_argument("--guidance", type=float_in(0.0, 100.0), default=None, help="classifier-free guidance scale")
    q.add_argument("--seed", type=seed_option, default=0, help="image i uses seed + i")
    q.add_argument("--device", default="cpu")
    q.add_argument("--dtype", default=None, help="fp32 (default), bf16, fp16 (CUDA only)")
    q.add_argument("--out", type=Path, default=Path("outputs/samples"), help="folder for the PNG files")
    q.add_argument("--force", action="store_true", help="replace PNG files of the same names in --out")
    q.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    q.set_defaults(func=cmd_sample)

    q = zsub.add_parser("quality", help="measure a generator's quality floor with digits-features",
                        description="Sample N images (in batches, progress on stderr) and score them with the zoo "
                                    "classifier.")
    q.add_argument("name", help="a generator entry (a pipeline)")
    q.add_argument("-n", "--num-images", type=images_option, default=500)
    q.add_argument("--batch-size", type=batch_option, default=100, help="images per pipeline call (default 100)")
    q.add_argument("--steps", type=steps_option, default=None,
                   help="sampling steps (default: the entry's own, 25, digits-flux 28, the one-step students 1)")
    q.add_argument("--seed", type=seed_option, default=0)
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


def cmd_rehash(args) -> int:
    from .registry import ENTRIES, UnknownModelError, entry_path, record_digests

    if args.name != "all" and args.name not in ENTRIES:
        raise UnknownModelError(f"unknown zoo model {args.name!r}; valid names: {', '.join(ENTRIES)}")
    names = [n for n, e in ENTRIES.items() if e.trained and entry_path(n).is_dir()] if args.name == "all" \
        else [args.name]
    out = {}
    for name in names:
        if not ENTRIES[name].trained:
            raise InputError(f"{name} has random weights built from a config; it has no files to hash")
        if not entry_path(name).is_dir():
            raise InputError(f"{name}: weight folder {entry_path(name)} is missing")
        out[name] = record_digests(entry_path(name))
        print(f"{name}: recorded {len(out[name])} file digest(s) in card.json", file=sys.stderr)
    if args.json:
        print(json.dumps(out, indent=1))
    return 0


def _check_generator(name: str) -> None:
    """Refuse a zoo name that is not a pipeline before anything loads."""
    from .registry import ENTRIES, UnknownModelError

    if name not in ENTRIES:
        raise UnknownModelError(f"unknown zoo model {name!r}; valid names: {', '.join(ENTRIES)}")
    if not ENTRIES[name].kind.endswith("Pipeline"):
        pipelines = ", ".join(e.name for e in ENTRIES.values() if e.kind.endswith("Pipeline"))
        raise InputError(f"{name} is a {ENTRIES[name].kind}, not a pipeline: it cannot sample; pipelines: {pipelines}")


def cmd_sample(args) -> int:
    from ..core import count_nfe, measure, tensor_to_pil
    from ..core.files import check_new_files, check_output_path
    from .quality import DEFAULT_STEPS, LABEL_PIPELINES, UNCONDITIONAL_PIPELINES, generate, num_classes
    from .registry import load

    _check_generator(args.name)
    n = args.num_images
    out = check_output_path(args.out, directory=True, option="--out")  # before any work: creatable, writable
    files = [out / f"{args.name}-seed{args.seed + i}.png" for i in range(n)]
    check_new_files(files, force=args.force, option="--out")
    pipe = load(args.name, device=args.device, dtype=args.dtype)
    pipe.set_progress_bar_config(disable=True)
    cls = type(pipe).__name__
    if args.prompt is not None and cls in LABEL_PIPELINES + UNCONDITIONAL_PIPELINES:
        raise InputError(f"--prompt applies to text-to-image pipelines; {args.name} is a {cls}"
                         + (" (use --label)" if cls in LABEL_PIPELINES else ""))
    classes = num_classes(pipe)
    if args.label is not None:
        if classes is None:
            raise InputError(f"--label: {args.name} is an unconditional {cls}; it takes no label")
        if not 0 <= args.label < classes:
            raise InputError(f"--label must be in [0, {classes - 1}] for {args.name}, got {args.label}")
    labels = None if classes is None else ([args.label] if args.label is not None else list(range(min(10, classes))))

    steps = args.steps if args.steps is not None else DEFAULT_STEPS.get(args.name, 25)

    def run(progress: bool):
        return generate(pipe, labels, n, steps, args.seed, args.batch_size, guidance=args.guidance,
                        progress=progress, prompt=args.prompt, desc=f"sample {args.name}")[0]

    with count_nfe(pipe) as nfe:
        if n <= args.batch_size:  # one batch: warm up first so its time is not a first call's (longer runs are not)
            run(False)
        warm_calls = nfe.calls
        timing = measure(lambda: run(True), warmup=0, repeats=1, device=args.device)
    calls_per_run = nfe.calls - warm_calls
    for f, im in zip(files, tensor_to_pil(timing.result, value_range=(0, 255)), strict=True):
        im.save(f)
    res = {"model": args.name, "pipeline": cls, "num_images": n, "steps": steps,
           "batch_size": min(n, args.batch_size), "seconds_per_image": timing.median / n, "nfe": calls_per_run,
           "files": [str(f) for f in files]}
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        print(f"{args.name}: {n} images, {steps} steps, {res['seconds_per_image']:.4f} s/image, "
              f"NFE {calls_per_run} -> {out}")
    return 0


def cmd_quality(args) -> int:
    from .quality import measure_quality

    _check_generator(args.name)
    res = measure_quality(args.name, n=args.num_images, steps=args.steps, seed=args.seed, batch=args.batch_size)
    print(json.dumps(res, indent=1) if args.json else " ".join(f"{k}={v}" for k, v in res.items()))
    return 0
