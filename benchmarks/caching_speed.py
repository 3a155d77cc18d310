"""Encoder propagation speed on the SD-1.5-size or SDXL-size UNet (random weights): FLOPs ratio and speed-up.

Runs a DDIM denoising loop over `zoo.load("random-sd15-unet")` (859M parameters; `--model random-sdxl-unet`: the
SDXL base UNet, 2.57B, with its `added_cond_kwargs`) three ways, interleaved so that
machine noise hits all of them alike: the plain UNet, encoder propagation with sequential decoding, and with
parallel decoding. FLOPs per UNet call come from `core.flops.flop_counter` on one full call and one
non-key (decoder-only) call; the schedule's FLOPs ratio is `N F_full / (K F_full + (N - K) F_dec)`. Wall time
and process CPU time are both reported: on a shared machine CPU time is the one other processes barely disturb.

    python benchmarks/caching_speed.py --steps 25 50 --resolution 256 --batch 1 --repeats 1
    python benchmarks/caching_speed.py --model random-sdxl-unet --per-call --steps 28 50 --resolution 512 --batch 2

Progress goes to stderr, a JSON summary to stdout (and to --out).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from diffaccel import zoo
from diffaccel.caching import (
    EncoderPropagationConfig,
    apply_encoder_propagation,
    encoder_propagation_counters,
    get_schedule,
    remove_encoder_propagation,
    reset_caches,
)
from diffaccel.core.flops import flop_counter
from diffaccel.core.timing import log
from diffaccel.samplers.loop import sample
from diffusers import DDIMScheduler


def sd_ddim() -> DDIMScheduler:
    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def schedule_for(name: str, steps: int) -> str:
    if name == "auto":
        return "sd50" if steps == 50 else "sd50-scaled"
    return name


@torch.no_grad()
def denoise(unet, scheduler, x0: torch.Tensor, cond: dict, steps: int) -> torch.Tensor:
    """A stock diffusers-style sampling loop (`samplers.loop.sample`): one UNet call and one `scheduler.step` a step."""
    scheduler.set_timesteps(steps)

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return unet(scheduler.scale_model_input(x, t), t, **cond).sample

    return sample(model, x0 * scheduler.init_noise_sigma, scheduler.timesteps, scheduler=scheduler)


@torch.no_grad()
def flops_per_call(unet, x: torch.Tensor, cond: dict) -> tuple[int, int]:
    """FLOPs of a full UNet call and of a non-key (decoder-only) call under encoder propagation."""
    with flop_counter() as full:
        unet(x, torch.tensor(981), **cond)
    apply_encoder_propagation(unet, EncoderPropagationConfig(key_steps=[0], noise_injection=None))
    try:
        unet(x, torch.tensor(981), **cond)
        with flop_counter() as dec:
            unet(x, torch.tensor(961), **cond)
        assert encoder_propagation_counters(unet).encoder_passes == 1
    finally:
        remove_encoder_propagation(unet)
    return full.get_total_flops(), dec.get_total_flops()


@torch.no_grad()
def per_call(unet, x0: torch.Tensor, cond: dict, steps_list: list[int], schedule: str, repeats: int,
             group: int) -> dict:
    """Wall and CPU seconds of single UNet calls, interleaved: plain, hooked key step, hooked non-key step, and a
    batched replay of `group` non-key steps (parallel decoding); loop times for each N are then assembled from them.
    Cheaper than whole loops when the machine is shared (a 50-step SD-1.5 loop is minutes of CPU time)."""
    kinds = ["plain", "key", "nonkey", f"batch{group}"]
    wall: dict[str, list[float]] = {k: [] for k in kinds}
    cpu: dict[str, list[float]] = {k: [] for k in kinds}
    ts = torch.arange(981, 0, -20)

    def timed(kind: str, fn) -> None:
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall[kind].append(time.perf_counter() - t0)
        cpu[kind].append(time.process_time() - c0)

    unet(x0, ts[0], **cond)  # warm-up
    for rep in range(repeats):
        timed("plain", lambda: unet(x0, ts[0], **cond))
        apply_encoder_propagation(unet, EncoderPropagationConfig(
            key_steps=[0], noise_injection=None, parallel=True, max_parallel=group, timesteps_callback=lambda: ts))
        try:
            timed("key", lambda: unet(x0, ts[0], **cond))
            timed("nonkey", lambda: unet(x0, ts[1], **cond))  # first non-key step: decodes `group` steps at once
            wall[f"batch{group}"].append(wall["nonkey"].pop())
            cpu[f"batch{group}"].append(cpu["nonkey"].pop())
            assert encoder_propagation_counters(unet).parallel_batches == 1
        finally:
            remove_encoder_propagation(unet)
        apply_encoder_propagation(unet, EncoderPropagationConfig(key_steps=[0], noise_injection=None))
        try:
            unet(x0, ts[0], **cond)
            timed("nonkey", lambda: unet(x0, ts[1], **cond))
        finally:
            remove_encoder_propagation(unet)
        log(f"per-call rep {rep}: " + ", ".join(f"{k} {cpu[k][-1]:.2f}s cpu / {wall[k][-1]:.2f}s wall" for k in kinds))
    med = {k: sorted(v)[len(v) // 2] for k, v in cpu.items()}
    med_wall = {k: sorted(v)[len(v) // 2] for k, v in wall.items()}
    rows = []
    for steps in steps_list:
        name = schedule_for(schedule, steps)
        keys = get_schedule(name).key_steps(steps)
        k = len(keys)
        out = {"steps": steps, "schedule": name, "num_key_steps": k}
        for label, m in (("cpu", med), ("wall", med_wall)):
            base = steps * m["plain"]
            seq = k * m["key"] + (steps - k) * m["nonkey"]
            out[f"{label}_speedup_sequential"] = base / seq
            par = k * m["key"] + (steps - k) * m[f"batch{group}"] / group
            out[f"{label}_speedup_parallel_batch{group}"] = base / par
        rows.append(out)
    return {"per_call_cpu_s": med, "per_call_wall_s": med_wall, "repeats": repeats, "loops": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["random-sd15-unet", "random-sdxl-unet"], default="random-sd15-unet")
    ap.add_argument("--steps", type=int, nargs="+", default=[25, 50])
    ap.add_argument("--resolution", type=int, default=256, help="image side in pixels (latent side = /8)")
    ap.add_argument("--batch", type=int, default=1, help="UNet batch rows (2 = one image with CFG)")
    ap.add_argument("--schedule", default="auto", help="key-step schedule; auto = sd50 at 50 steps, else sd50-scaled")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON summary here")
    ap.add_argument("--per-call", action="store_true", help="time single calls instead of whole loops")
    ap.add_argument("--group", type=int, default=5, help="steps per batched decoder call in --per-call mode")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    log(f"building {args.model}")
    unet = zoo.load(args.model).eval()
    side = args.resolution // 8
    x0 = torch.randn(args.batch, 4, side, side)
    cond = {"encoder_hidden_states": torch.randn(args.batch, 77, unet.config.cross_attention_dim)}
    if unet.config.addition_embed_type == "text_time":  # SDXL: pooled text embeds + (size, crop, target) ids
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        cond["added_cond_kwargs"] = {"text_embeds": torch.randn(args.batch, pooled),
                                     "time_ids": torch.tensor([[args.resolution] * 2 + [0, 0] +
                                                               [args.resolution] * 2] * args.batch, dtype=torch.float)}
    scheduler = sd_ddim()
    f_full, f_dec = flops_per_call(unet, x0, cond)
    enc_share = 1 - f_dec / f_full
    log(f"FLOPs per call: full {f_full / 1e9:.1f} G, decoder-only {f_dec / 1e9:.1f} G (encoder {enc_share:.1%})")

    header = {"device": "cpu", "threads": args.threads, "dtype": "float32", "model": args.model,
              "resolution": args.resolution, "latent": [side, side], "batch": args.batch,
              "flops_full_per_call": f_full, "flops_decoder_per_call": f_dec, "encoder_flops_share": enc_share}
    if args.per_call:
        result = per_call(unet, x0, cond, args.steps, args.schedule, args.repeats, args.group)
        for row in result["loops"]:
            keys = get_schedule(row["schedule"]).key_steps(row["steps"])
            row["flops_ratio"] = row["steps"] * f_full / (len(keys) * f_full + (row["steps"] - len(keys)) * f_dec)
            row["cpu_sequential_speedup_over_flops_ratio"] = row["cpu_speedup_sequential"] / row["flops_ratio"]
            par = row[f"cpu_speedup_parallel_batch{args.group}"]
            log(f"{row['steps']} steps ({row['schedule']}): FLOPs ratio {row['flops_ratio']:.3f}, CPU-time speed-up "
                f"seq {row['cpu_speedup_sequential']:.3f}, parallel {par:.3f}")
        return emit({**header, "mode": "per-call", **result}, args.out)

    rows = []
    for steps in args.steps:
        name = schedule_for(args.schedule, steps)
        keys = get_schedule(name).key_steps(steps)
        k = len(keys)
        flops_ratio = steps * f_full / (k * f_full + (steps - k) * f_dec)
        times: dict[str, list[float]] = {"baseline": [], "sequential": [], "parallel": []}
        cpu: dict[str, list[float]] = {m: [] for m in times}
        outs: dict[str, torch.Tensor] = {}
        counters = {}
        for rep in range(args.repeats):
            for mode in times:
                if mode != "baseline":
                    cfg = EncoderPropagationConfig(key_steps=name, parallel=mode == "parallel", noise_injection=None,
                                                   timesteps_callback=lambda: scheduler.timesteps)
                    apply_encoder_propagation(unet, cfg)
                reset_caches(unet)
                t0, c0 = time.perf_counter(), time.process_time()
                outs[mode] = denoise(unet, scheduler, x0, cond, steps)
                times[mode].append(time.perf_counter() - t0)
                cpu[mode].append(time.process_time() - c0)
                if mode != "baseline":
                    c = encoder_propagation_counters(unet)
                    counters[mode] = {"encoder_passes": c.encoder_passes, "decoder_passes": c.decoder_passes,
                                      "parallel_batches": c.parallel_batches}
                    remove_encoder_propagation(unet)
                log(f"{steps} steps rep {rep} {mode}: wall {times[mode][-1]:.1f} s, cpu {cpu[mode][-1]:.1f} s")
        med = {m: sorted(v)[len(v) // 2] for m, v in times.items()}
        med_cpu = {m: sorted(v)[len(v) // 2] for m, v in cpu.items()}
        row = {
            "steps": steps, "schedule": name, "key_steps": keys, "num_key_steps": k,
            "flops_ratio": flops_ratio,
            "seconds": med,
            "speedup_sequential": med["baseline"] / med["sequential"],
            "speedup_parallel": med["baseline"] / med["parallel"],
            "cpu_seconds": med_cpu,
            "cpu_speedup_sequential": med_cpu["baseline"] / med_cpu["sequential"],
            "cpu_speedup_parallel": med_cpu["baseline"] / med_cpu["parallel"],
            "parallel_vs_sequential_max_abs": float((outs["parallel"] - outs["sequential"]).abs().max()),
            "counters": counters,
        }
        row["sequential_speedup_over_flops_ratio"] = row["speedup_sequential"] / flops_ratio
        row["cpu_sequential_speedup_over_flops_ratio"] = row["cpu_speedup_sequential"] / flops_ratio
        rows.append(row)
        log(f"{steps} steps: FLOPs ratio {flops_ratio:.3f}, wall speed-up seq {row['speedup_sequential']:.3f} "
            f"par {row['speedup_parallel']:.3f}; CPU-time speed-up seq {row['cpu_speedup_sequential']:.3f} "
            f"par {row['cpu_speedup_parallel']:.3f}")
    return emit({**header, "mode": "loops", "repeats": args.repeats, "rows": rows}, args.out)


def emit(summary: dict, out: Path | None) -> int:
    """Print the JSON summary on stdout and also write it to `out` when given."""
    text = json.dumps(summary, indent=2)
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
