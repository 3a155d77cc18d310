"""torch.compile (inductor, CPU) with and without a cache: regional compilation keeps the cache decisions outside.

`digits-sd`, 50 DDIM steps, CFG 7.5, one batch of images: eager, eager + branch reuse plan, regional compile
(`unet.compile_repeated_blocks`, inductor) and regional compile + the same plan. Compile time (first loop minus the
steady median) is reported apart from the steady loop time (median of --repeats, interleaved), with dynamo's graph
and graph-break counts.

    python benchmarks/compile_cache.py --plan digits-sd-50-branch-reuse-2.15x --images 8 --repeats 3 \
        --out benchmarks/results/compile_cache.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from diffaccel.caching import apply_branch_reuse, remove_branch_reuse
from diffaccel.core import make_generators
from diffaccel.core.timing import log
from diffaccel.zoo import caption, load
from diffusers import DDIMScheduler


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plan", default="digits-sd-50-branch-reuse-2.15x")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = load("digits-sd")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    kw = {"prompt": [caption(i % 10) for i in range(args.images)], "num_inference_steps": 50, "guidance_scale": 7.5,
          "output_type": "np"}

    def loop():
        return pipe(generator=make_generators(0, args.images), **kw).images

    def cached():
        apply_branch_reuse(pipe, args.plan)
        try:
            return loop()
        finally:
            remove_branch_reuse(pipe)

    from torch._dynamo.utils import counters

    rows: dict[str, dict] = {}
    methods = {"eager": loop, "eager+plan": cached}
    for name, fn in methods.items():
        t0 = time.perf_counter()
        fn()
        rows[name] = {"first_s": time.perf_counter() - t0, "steady_s": []}
    torch._dynamo.reset()
    counters.clear()
    pipe.unet.compile_repeated_blocks()  # inductor, default mode
    for name, fn in (("compiled", loop), ("compiled+plan", cached)):
        t0 = time.perf_counter()
        fn()
        rows[name] = {"first_s": time.perf_counter() - t0, "steady_s": []}
        log(f"{name}: first loop {rows[name]['first_s']:.1f} s")
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    fns = {"eager": loop, "eager+plan": cached, "compiled": loop, "compiled+plan": cached}
    for rep in range(args.repeats):
        for name, fn in fns.items():
            if name.startswith("eager"):
                for m in pipe.unet.modules():  # run the same blocks uncompiled for the eager rows
                    m.__dict__["_saved_compiled"] = m.__dict__.pop("_compiled_call_impl", None)
            t0 = time.perf_counter()
            fn()
            rows[name]["steady_s"].append(time.perf_counter() - t0)
            if name.startswith("eager"):
                for m in pipe.unet.modules():
                    saved = m.__dict__.pop("_saved_compiled", None)
                    if saved is not None:
                        m.__dict__["_compiled_call_impl"] = saved
        log(f"repeat {rep}: " + ", ".join(f"{n} {r['steady_s'][-1]:.2f} s" for n, r in rows.items()))
    for r in rows.values():
        r["median_s"] = statistics.median(r["steady_s"])
    for name in ("compiled", "compiled+plan"):
        rows[name]["compile_s"] = rows[name]["first_s"] - rows[name]["median_s"]
    base = rows["eager"]["median_s"]
    for r in rows.values():
        r["speedup_vs_eager"] = base / r["median_s"]
    rows["compiled+plan"]["speedup_vs_compiled"] = rows["compiled"]["median_s"] / rows["compiled+plan"]["median_s"]
    summary = {"model": "digits-sd", "steps": 50, "images": args.images, "plan": args.plan,
               "threads": args.threads, "machine": f"{os.cpu_count()}-core {platform.machine()} CPU, torch "
               f"{torch.__version__}", "dynamo_graphs": graphs, "graph_breaks": breaks, "rows": rows,
               "command": "python benchmarks/compile_cache.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    text = json.dumps(summary, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
