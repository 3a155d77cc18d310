"""FID / class accuracy vs true NFE for the PNDM family, Time-Shift and diffusers' fast samplers (issue #4).

One command runs the whole sweep and writes the table and the plot:

    python benchmarks/samplers.py                       # digits-ddpm and digits-sd, NFE 5 10 20 50, 300 images
    python benchmarks/samplers.py --models digits-ddpm --nfe 10 --num-images 200
    python benchmarks/samplers.py --report-only         # rebuild samplers.md and the PNG from samplers.jsonl

Rows are appended to `benchmarks/results/samplers.jsonl` as they finish (`--resume` skips rows already there), so
a partial run still leaves a usable table. NFE is what `count_nfe` measured (denoiser calls per batch), not the
nominal step count. Progress goes to stderr; the final table to stdout.
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
from diffaccel.evals import (
    evaluate,
    features_from_images,
    fid_from_stats,
    load_extractor,
    reference_features,
    reference_images,
)
from diffaccel.samplers.bench import BASELINES, DEFAULT_MODELS, MODELS, SAMPLERS, ts_params
from diffaccel.zoo import load

RESULTS = Path(__file__).resolve().parent / "results"
EXTRA = [("DDIM", 100)]  # the "<= DDIM at 100 NFE" reference of the goal


def machine() -> str:
    return (f"{os.cpu_count()}-core {platform.machine()} CPU, torch {torch.__version__}, "
            f"threads {torch.get_num_threads()}")


def weights_digest(model: str) -> str:
    """First 16 hex digits of the sha256 of the model's denoiser weights (the zoo can be retrained in place)."""
    import hashlib

    from diffaccel.zoo import entry_path

    files = sorted(entry_path(model).glob("*/diffusion_pytorch_model.safetensors"))
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:16] if files else "?"


def data_floor(num_images: int) -> float:
    """FID of `num_images` real training digits against the test split: the floor a perfect sampler reaches at
    this sample size (FID is biased upwards for small n)."""
    ext = load_extractor("digits")
    real = features_from_images(ext, reference_images("train")[:num_images])
    return fid_from_stats(real.reference(), reference_features(ext, "test").reference())


def run(args: argparse.Namespace) -> None:
    jsonl = args.results / "samplers.jsonl"
    done = set()
    if args.resume and jsonl.exists():
        for line in jsonl.read_text().splitlines():
            r = json.loads(line)
            done.add((r["model"], r["sampler"], r["nfe_target"], r["num_images"]))
    args.results.mkdir(parents=True, exist_ok=True)
    floor = args.results / "samplers_floor.json"
    floors = json.loads(floor.read_text()) if floor.exists() else {}
    if str(args.num_images) not in floors:
        floors[str(args.num_images)] = data_floor(args.num_images)
        floor.write_text(json.dumps(floors, indent=1) + "\n")
    for model in args.models:
        digest = weights_digest(model)  # before loading: what the rows below were produced with
        pipe = load(model)
        pipe.set_progress_bar_config(disable=True)
        config = dict(pipe.scheduler.config)
        spec = MODELS[model]
        cells = [(s, n) for n in args.nfe for s in args.samplers] + ([] if args.no_extra else EXTRA)
        for sampler, nfe in cells:
            if (model, sampler, nfe, args.num_images) in done:
                continue
            built = SAMPLERS[sampler](config, nfe)
            if built is None:
                print(f"[samplers] {model} {sampler} NFE {nfe}: infeasible (minimum cost above {nfe})", file=sys.stderr)
                continue
            pipe.scheduler, steps = built
            t0 = time.perf_counter()
            res = evaluate(pipe, spec["prompts_or_labels"], args.num_images, args.seed, name=f"{sampler} NFE{nfe}",
                           batch_size=args.batch_size, count_flops=False, clip_model=None,
                           num_inference_steps=steps, **spec["call_kwargs"])
            row = {"model": model, "sampler": sampler, "nfe_target": nfe, "nfe": res.nfe_per_image,
                   "num_inference_steps": steps, "fid": res.fid, "kid_x1e3": res.kid_mean * 1e3,
                   "class_accuracy": res.class_accuracy, "seconds_per_image": res.seconds_per_image,
                   "num_images": args.num_images, "n_reference": res.n_b, "seed": args.seed,
                   "extractor": res.extractor, "call_kwargs": res.call_kwargs, "machine": machine(),
                   "command": args.command, "weights_sha256": digest,
                   "ts": ts_params(steps) if sampler.startswith("TS-") else None}
            with jsonl.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"[samplers] {model} {sampler:22s} NFE {row['nfe']:4.0f} FID {res.fid:8.3f} "
                  f"acc {res.class_accuracy if res.class_accuracy is not None else float('nan'):.3f} "
                  f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)


# ------------------------------------------------------------------------------------------------- report


def load_rows(results: Path, num_images: int | None) -> list[dict]:
    path = results / "samplers.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    if num_images:
        rows = [r for r in rows if r["num_images"] == num_images]
    latest = {}
    for r in rows:  # the latest row of each cell wins
        latest[(r["model"], r["sampler"], r["nfe_target"])] = r
    return list(latest.values())


