"""HarmoniCa cache plans vs FORA, random plans and the ablations: quality on digits-dit, speed on DiT-XL/2 size.

    python benchmarks/harmonica.py quality --num-images 300     # digits-dit, 20 DDIM steps, CFG 4 (harness rows)
    python benchmarks/harmonica.py speed --threads 1            # random-dit-xl-2, 256 px, the same plans resampled
    python benchmarks/harmonica.py report                       # markdown table + PNG (FID vs speed-up)

Quality rows go through the shared harness `diffaccel.evals.evaluate` (FID/KID on digits-features against the zoo
test split, class accuracy, FLOPs per image) with the same per-image seeds for every row. Rows: no cache, FORA
N=2/3, every shipped plan of `caching/plans/` (HarmoniCa at several β, the --no-sdt and --no-iepo ablations), and
a random plan at the usage ratio of each HarmoniCa plan. The transformer FLOPs ratio comes from per-unit FLOPs
(`unit_flops`) and the plan.

Speed: the 20-step DDIM transformer loop of the DiT-XL/2 256 px architecture (random weights, 32x32x4 latents,
one image, no CFG) with each plan mapped onto 28 blocks by relative depth (`resample_plan`; same usage ratio up to
rounding), in ONE process. Full loops cost minutes each on the shared CPU, so: (1) `--repeats` loops whose steps
cycle through four unit patterns (all computed / attention reused / MLP reused / all reused) give interleaved
per-call times, from which every plan's loop time is predicted (linear in the reused attention and MLP units; the
all-reused call checks the additivity); (2) for the plans in `--loop-rows`, real cached loops alternate with plain
loops, and the speed-up is the mean of the plain loops right before and after divided by the cached loop. Results
are appended as JSON lines, so a cut run keeps what finished. Progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from diffaccel import zoo
from diffaccel.caching import (
    CachedPipeline,
    CachePlan,
    apply_cache_plan,
    fora_plan,
    random_plan,
    remove_cache_plan,
    shipped_plans,
)
from diffaccel.caching.harmonica import example_inputs, plan_flops_ratio, resample_plan, unit_flops
from diffaccel.core.timing import log
from diffaccel.samplers.loop import sample

RESULTS = Path(__file__).resolve().parent / "results"
STEPS = 20
GUIDANCE = 4.0


def machine() -> str:
    return f"{platform.machine()} CPU ({os.cpu_count()} cores, shared), torch {torch.__version__}"


def plans_for(pipe, steps: int, rows: list[str] | None) -> dict[str, CachePlan | None]:
    """The benchmark's rows in order: name -> plan (None = no cache)."""
    out: dict[str, CachePlan | None] = {"no cache": None}
    units = len(pipe.transformer.transformer_blocks) * 2
    for n in (2, 3):
        out[f"FORA N={n}"] = fora_plan(steps, units, n, model=pipe)
    shipped = {name: CachePlan.load(path) for name, path in shipped_plans().items()
               if name.startswith(f"digits-dit-{steps}-")}
    for name, plan in shipped.items():
        out[name.removeprefix(f"digits-dit-{steps}-")] = plan
    for name, plan in shipped.items():
        if "-harmonica-" in name:
            short = name.removeprefix(f"digits-dit-{steps}-")
            out[f"random @ {short}"] = random_plan(steps, units, plan.usage_ratio, seed=0, model=pipe)
    if rows:
        out = {k: v for k, v in out.items() if k in rows}
    return out


