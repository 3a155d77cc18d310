"""CPU/gloo benchmark worker for `benchmarks/parallel_cpu.py` (importable so spawned ranks can unpickle it).

For one model it records the denoiser calls of a single-device sampling run (inputs and outputs), replays them
through the parallelised denoiser in every mode and reports, per mode: the per-call relative error against the
single-device output (the replay removes the sampler's amplification of earlier differences), bytes per call per
kind, and the time per displaced call with asynchronous, skipped (compute only) and blocking transfers.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
import torch.distributed as dist
from diffaccel.parallel.config import PatchParallelConfig, PatchParallelError
from diffaccel.parallel.parallelize import find_denoiser, parallelize

SETUPS = {
    # name: (zoo entry, pipeline kwargs)
    "random-sd": ("random-sd", dict(prompt=["a handwritten digit 3"], height=64, width=64, guidance_scale=5.0,
                                    output_type="latent")),
    "random-dit": ("random-dit", dict(class_labels=[3], guidance_scale=4.0, output_type="pt")),
    "digits-sd": ("digits-sd", dict(prompt=["a handwritten digit three"], guidance_scale=5.0,
                                    output_type="latent")),
    # the modern families at 64x64 pixels: VAE factor 2, so Flux has 16x16 packed tokens, SD3 16x16 patch tokens
    # (batch 2: CFG) and the SDXL UNet a 32x32 latent (batch 2: CFG)
    "random-flux": ("random-flux", dict(prompt=["a handwritten digit 3"], height=64, width=64,
                                        output_type="latent")),
    "random-sd3": ("random-sd3", dict(prompt=["a handwritten digit 3"], height=64, width=64, guidance_scale=4.0,
                                      output_type="latent")),
    "random-sdxl": ("random-sdxl", dict(prompt=["a handwritten digit 3"], height=64, width=64,
                                        guidance_scale=5.0, output_type="latent")),
}


def record_calls(pipe, kwargs: dict[str, Any], steps: int) -> list[tuple[tuple, dict, torch.Tensor]]:
    """(args, kwargs, output) of every denoiser call in a single-device run."""
    model = find_denoiser(pipe)
    calls: list = []

    def hook(mod, args, kw, out):
        y = out[0] if isinstance(out, tuple) else out.sample
        calls.append((tuple(a.clone() if torch.is_tensor(a) else a for a in args),
                      {k: (v.clone() if torch.is_tensor(v) else v) for k, v in kw.items()}, y.clone()))

    h = model.register_forward_hook(hook, with_kwargs=True)
    try:
        pipe(**kwargs, num_inference_steps=steps, generator=torch.Generator().manual_seed(0))
    finally:
        h.remove()
    return calls


def replay(model, calls, handle) -> tuple[list[torch.Tensor], list[float]]:
    handle.reset()
    outs, times = [], []
    with torch.no_grad():
        for args, kw, _ in calls:
            t0 = time.perf_counter()
            out = model(*args, **kw)
            times.append(time.perf_counter() - t0)
            outs.append(out[0] if isinstance(out, tuple) else out.sample)
    dist.barrier()
    return outs, times


def bench_model(rank: int, world: int, setup: str, steps: int, warmup: int, fraction: float,
                repeats: int) -> dict[str, Any]:
    from diffaccel import zoo

    name, kwargs = SETUPS[setup]
    pipe = zoo.load(name)
    pipe.set_progress_bar_config(disable=True)
    model = find_denoiser(pipe).eval()
    calls = record_calls(pipe, kwargs, steps)
    first = calls[0][0][0] if calls[0][0] else calls[0][1].get("sample", calls[0][1].get("hidden_states"))
    latent_hw = tuple(first.shape[2:]) if first.ndim == 4 else (f"{first.shape[1]} tokens",)
    text = calls[0][1].get("encoder_hidden_states")
    rows: dict[str, Any] = {"setup": setup, "world": world, "latent_hw": latent_hw, "calls": len(calls),
                            "sample_shape": tuple(first.shape), "text_tokens": None if text is None else text.shape[1],
                            "warmup_steps": warmup, "pcpp_fraction": fraction, "modes": {}}
    for mode in ("sync", "displaced", "pcpp", "naive"):
        cfg = PatchParallelConfig(mode=mode, warmup_steps=warmup, pcpp_fraction=fraction, timeout_s=120)
        handle = None
        try:
            handle = parallelize(model, cfg)
            outs, _ = replay(model, calls, handle)
        except PatchParallelError as exc:  # e.g. a latent too small for this many ranks: a row, not a crash
            rows["modes"][mode] = {"error": str(exc)}
            if handle is not None:
                handle.remove()
            continue
        errs = [float((o - c[2]).abs().max() / c[2].abs().max()) for o, c in zip(outs, calls, strict=True)]
        after = errs[warmup + 1:] if mode != "sync" else errs
        summary = handle.meter.summary()["phases"]
        phase = "sync" if mode == "sync" else "displaced"
        per_rank = [None] * world
        dist.all_gather_object(per_rank, summary[phase]["wire_bytes_per_call"])
        row: dict[str, Any] = {"max_rel_err_per_call": max(after), "median_rel_err_per_call": statistics.median(after),
                               "bytes_per_call_by_kind_all_ranks": {k: sum(r[k] for r in per_rank)
                                                                     for k in per_rank[0]},
                               "bytes_per_call_max_rank": max(sum(r.values()) for r in per_rank),
                               "bytes_per_call_by_kind_per_rank": per_rank}
        handle.remove()
        if mode in ("displaced", "pcpp"):  # overlap: async vs compute-only vs fully blocking transfers
            timing = {}
            for variant, extra in (("async", {}), ("compute_only", {"skip_transfers": True}),
                                   ("blocking", {"blocking_transfers": True})):
                ts = []
                for _ in range(repeats):
                    h = parallelize(model, PatchParallelConfig(mode=mode, warmup_steps=warmup,
                                                               pcpp_fraction=fraction, timeout_s=120, **extra))
                    _, times = replay(model, calls, h)
                    h.remove()
                    ts.append(sum(times[warmup + 1:]) / len(times[warmup + 1:]))
                timing[variant] = statistics.median(ts)
            slowest = [None] * world
            dist.all_gather_object(slowest, timing)
            t = {k: max(s[k] for s in slowest) for k in timing}  # the slowest rank sets the pace
            exposed, total = t["async"] - t["compute_only"], t["blocking"] - t["compute_only"]
            row["seconds_per_displaced_call"] = t
            row["hidden_fraction"] = (1 - exposed / total) if total > 0 else None
        rows["modes"][mode] = row
    return rows


def bench(rank: int, world: int, setups: list[str], steps: int, warmup: int, fraction: float,
          repeats: int) -> list[dict[str, Any]]:
    return [bench_model(rank, world, s, steps, warmup, fraction, repeats) for s in setups]
