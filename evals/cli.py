"""`diffaccel fid` and `diffaccel bench`.

Exit codes: 0 ok; 2 bad input (missing/empty folder, no images, corrupt image, fewer than 2 images, bad `.npz`,
unknown extractor or resize mode, statistics made with another extractor/resize, existing output without --force);
3 feature-extractor or zoo weights missing. Results go to stdout, progress and warnings to stderr.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from ..core.files import check_output_path
from ..core.options import batch_option, images_option, int_in, seed_option, steps_option, threads_option
from .errors import EvalInputError
from .images import RESIZE_MODES


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fid", help="FID (and KID) between two image folders or .npz statistics",
        description="FID between PATH_A and PATH_B, each a folder of images (png/jpg/jpeg/webp/bmp, sorted) or an "
                    ".npz of statistics (pytorch-fid compatible). With --save-stats, the statistics of PATH_A are "
                    "written to OUT.npz (PATH_B may then be omitted). Mixed image sizes are accepted: every image is "
                    "resized to the extractor's size by --resize. Exit codes: 0 ok, 2 bad input, 3 missing weights.")
    p.add_argument("path_a", metavar="PATH_A", help="folder of images or .npz statistics (the evaluated set)")
    p.add_argument("path_b", metavar="PATH_B", nargs="?", default=None,
                   help="folder of images or .npz statistics (the reference set)")
    p.add_argument("--extractor", default="digits",
                   help="digits (zoo digits-features, offline default), inception (needs the FID Inception "
                        "weights), clip (zoo digits-clip) or clip:<folder>")
    p.add_argument("--resize", default="clean", choices=RESIZE_MODES, help="resize mode (default clean)")
    p.add_argument("--batch-size", type=batch_option, default=64, help="images per extractor call (default 64)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--num-workers", type=int_in(0, 256), default=0, help="image decoding worker processes (default 0)")
    p.add_argument("--recursive", action="store_true", help="also search sub-folders for images")
    p.add_argument("--save-stats", type=Path, default=None, metavar="OUT.npz",
                   help="write the statistics of PATH_A to OUT.npz (atomically, after success)")
    p.add_argument("--save-features", action="store_true",
                   help="also store the raw features in OUT.npz (needed to reuse it for --kid)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --save-stats file")
    p.add_argument("--kid", action="store_true", help="also compute KID (needs features: folders, or .npz files "
                                                      "saved with --save-features)")
    p.add_argument("--kid-subsets", type=int_in(1, 100_000), default=100)
    p.add_argument("--kid-subset-size", type=int_in(2, 10_000_000), default=1000)
    p.add_argument("--seed", type=seed_option, default=0, help="seed of the KID subsets")
    p.add_argument("--fid-method", default="eigh", choices=("eigh", "sqrtm", "eigvals"))
    p.add_argument("--assume-extractor", default=None, metavar="NAME",
                   help="an .npz without metadata (pytorch-fid, clean-fid) was made by this extractor (digits, "
                        "inception, or a full extractor name); without it such files are refused")
    p.add_argument("--inception-weights", type=Path, default=None,
                   help="path of pt_inception-2015-12-05-6726825d.pth (else $DIFFACCEL_INCEPTION_WEIGHTS, caches)")
    p.add_argument("--clip-model", default="digits-clip",
                   help="zoo CLIP entry or local CLIP folder for --extractor clip")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress or log lines on stderr")
    p.set_defaults(func=cmd_fid)

    b = sub.add_parser(
        "bench", help="run a suite of pipeline configurations through the evaluation harness",
        description="Generate images for each configuration of a suite with the same seeds and report images/s, "
                    "seconds/image, NFE, FLOPs, FID/KID (domain: digits-features) vs the zoo test split, "
                    "prompted-class accuracy and CLIP score, and with --reference the paired PSNR/SSIM/feature "
                    "distance to an unaccelerated configuration at the same seeds. Exit codes: 0 ok, 2 bad input, "
                    "3 missing weights.")
    b.add_argument("--suite", default="baseline", help="suite name (see --list; default baseline)")
    b.add_argument("--config", action="append", default=None, metavar="NAME",
                   help="run only the configurations whose name starts with NAME (repeatable)")
    b.add_argument("-n", "--num-images", type=images_option, default=200)
    b.add_argument("--steps", type=steps_option, default=None, help="sampling steps (default: the suite's)")
    b.add_argument("--batch-size", type=batch_option, default=None,
                   help="images per pipeline call (default min(n, 50))")
    b.add_argument("--seed", type=seed_option, default=0)
    b.add_argument("--reference", default=None, metavar="NAME",
                   help="pair every configuration with configuration NAME (same seeds): adds PSNR, SSIM and "
                        "feature distance against its images (default: the suite's own pairing, if any)")
    b.add_argument("--no-flops", action="store_true", help="skip the FLOP-counting call (a plain warm-up instead)")
    b.add_argument("--threads", type=threads_option, default=None, help="torch CPU threads")
    b.add_argument("--out", type=Path, default=None,
                   help="folder for the suite's report files (suites with a report, e.g. pareto: markdown table and "
                        "plot; default outputs/bench-<suite>)")
    b.add_argument("--list", action="store_true", help="list the suites and their configurations, then exit")
    b.add_argument("--json", action="store_true", help="print {'results': [...]} as JSON on stdout")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    b.set_defaults(func=cmd_bench)


def _log(args, msg: str) -> None:
    if not args.quiet:
        print(msg, file=sys.stderr)


def _is_npz(path: str) -> bool:
    return Path(path).suffix.lower() == ".npz"


def _quiet_libraries(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """With --quiet, silence transformers' and diffusers' logging and progress bars for this command."""

    @functools.wraps(run)
    def command(args: argparse.Namespace) -> int:
        if getattr(args, "quiet", False):
            from diffusers.utils import logging as diffusers_logging
            from transformers.utils import logging as hf_logging

            for lib in (hf_logging, diffusers_logging):
                lib.set_verbosity_error()
                lib.disable_progress_bar()
        return run(args)

    return command


@_quiet_libraries
def cmd_fid(args) -> int:
    from ..core import resolve_device
    from .extractors import load_extractor
    from .metrics import features_from_folder, fid_from_stats, kid
    from .stats import check_compatible, load_stats, save_stats

    t0 = time.perf_counter()
    if args.path_b is None and args.save_stats is None:
        raise EvalInputError("give two inputs (PATH_A PATH_B), or one folder with --save-stats OUT.npz")
    if args.save_stats is not None:
        if _is_npz(args.path_a):
            raise EvalInputError(f"--save-stats writes the statistics of a folder; PATH_A {args.path_a} is an .npz")
        if args.save_stats.suffix != ".npz":
            raise EvalInputError(f"--save-stats {args.save_stats}: statistics files must end in .npz")
        check_output_path(args.save_stats, force=args.force, option="--save-stats")  # before any computing
    assumed = _assumed_extractor(args.assume_extractor, args.clip_model)
    inputs = [("a", args.path_a)] + ([("b", args.path_b)] if args.path_b is not None else [])
    for _, path in inputs:
        if _is_npz(path) and not Path(path).is_file():
            raise EvalInputError(f"{path}: no such statistics file")
        if not _is_npz(path) and not Path(path).is_dir():
            raise EvalInputError(f"{path}: no such folder" if not Path(path).exists()
                                 else f"{path}: not a folder of images or an .npz of statistics")

    caught: list[str] = []
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        extractor = None
        stats, info = {}, {}
        for tag, path in inputs:
            if _is_npz(path):
                stats[tag] = load_stats(path, assume_extractor=assumed)
                info[tag] = {"kind": "npz", "path": str(path), "n": stats[tag].n}
                _log(args, f"[fid] {tag}: {path}: statistics of {stats[tag].n} images ({stats[tag].extractor})")
                continue
            if extractor is None:
                device = resolve_device(args.device)
                extractor = load_extractor(args.extractor, resize=args.resize, device=device,
                                           inception_weights=args.inception_weights, clip_model=args.clip_model)
                _log(args, f"[fid] extractor {extractor.name} (d={extractor.num_features}, resize={extractor.resize})"
                           f" on {device}")
            feats = features_from_folder(extractor, path, batch_size=args.batch_size, num_workers=args.num_workers,
                                         recursive=args.recursive, keep_features=args.kid or args.save_features,
                                         progress=not args.quiet and sys.stderr.isatty())
            caught.extend(feats.warnings)
            if feats.stats.n < 2:
                raise EvalInputError(f"{path}: {feats.stats.n} image(s); FID needs at least 2")
            feats.stats.warn_if_rank_deficient(str(path))
            stats[tag] = feats.reference()
            info[tag] = {"kind": "folder", "path": str(path), "n": feats.stats.n}
            _log(args, f"[fid] {tag}: {path}: {feats.stats.n} images")

        result: dict = {}
        if "b" in stats:
            check_compatible(stats["a"], stats["b"])
            result["fid"] = fid_from_stats(stats["a"], stats["b"], method=args.fid_method)
            if args.kid:
                for tag in ("a", "b"):
                    if stats[tag].feats is None:
                        raise EvalInputError(f"{info[tag]['path']}: no 'feats' stored for KID; re-create it with "
                                             "--save-stats OUT.npz --save-features")
                k = kid(stats["a"].feats, stats["b"].feats, subsets=args.kid_subsets,
                        subset_size=args.kid_subset_size, seed=args.seed)
                result.update(kid_mean=k.mean, kid_std=k.std, kid_subsets=k.subsets, kid_subset_size=k.subset_size)
        save_error: OSError | None = None
        if args.save_stats is not None:
            a = stats["a"]
            if not args.save_features:
                a.feats = None
            try:
                save_stats(args.save_stats, a, force=args.force)
                _log(args, f"[fid] statistics of {args.path_a} written to {args.save_stats}")
                result["saved_stats"] = str(args.save_stats)
            except OSError as exc:  # the disk changed under us: report what was computed, then fail
                save_error = exc
    caught.extend(str(r.message) for r in records)
    for msg in caught:
        _log(args, f"warning: {msg}")

    ref = stats["a"]
    result.update(extractor=ref.extractor, extractor_sha256=ref.extractor_sha256, dims=ref.dims, resize=ref.resize,
                  n_a=stats["a"].n, n_b=stats["b"].n if "b" in stats else None, fid_method=args.fid_method,
                  inputs=info, seed=args.seed, elapsed_s=round(time.perf_counter() - t0, 3), warnings=caught)
    for key in ("fid", "kid_mean", "kid_std"):
        if key in result and not math.isfinite(result[key]):  # JSON has no Infinity/NaN: say so, report null
            result["warnings"].append(f"{key} is {result[key]} (not finite); reported as null")
            _log(args, f"warning: {key} is {result[key]} (not finite)")
            result[key] = None
    if args.json:
        print(json.dumps(result, allow_nan=False))
    elif "fid" in result:
        line = (f"FID: {_num(result['fid'], 4)} (n_a={result['n_a']}, n_b={result['n_b']}, "
                f"extractor={result['extractor']}, resize={result['resize']})")
        if "kid_mean" in result:
            line += (f"\nKID: {_num(result['kid_mean'], 6)} +- {_num(result['kid_std'], 6)} "
                     f"(subsets of {result['kid_subset_size']})")
        print(line)
    if save_error is not None:
        raise EvalInputError(f"--save-stats: could not write {args.save_stats} ({save_error.strerror or save_error}); "
                             "the result above is complete")
    return 0


def _num(v: float | None, digits: int) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _assumed_extractor(name: str | None, clip_model: str) -> str | None:
    """`--assume-extractor`: a short name (digits, inception, clip) -> the extractor's recorded name."""
    if not name:
        return None
    from .extractors import extractor_name

    return extractor_name(name, clip_model)


