"""Patch parallelism composed with caches and samplers on Flux, through the protocol (CPU, gloo ranks).

Per recipe R (a cache, a flow sampler, or both) on `digits-flux`, the same prompts and per-image seeds:

* one process: ``accelerate(pipe, R)`` — the images, the transformer's FLOPs per generation (`core.flops`, executed
  ops only, so skipped cache units are not counted) and the wall time;
* `world` gloo ranks: ``accelerate(pipe, R + "pp:sync")`` — the same, per rank, plus the bytes each rank sent;
* exactness: the largest difference between the two runs' images (uint8 levels; sync mode is exact, so the
  composition must give the one-process images of R up to float reduction order);
* quality of R: paired PSNR / SSIM against the plain one-process images (what the cache or sampler costs; patch
  parallelism adds nothing to it).

The ranks share this machine's cores with each other (and with whatever else runs), so the wall-clock columns are
not a multi-GPU speed-up; the per-rank transformer FLOPs ratio against plain one-process sampling is what a
compute-bound GPU per rank would turn into speed, before communication (see parallel/README.md's cost model).

    python benchmarks/parallel_compose.py --world 2 --num-images 4 --out benchmarks/results/parallel_compose
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

RECIPES = ["", "fora:2:steps=28", "fora:2:steps=28:forecast=1", "taylorseer:2", "s-pndm@14",
           "s-pndm@14 + fora:2"]


def _transformer_flops(pipe, run) -> tuple[float, object]:
    """FLOPs of the transformer's calls during `run()` (hooks open a counter around each call)."""
    from diffaccel.core.families import find_denoiser
    from diffaccel.core.flops import flop_counter

    model = find_denoiser(pipe)
    total = [0.0]
    live: list = []

    def pre(mod, args, kwargs):
        live.append(flop_counter())
        live[-1].__enter__()

    def post(mod, args, kwargs, out):
        counter = live.pop()
        counter.__exit__(None, None, None)
        total[0] += counter.get_total_flops()

    hooks = [model.register_forward_pre_hook(pre, with_kwargs=True),
             model.register_forward_hook(post, with_kwargs=True)]
    try:
        out = run()
    finally:
        for h in hooks:
            h.remove()
    return total[0], out


