"""CPU benchmark of patch parallelism on 2 and 4 gloo processes (see benchmarks/results/parallel.md).

Per model and mode: per-call agreement with the single-device denoiser (replaying the calls of a single-device
sampling run), bytes per call per kind summed over ranks, and overlap: time per displaced call with asynchronous
transfers vs compute only (transfers skipped) vs blocking transfers; hidden fraction = 1 - exposed / total
communication time. The gloo processes share the machine's cores, so wall-clock speedups are not meaningful here.

    python benchmarks/parallel_cpu.py --world 2 4 --out benchmarks/results/parallel
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path


def fmt_bytes(b: float) -> str:
    return f"{b / 1024:.1f} KiB" if b < 1024 ** 2 else f"{b / 1024 ** 2:.2f} MiB"


def to_markdown(results: list[dict], args) -> str:
    lines = [f"Command: `python benchmarks/parallel_cpu.py --world {' '.join(map(str, args.world))} "
             f"--setups {' '.join(args.setups)} --steps {args.steps} --warmup {args.warmup} "
             f"--fraction {args.fraction} --repeats {args.repeats}`", "",
             "| model | latent | N | mode | max rel. err per call | bytes/call, all ranks (attn / halo / GN / out) "
             "| PCPP / displaced bytes | s/call async | compute only | blocking | hidden |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        modes = res["modes"]
        disp_total = sum(modes.get("displaced", {}).get("bytes_per_call_by_kind_all_ranks", {}).values()) or None
        for mode, row in modes.items():
            lat = "x".join(map(str, res["latent_hw"]))
            if "error" in row:
                lines.append(f"| {res['setup']} | {lat} | {res['world']} | {mode} | refused: {row['error']} "
                             "| | | | | | |")
                continue
            k = row["bytes_per_call_by_kind_all_ranks"]
            total = sum(k.values())
            kinds = " / ".join(fmt_bytes(k[x]) for x in ("attn_kv", "conv_halo", "gn_stats", "output"))
            ratio = f"{total / disp_total:.2f}" if mode == "pcpp" and disp_total else ""
            t = row.get("seconds_per_displaced_call")
            timing = (f"{t['async']:.4f} | {t['compute_only']:.4f} | {t['blocking']:.4f} | "
                      f"{row['hidden_fraction']:.0%}" if t and row["hidden_fraction"] is not None else "| | |")
            lines.append(f"| {res['setup']} | {lat} | {res['world']} | {mode} | {row['max_rel_err_per_call']:.2e} "
                         f"| {fmt_bytes(total)} ({kinds}) | {ratio} | {timing} |")
    return "\n".join(lines)


def cost_model_check(results: list[dict]) -> str:
    """`parallel.cost_model`'s per-rank bytes for the same model and size next to the measured sync call.

    The cost model measures a workload on the meta device at bf16 (2 bytes); the runs here are fp32, so its K/V and
    halo bytes are doubled (GroupNorm statistics are fp32 in both). It counts what an interior rank sends (halo rows
    both ways for every k>1 conv), so it is an upper bound for the edge ranks of a UNet and does not count the
    output gather."""
    from diffaccel.parallel import cost_model
    from diffaccel.parallel.parallelize import find_denoiser
    from diffaccel.zoo import load

    lines = ["| model | N | K/V per rank: cost model / measured | halo: model / measured max rank "
             "| GN stats: model / measured max rank |", "|---|---|---|---|---|"]
    for res in results:
        if res["setup"] not in ("random-flux", "random-sdxl") or "error" in res["modes"].get("sync", {"error": 1}):
            continue
        cfg = {k: v for k, v in dict(find_denoiser(load(res["setup"])).config).items() if not k.startswith("_")}
        shape = res["sample_shape"]
        if res["setup"] == "random-flux":  # flux_dev_workload takes pixels at VAE factor 8: 16 px per token
            side = int(round(shape[1] ** 0.5))
            work = cost_model.flux_dev_workload(16 * side, 16 * side, text_tokens=res["text_tokens"], config=cfg)
        else:
            work = cost_model.sdxl_unet_workload(8 * shape[2], 8 * shape[3], batch=shape[0], config=cfg)
        n = res["world"]
        per_rank = res["modes"]["sync"]["bytes_per_call_by_kind_per_rank"]
        kv_model = 2 * work.kv_bytes * (n - 1) / n
        meas = {k: max(r[k] for r in per_rank) for k in ("attn_kv", "conv_halo", "gn_stats")}
        lines.append(f"| {res['setup']} | {n} | {fmt_bytes(kv_model)} / {fmt_bytes(meas['attn_kv'])} "
                     f"| {fmt_bytes(2 * work.halo_bytes)} / {fmt_bytes(meas['conv_halo'])} "
                     f"| {fmt_bytes(work.norm_bytes)} / {fmt_bytes(meas['gn_stats'])} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, nargs="+", default=[2, 4])
    p.add_argument("--setups", nargs="+", default=["random-sd", "random-dit", "digits-sd"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--fraction", type=float, default=0.3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/parallel"))
    args = p.parse_args()

    import parallel_workers as _bench  # this folder (the script's) is on sys.path
    from distributed import run_distributed

    results = []
    for world in args.world:
        print(f"world {world} ...", file=sys.stderr, flush=True)
        t0 = time.time()
        res = run_distributed(_bench.bench, world, args.setups, args.steps, args.warmup, args.fraction,
                              args.repeats, timeout_s=3600)
        print(f"  {time.time() - t0:.0f} s", file=sys.stderr)
        results += res[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": f"{platform.machine()} CPU, {platform.processor() or 'unknown'}", "results": results}
    args.out.with_suffix(".json").write_text(json.dumps(meta, indent=1, default=str))
    md = to_markdown(results, args)
    if any(r["setup"] in ("random-flux", "random-sdxl") for r in results):
        md += "\n\nCost model (parallel/cost_model.py) vs measured bytes, sync calls:\n\n" + cost_model_check(results)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