@_quiet_libraries
def cmd_bench(args) -> int:
    import torch

    from .harness import DEFAULT_STEPS, REPORTS, SUITES, format_table, missing_requirements, run_bench

    if args.list:
        for name, builder in SUITES.items():
            print(f"{name}: " + "; ".join(c.name for c in builder(DEFAULT_STEPS[name])))
        return 0
    if args.suite not in SUITES:
        raise EvalInputError(f"unknown suite {args.suite!r}; available: {', '.join(SUITES)}")
    if args.num_images < 2:
        raise EvalInputError("--num-images must be >= 2")
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = SUITES[args.suite](args.steps or DEFAULT_STEPS[args.suite])
    if args.config:
        configs = [c for c in configs if any(c.name.startswith(prefix) for prefix in args.config)]
        if not configs:
            raise EvalInputError(f"no configuration of suite {args.suite!r} starts with {args.config}")
    missing = missing_requirements(configs)
    if missing:
        from ..zoo import ZooError

        raise ZooError(f"suite {args.suite!r} needs zoo weights that are missing: {', '.join(missing)}; "
                       f"run `diffaccel zoo train <name>` for each")
    kwargs = {"batch_size": args.batch_size, "count_flops": not args.no_flops}
    results = run_bench(configs, args.num_images, args.seed, progress=not args.quiet, reference=args.reference,
                        **kwargs)
    if args.json:
        print(json.dumps({"suite": args.suite, "results": [r.as_dict() for r in results]}))
    else:
        print(format_table(results))
    if args.suite in REPORTS:
        out = args.out or Path("outputs") / f"bench-{args.suite}"
        command = "diffaccel " + " ".join(sys.argv[1:]) if sys.argv[1:] else f"diffaccel bench --suite {args.suite}"
        for path in REPORTS[args.suite](results, out, command):
            _log(args, f"wrote {path}")
    return 0