def measure(rank: int, world: int, args: dict) -> dict:
    """Every recipe on this process (`world` 1: one process; else one rank of a gloo group)."""
    from diffaccel import accelerate
    from diffaccel.core import make_generators, pipeline_output_to_uint8
    from diffaccel.core.families import family_for, find_denoiser
    from diffaccel.parallel import parallel_handle
    from diffaccel.zoo import load
    from diffaccel.zoo.data import caption

    torch.set_num_threads(args["threads"])
    pipe = load("digits-flux")
    pipe.set_progress_bar_config(disable=True)
    labels = [i % 10 for i in range(args["num_images"])]
    # the family's call arguments (the tiny T5's own sequence length: FluxPipeline's default 512 would pad the text
    # stream to 512 tokens and swamp the image tokens that patch parallelism splits)
    kw = {**family_for(pipe).call_kwargs(caption(0), 1, args["steps"]),
          "prompt": [caption(label) for label in labels], "output_type": "pt"}

    def generate():
        # a recipe's sampler sets the step count from its NFE (`s-pndm@14`): call through the handle, without ours
        call, extra = (acc, {k: v for k, v in kw.items() if k != "num_inference_steps"}) if "@" in recipe \
            else (pipe, kw)
        return call(**extra, generator=make_generators(args["seed"], len(labels))).images

    out: dict = {}
    for recipe in args["recipes"]:
        full = " + ".join(r for r in (recipe, "pp:sync:timeout=600" if world > 1 else "") if r)
        acc = accelerate(pipe, full) if full else None
        handle = parallel_handle(find_denoiser(pipe))
        sent0 = handle.meter.summary()["total_wire_bytes"] if handle else 0
        flops, images = _transformer_flops(pipe, generate)
        sent = (handle.meter.summary()["total_wire_bytes"] - sent0) if handle else 0
        times = []
        for _ in range(args["repeats"]):
            t0 = time.perf_counter()
            generate()
            times.append(time.perf_counter() - t0)
        if acc is not None:
            acc.remove()
        out[recipe] = {"flops": flops, "bytes_sent": sent, "seconds": sorted(times)[len(times) // 2],
                       # numpy, not a tensor: results travel back by value (a tensor's shared memory dies with its rank)
                       "images": pipeline_output_to_uint8(images).numpy()}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, default=2, help="gloo ranks of the parallel runs")
    p.add_argument("--num-images", type=int, default=4)
    p.add_argument("--steps", type=int, default=28, help="steps of recipes without a sampler (FLUX's default 28)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="timed generations per recipe (median)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--recipes", nargs="+", default=RECIPES, help="recipes ('' = plain)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/parallel_compose"))
    args = p.parse_args(argv)
    if args.world < 2:
        p.error("--world must be at least 2")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from diffaccel.core.timing import log
    from diffaccel.evals.paired import paired_fidelity
    from distributed import run_distributed

    cfg = {"num_images": args.num_images, "steps": args.steps, "seed": args.seed, "repeats": args.repeats,
           "threads": args.threads, "recipes": [""] + [r for r in args.recipes if r]}
    log("one process")
    single = measure(0, 1, cfg)
    log(f"{args.world} gloo ranks")
    ranks = run_distributed(measure, args.world, cfg, timeout_s=7200, pg_timeout_s=900)
    for res in (single, *ranks):
        for row in res.values():
            row["images"] = torch.from_numpy(row["images"])
    plain = single[""]
    rows = []
    for recipe in cfg["recipes"]:
        one, par = single[recipe], ranks[0][recipe]
        level_diff = int((one["images"].int() - par["images"].int()).abs().max())
        same_on_ranks = all(bool(torch.equal(r[recipe]["images"], par["images"])) for r in ranks)
        fid = paired_fidelity(one["images"], plain["images"], extractor=None) if recipe else None
        rows.append({
            "recipe": recipe or "plain",
            "flops_ratio_one_process": plain["flops"] / one["flops"],
            "flops_ratio_per_rank": plain["flops"] / max(r[recipe]["flops"] for r in ranks),
            "bytes_sent_per_rank": [r[recipe]["bytes_sent"] for r in ranks],
            "max_level_diff_vs_one_process": level_diff, "ranks_identical": same_on_ranks,
            "psnr_vs_plain": None if fid is None else fid.psnr, "ssim_vs_plain": None if fid is None else fid.ssim,
            "seconds_one_process": one["seconds"], "seconds_parallel": max(r[recipe]["seconds"] for r in ranks)})
        log(json.dumps(rows[-1]))
    machine = f"{os.cpu_count()}-core {platform.machine()} CPU, torch {torch.__version__}"
    command = "python benchmarks/parallel_compose.py " + " ".join(argv if argv is not None else sys.argv[1:])
    summary = {"command": command, "machine": machine, "world": args.world, "model": "digits-flux",
               "num_images": args.num_images, "threads_per_process": args.threads, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    lines = [f"Command: `{command}`; {machine}; {args.world} gloo ranks, {args.threads} thread(s) per process, "
             f"{args.num_images} images, digits-flux.", "",
             "| recipe | FLOPs ratio, one process | FLOPs ratio per rank, + pp:sync | bytes sent per rank "
             "| max |Δ| vs one process (uint8 levels) | PSNR / SSIM vs plain | s one process | s parallel |",
             "|---|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        q = "—" if r["psnr_vs_plain"] is None else f"{r['psnr_vs_plain']:.2f} dB / {r['ssim_vs_plain']:.4f}"
        lines.append(f"| `{r['recipe']}` | {r['flops_ratio_one_process']:.3f}× | {r['flops_ratio_per_rank']:.3f}× "
                     f"| {max(r['bytes_sent_per_rank']) / 2 ** 20:.2f} MiB | {r['max_level_diff_vs_one_process']} "
                     f"| {q} | {r['seconds_one_process']:.2f} | {r['seconds_parallel']:.2f} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