def append(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def load(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def cmd_quality(args: argparse.Namespace) -> None:
    from diffaccel.evals import evaluate

    torch.set_num_threads(args.threads)
    pipe = zoo.load("digits-dit")
    pipe.set_progress_bar_config(disable=True)
    total, per_unit = unit_flops(pipe.transformer, **example_inputs(pipe.transformer, batch=2))
    done = {r["row"] for r in load(args.out) if r["num_images"] == args.num_images} if args.resume else set()
    for name, plan in plans_for(pipe, STEPS, args.rows).items():
        if name in done:
            continue
        log(f"{name}: {args.num_images} images")
        target = pipe
        if plan is not None:
            apply_cache_plan(pipe, plan)
            target = CachedPipeline(pipe)
        try:
            res = evaluate(target, None, args.num_images, args.seed, name=name, batch_size=args.batch_size,
                           num_inference_steps=STEPS, guidance_scale=GUIDANCE)
        finally:
            if plan is not None:
                remove_cache_plan(pipe)
        row = {"row": name, "num_images": args.num_images, "seed": args.seed, "steps": STEPS, "guidance": GUIDANCE,
               "usage_ratio": 0.0 if plan is None else plan.usage_ratio,
               "transformer_flops_ratio": 1.0 if plan is None else plan_flops_ratio(plan, total, per_unit),
               "fid": res.fid, "kid": res.kid_mean, "class_accuracy": res.class_accuracy,
               "seconds_per_image": res.seconds_per_image, "flops_per_image": res.flops_per_image,
               "extractor": res.extractor, "n_b": res.n_b, "threads": args.threads, "machine": machine(),
               "plan_metadata": None if plan is None else plan.metadata}
        append(args.out, row)
        log(f"  FID {res.fid:.3f}  acc {res.class_accuracy:.3f}  usage {row['usage_ratio']:.1%}  "
            f"FLOPs ratio {row['transformer_flops_ratio']:.3f}  s/img {res.seconds_per_image:.4f}")


@torch.no_grad()
def xl_loop(transformer, scheduler, x: torch.Tensor, label: torch.Tensor, times: list[float] | None = None) -> float:
    """One 20-step DDIM loop of the transformer (no VAE, no CFG); returns seconds (per-call seconds into `times`)."""
    scheduler.set_timesteps(STEPS)
    started = [0.0]  # start of the current step: its model call plus its scheduler step go into `times`

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        started[0] = time.perf_counter()
        return transformer(x, timestep=t.reshape(1), class_labels=label).sample[:, :4]

    def step_time(info: dict[str, Any]) -> None:
        times.append(time.perf_counter() - started[0])

    t0 = time.perf_counter()
    sample(model, x, scheduler.timesteps, callback=None if times is None else step_time, scheduler=scheduler)
    return time.perf_counter() - t0


UNIT_PATTERNS = ("full", "no-attn", "no-ff", "none")


def pattern_row(pattern: str, units: tuple[str, ...], blocks: int) -> list[bool]:
    """A plan row computing every unit except the reused kind(s)."""
    reuse = {"full": (), "no-attn": ("attn1",), "no-ff": ("ff",), "none": units}[pattern]
    return [u not in reuse for _ in range(blocks) for u in units]


def predicted_loop(plan: CachePlan, t: dict[str, float], units: tuple[str, ...]) -> float:
    """Loop seconds of a plan from per-call times: T(row) = T_full - (a/A) (T_full - T_no-attn) - (f/F) (T_full -
    T_no-ff), a / f = reused attention / MLP units of the row out of A / F (linear in the reused units)."""
    n = plan.num_units // len(units)
    is_attn = torch.tensor([u == "attn1" for u in units] * n)
    is_ff = torch.tensor([u == "ff" for u in units] * n)
    total = 0.0
    for reused in ~plan.mask:
        a, f = int((reused & is_attn).sum()), int((reused & is_ff).sum())
        total += t["full"] - a / n * (t["full"] - t["no-attn"]) - f / n * (t["full"] - t["no-ff"])
    return total


def cmd_speed(args: argparse.Namespace) -> None:
    """Per-call times of the four unit patterns interleaved in one loop (`--repeats` loops), a prediction for every
    plan from them, and real alternating plain / cached loops for the plans in --loop-rows."""
    torch.set_num_threads(args.threads)
    pipe = zoo.load("digits-dit")
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    xl = zoo.load("random-dit-xl-2")
    total, per_unit = unit_flops(xl, **example_inputs(xl, batch=1))
    units, blocks = ("attn1", "ff"), len(xl.transformer_blocks)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 32, 32, generator=g)
    label = torch.zeros(1, dtype=torch.long)
    plans = {k: v for k, v in plans_for(pipe, STEPS, args.rows).items() if v is not None}
    log(f"DiT-XL/2: {total / 1e9:.1f} GFLOP per call, units {sum(per_unit) / total:.1%} of it; "
        f"{len(plans)} plans, {args.threads} threads")
    # one 20-step loop whose rows cycle through the four patterns (row 0 computes and fills the caches)
    rows = [[True] * (blocks * 2)] + [pattern_row(UNIT_PATTERNS[(s - 1) % 4], units, blocks) for s in range(1, STEPS)]
    probe = CachePlan(torch.tensor(rows), "DiTTransformer2DModel", blocks, units)
    samples: dict[str, list[float]] = {p: [] for p in UNIT_PATTERNS}
    for rep in range(args.repeats):
        times: list[float] = []
        apply_cache_plan(xl, probe, timesteps_callback=lambda: scheduler.timesteps)
        try:
            xl_loop(xl, scheduler, x, label, times)
        finally:
            remove_cache_plan(xl)
        for s in range(1, STEPS):
            samples[UNIT_PATTERNS[(s - 1) % 4]].append(times[s])
        log(f"pattern loop {rep + 1}/{args.repeats}: " + ", ".join(
            f"{p} {statistics.median(v):.2f} s" for p, v in samples.items()))
    per_call = {p: statistics.median(v) for p, v in samples.items()}
    additive = per_call["full"] - (per_call["full"] - per_call["no-attn"]) - (per_call["full"] - per_call["no-ff"])
    log(f"additivity check: T_none measured {per_call['none']:.2f} s vs predicted {additive:.2f} s")
    plain_pred = STEPS * per_call["full"]
    for name, plan in plans.items():
        big = resample_plan(plan, xl)
        pred = predicted_loop(big, per_call, units)
        row = {"row": name, "kind": "predicted", "usage_ratio_digits": plan.usage_ratio,
               "usage_ratio_xl": big.usage_ratio, "flops_ratio_xl": plan_flops_ratio(big, total, per_unit),
               "speedup": plain_pred / pred, "per_call_s": per_call, "samples": samples,
               "none_predicted_s": additive, "threads": args.threads, "machine": machine()}
        append(args.speed_out, row)
        log(f"{name}: predicted {plain_pred / pred:.3f}x (FLOPs ratio {row['flops_ratio_xl']:.3f})")
    loop_plans = {k: v for k, v in plans.items() if k in (args.loop_rows or [])}
    if not loop_plans:
        return
    prev = xl_loop(xl, scheduler, x, label)
    log(f"plain loop {prev:.1f} s")
    for name, plan in loop_plans.items():
        big = resample_plan(plan, xl)
        apply_cache_plan(xl, big, timesteps_callback=lambda: scheduler.timesteps)
        try:
            cached = xl_loop(xl, scheduler, x, label)
        finally:
            remove_cache_plan(xl)
        after = xl_loop(xl, scheduler, x, label)
        plain = (prev + after) / 2
        row = {"row": name, "kind": "loop", "usage_ratio_digits": plan.usage_ratio, "usage_ratio_xl": big.usage_ratio,
               "flops_ratio_xl": plan_flops_ratio(big, total, per_unit), "plain_s": plain, "plain_before_s": prev,
               "plain_after_s": after, "cached_s": cached, "speedup": plain / cached,
               "predicted_speedup": plain_pred / predicted_loop(big, per_call, units), "threads": args.threads,
               "machine": machine()}
        append(args.speed_out, row)
        log(f"{name}: loop cached {cached:.1f} s, plain {prev:.1f}/{after:.1f} s -> {plain / cached:.3f}x "
            f"(predicted {row['predicted_speedup']:.3f}x, FLOPs ratio {row['flops_ratio_xl']:.3f})")
        prev = after


COMMANDS = [
    "python benchmarks/harmonica.py quality --num-images 300 --resume",
    "python benchmarks/harmonica.py quality --num-images 300 --seed 300 --rows 'no cache' 'FORA N=2' harmonica-b1 "
    "--out benchmarks/results/harmonica_quality_seed300.jsonl",
    "python benchmarks/harmonica.py quality --num-images 1000 --seed 1000 --threads 2 --rows 'no cache' 'FORA N=2' "
    "'FORA N=3' harmonica-b1 harmonica-b2 harmonica-b4 --out benchmarks/results/harmonica_quality_n1000.jsonl",
    "python benchmarks/harmonica.py speed --threads 1 --repeats 2 --loop-rows harmonica-b1 'FORA N=2' harmonica-b2 "
    "'FORA N=3'",
    "python benchmarks/harmonica.py speed --threads 1 --repeats 1 --rows harmonica-b4 no-sdt-b2 no-iepo-b2 "
    "harmonica-b2-t180 --loop-rows harmonica-b4 no-sdt-b2 no-iepo-b2 harmonica-b2-t180",
    "python benchmarks/harmonica.py report --num-images 300 --extra benchmarks/results/harmonica_quality_seed300.jsonl "
    "benchmarks/results/harmonica_quality_n1000.jsonl",
]
ORDER = ("no cache", "FORA", "harmonica-b", "harmonica-cw", "no-sdt", "no-iepo", "random")


def _order(name: str) -> tuple[int, str]:
    return next((i for i, k in enumerate(ORDER) if name.startswith(k)), len(ORDER)), name


def cmd_report(args: argparse.Namespace) -> None:
    rows = sorted((r for r in load(args.out) if r["num_images"] == args.num_images), key=lambda r: _order(r["row"]))
    speed: dict[str, dict] = {}
    for r in load(args.speed_out):  # a measured loop wins over a prediction
        if r["row"] not in speed or r["kind"] == "loop":
            speed[r["row"]] = r
    loops = [r for r in load(args.speed_out) if r["kind"] == "loop"]
    pattern = next((r for r in load(args.speed_out) if r["kind"] == "predicted"), None)
    if not rows:
        raise SystemExit(f"no quality rows with {args.num_images} images in {args.out}")
    base = next((r for r in rows if r["row"] == "no cache"), None)
    lines = ["## HarmoniCa on digits-dit (20 DDIM steps, CFG 4) and DiT-XL/2-size speed", "",
             f"Machine: {rows[0]['machine']}. Quality: {args.num_images} images per row, seeds "
             f"{rows[0]['seed']}..{rows[0]['seed'] + args.num_images - 1} (the same for every row), FID/KID "
             f"{rows[0]['extractor']} vs the zoo digits test split (n={rows[0]['n_b']}), class accuracy by "
             "digits-features. Usage = cache-usage ratio (reused (step, unit) pairs / all). FLOPs ratio = "
             "transformer FLOPs plain / cached from per-unit FLOPs. XL speed-up = measured wall-clock ratio of the "
             "20-step transformer loop of the DiT-XL/2 256 px architecture (random weights, batch 1) with the plan "
             "mapped to 28 blocks, plain and cached loops alternating in one process (`speed`). digits-dit s/img "
             "is the harness's median per-image time of the tiny model (overhead-dominated, shared CPU: noisy).",
             "", "| row | usage | FLOPs ratio (digits-dit) | FID | ΔFID | KID×1e3 | accuracy | s/img digits-dit | "
                 "XL usage | XL FLOPs ratio | XL wall speed-up |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = speed.get(r["row"])
        dfid = "—" if base is None else f"{r['fid'] / base['fid'] - 1:+.1%}"
        xl = ("—", "—", "—") if s is None else (f"{s['usage_ratio_xl']:.1%}", f"{s['flops_ratio_xl']:.3f}×",
                                                f"{s['speedup']:.3f}×" + (" (loop)" if s["kind"] == "loop" else ""))
        lines.append(f"| {r['row']} | {r['usage_ratio']:.1%} | {r['transformer_flops_ratio']:.3f}× | {r['fid']:.3f} | "
                     f"{dfid} | {r['kid'] * 1e3:.2f} | {r['class_accuracy']:.3f} | {r['seconds_per_image']:.4f} | "
                     f"{xl[0]} | {xl[1]} | {xl[2]} |")
    if pattern is not None:
        pc = pattern["per_call_s"]
        lines += ["", f"XL per-call seconds (median of {len(pattern['samples']['full'])} interleaved calls each, "
                  f"{pattern['threads']} threads): all units {pc['full']:.2f}, attention reused {pc['no-attn']:.2f}, "
                  f"MLP reused {pc['no-ff']:.2f}, all reused {pc['none']:.2f} (linear prediction "
                  f"{pattern['none_predicted_s']:.2f}). XL speed-ups without '(loop)' are predicted from these "
                  "per-call times and the plan's reused units per step."]
    for r in loops:
        lines.append(f"Measured loop, {r['row']}: plain {r['plain_before_s']:.1f} / {r['plain_after_s']:.1f} s "
                     f"(before / after), cached {r['cached_s']:.1f} s -> {r['speedup']:.3f}× "
                     f"(predicted {r['predicted_speedup']:.3f}×).")
    for extra in args.extra or []:
        xrows = load(extra)
        xbase = next((r for r in xrows if r["row"] == "no cache"), None)
        if not xrows or xbase is None:
            continue
        lines += ["", f"Check with other samples ({extra.name}: {xrows[0]['num_images']} images, seeds from "
                  f"{xrows[0]['seed']}): " + "; ".join(
                      f"{r['row']} FID {r['fid']:.3f} ({r['fid'] / xbase['fid'] - 1:+.1%})" for r in xrows) + "."]
    run1 = RESULTS / "harmonica_speed_run1.jsonl"
    if run1.exists():
        lines += ["", "Not used: `harmonica_speed_run1.jsonl`, an earlier speed run under heavy CPU contention (its "
                  "plain loops took 233 / 115 / 92 s in a row, and one cached loop came out faster than the FLOPs "
                  "ratio allows); kept as a record of why the loops were re-timed on a quieter machine."]
    lines += ["", "What the rows say, and the caveats: `caching/README.md` (HarmoniCa, results so far)."]
    lines += ["", "Commands that produced these files (quality rows were added with --resume as plans were trained):",
              "", "```", *COMMANDS, "```", ""]
    md = RESULTS / "harmonica.md"
    md.write_text("\n".join(lines))
    plot(rows, speed, RESULTS / "harmonica_fid_vs_speedup.png")
    print("\n".join(lines))


def plot(rows: list[dict], speed: dict[str, dict], path: Path) -> None:
    """FID vs speed-up (XL wall clock where measured, else digits-dit FLOPs ratio); FORA rows joined."""
    from plots import labelled_scatter

    pts = []
    for r in rows:
        s = speed.get(r["row"])
        x = 1.0 if r["row"] == "no cache" else (s["speedup"] if s else None)
        if x is not None:
            pts.append((r["row"], x, r["fid"]))
    if pts:
        labelled_scatter(pts, path, "digits-dit FID (20 steps) vs DiT-XL/2-size wall speed-up (measured loop or "
                         "per-call prediction)", "wall speed-up (x)", "FID (digits-features)",
                         line=[p[0] for p in pts if p[0] == "no cache" or p[0].startswith("FORA")])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["quality", "speed", "report"])
    ap.add_argument("--num-images", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", nargs="+", default=None, help="only these rows (names as in the table)")
    ap.add_argument("--repeats", type=int, default=2, help="speed: pattern loops (each gives ~5 calls per pattern)")
    ap.add_argument("--loop-rows", nargs="+", default=None, help="speed: also time real alternating loops of these")
    ap.add_argument("--extra", type=Path, nargs="*", default=None, help="report: more quality files to summarise")
    ap.add_argument("--resume", action="store_true", help="quality: skip rows already in --out")
    ap.add_argument("--out", type=Path, default=RESULTS / "harmonica_quality.jsonl")
    ap.add_argument("--speed-out", type=Path, default=RESULTS / "harmonica_speed.jsonl")
    args = ap.parse_args(argv)
    {"quality": cmd_quality, "speed": cmd_speed, "report": cmd_report}[args.command](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