def table(rows: list[dict]) -> str:
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mrows = [r for r in rows if r["model"] == model]
        nfes = sorted({r["nfe_target"] for r in mrows})
        n_img = sorted({r["num_images"] for r in mrows})
        acc = any(r["class_accuracy"] is not None for r in mrows)
        out.append(f"### {model} — FID (digits-features, lower is better)"
                   + (" / class accuracy" if acc else "") + f", {', '.join(map(str, n_img))} images per cell\n")
        out.append("| sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " |")
        out.append("|---|" + "---:|" * len(nfes))
        samplers = [s for s in [*SAMPLERS] if any(r["sampler"] == s for r in mrows)]
        best = {n: min((r["fid"] for r in mrows if r["nfe_target"] == n), default=None) for n in nfes}
        for s in samplers:
            cells = []
            for n in nfes:
                r = next((r for r in mrows if r["sampler"] == s and r["nfe_target"] == n), None)
                if r is None:
                    cells.append("—")
                    continue
                assert round(r["nfe"]) == n, f"measured NFE {r['nfe']} != {n} for {s}"
                c = f"{r['fid']:.2f}" + (f" / {r['class_accuracy']:.0%}" if r["class_accuracy"] is not None else "")
                cells.append(f"**{c}**" if r["fid"] == best[n] else c)
            out.append(f"| {s} | " + " | ".join(cells) + " |")
        out.append("")
        for n in nfes:
            here = [r for r in mrows if r["nfe_target"] == n]
            base = [r for r in here if r["sampler"] in BASELINES]
            ours = [r for r in here if r["sampler"] not in BASELINES and r["sampler"] != "diffusers PNDM (PLMS)"]
            if base and ours:
                b, o = min(base, key=lambda r: r["fid"]), min(ours, key=lambda r: r["fid"])
                out.append(f"- NFE {n}: best diffaccel {o['sampler']} {o['fid']:.2f} vs best of DDIM/DPM++/UniPC "
                           f"{b['sampler']} {b['fid']:.2f} (ratio {o['fid'] / b['fid']:.2f})")
        out.append("")
    return "\n".join(out)


def plot(rows: list[dict], path: Path) -> None:
    """FID vs NFE (log x), one panel per model, one curve per sampler."""
    from plots import curves

    models = list(dict.fromkeys(r["model"] for r in rows))
    panels = [(f"{model}: FID vs NFE", "FID (digits-features)",
               {s: [(r["nfe_target"], r["fid"]) for r in rows if r["model"] == model and r["sampler"] == s]
                for s in SAMPLERS if any(r["model"] == model and r["sampler"] == s for r in rows)})
              for model in models]
    curves(panels, path, "NFE (log)")


def report(args: argparse.Namespace) -> str:
    rows = load_rows(args.results, args.num_images if not args.report_all else None)
    if not rows:
        return "no rows yet"
    png = args.results / "samplers_fid_vs_nfe.png"
    plot(rows, png)
    r0 = rows[0]
    floor = args.results / "samplers_floor.json"
    floors = json.loads(floor.read_text()) if floor.exists() else {}
    digests = "; ".join(f"{m} {d}" for m, d in dict.fromkeys(
        (r["model"], r.get("weights_sha256", "?")) for r in rows))
    floor_text = "; ".join(f"{v:.2f} at {k} images" for k, v in sorted(floors.items(), key=lambda kv: int(kv[0])))
    header = ["## Samplers: FID and class accuracy vs NFE", "",
              f"Machine: {r0['machine']}. Seed {r0['seed']}; FID/KID with {r0['extractor']} (d=128) against "
              f"the zoo digits test split (n={r0['n_reference']}). NFE = measured denoiser calls per batch "
              "(`count_nfe`). All schedulers on the model's training schedule with `trailing` spacing, except "
              "rows marked '(leading)' (the model's shipped `leading` grid with steps_offset=1, ending at t=1; "
              "the goal lines compare against the best baseline on either grid); digits-ddpm "
              "DDIM keeps its shipped `clip_sample=True`; digits-sd uses CFG 7.5 (one batched call per step). "
              "Time-Shift: window 40/30/8 for <=10/<=20/<=50 transitions, cutoff 300 (paper Fig. 7, untuned). "
              "'—' = not run (not needed for the goal, or time ran out) or infeasible (F-PNDM costs N+9 with N >= 4). "
              "Per-image seconds are not comparable across rows: the CPU was shared with other jobs. "
              f"Noise floor (real training digits vs the test split): {floor_text or 'not computed'}. "
              f"Denoiser weights (sha256 prefix): {digests}.",
              "", "Commands that produced these rows:", "",
              *[f"    {c}" for c in dict.fromkeys(r.get("command", "?") for r in rows)],
              "", f"![FID vs NFE]({png.name})", ""]
    return "\n".join(header) + table(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=list(MODELS))
    p.add_argument("--nfe", nargs="+", type=int, default=[5, 10, 20, 50])
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS), metavar="SAMPLER",
                   help=f"subset of: {', '.join(SAMPLERS)}")
    p.add_argument("--num-images", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--no-extra", action="store_true", help="skip the DDIM at 100 NFE reference row")
    p.add_argument("--resume", action="store_true", help="skip cells already in samplers.jsonl")
    p.add_argument("--report-only", action="store_true", help="only rebuild samplers.md and the PNG")
    p.add_argument("--report-all", action="store_true", help="report rows of every image count, not --num-images")
    p.add_argument("--results", type=Path, default=RESULTS, help="output folder (default benchmarks/results)")
    args = p.parse_args(argv)
    args.command = "python benchmarks/samplers.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.report_only:
        with torch.no_grad():
            run(args)
    text = report(args)
    (args.results / "samplers.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
