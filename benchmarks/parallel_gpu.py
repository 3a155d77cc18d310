"""GPU benchmark for patch parallelism (prepared; NOT run yet: no GPU machine was available when it was written).

Two uses:

1. One GPU (`python benchmarks/parallel_gpu.py --json out.json`): measures, on full-size random models
   (SD-1.5 UNet at 512/1024 px, DiT-XL/2 at 256/512 px, fp16), the single-device time per call, the time spent
   in each layer type (3x3 convs, GroupNorm, self-attention, the rest; CUDA events around each module), the
   per-call bytes every mode would send for N = 2, 4, 8 (same closed forms the CPU tests verify), and the cost
   of moving those bytes (all-gather-sized device copies, as a lower bound; pass --link-gbps for the
   interconnect). It then prints a PROJECTION of the N-GPU time per call:
       sync:       T1/N + comm_bytes / link                 (every exchange exposed)
       displaced:  max(T1/N, comm_bytes / link)             (exchange hidden behind compute)
       pcpp:       like displaced, with self-attention time scaled by (1 + 2f)/N (fewer keys per query)
   T1/N assumes compute splits evenly (smaller kernels run less efficiently, per-collective latency is ignored),
   so the projection is optimistic. It is a projection from measured compute and an assumed link, not a speedup.

2. Several GPUs (`torchrun --nproc_per_node N benchmarks/parallel_gpu.py --real`): runs the parallelised
   denoiser for real with NCCL in every mode and reports the median time per call against one GPU of the same
   machine (measured on rank 0 with the same script), plus bytes per call per kind from the byte meter.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

SETUPS = {  # name: (zoo entry, latent sizes)
    "sd15-unet": ("random-sd15-unet", [64, 128]),
    "dit-xl-2": ("random-dit-xl-2", [32, 64]),
}
KIND_OF = {"Conv2d": "conv3x3", "GroupNorm": "groupnorm"}


def inputs_for(model: nn.Module, hw: int, batch: int, device, dtype) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, model.config.in_channels, hw, hw, generator=g).to(device, dtype)
    if type(model).__name__ == "UNet2DConditionModel":
        ehs = torch.randn(batch, 77, model.config.cross_attention_dim, generator=g).to(device, dtype)
        return {"sample": x, "timestep": torch.tensor(500, device=device), "encoder_hidden_states": ehs}
    return {"hidden_states": x, "timestep": torch.full((batch,), 500, device=device),
            "class_labels": torch.arange(batch, device=device) % 1000}


def time_call(model, kw, repeats: int) -> float:
    ts = []
    with torch.no_grad():
        for i in range(repeats + 3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(**kw)
            end.record()
            torch.cuda.synchronize()
            if i >= 3:
                ts.append(start.elapsed_time(end) / 1e3)
    return statistics.median(ts)


def per_layer_times(model: nn.Module, kw: dict) -> dict[str, float]:
    """Seconds per call spent in 3x3 convs, GroupNorms and self-attention (CUDA events around each module)."""
    events: list = []

    def pre(mod, args, kind):
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        events.append((kind, e, None))

    def post(mod, args, out, kind):
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        for i in range(len(events) - 1, -1, -1):
            if events[i][0] == kind and events[i][2] is None:
                events[i] = (kind, events[i][1], e)
                break

    hooks = []
    for _, m in model.named_modules():
        cls = type(m).__name__
        kind = None
        if cls == "Conv2d" and m.kernel_size[0] > 1:
            kind = "conv3x3"
        elif cls == "GroupNorm":
            kind = "groupnorm"
        elif cls == "Attention" and not m.is_cross_attention:
            kind = "self_attention"
        if kind:
            hooks.append(m.register_forward_pre_hook(lambda mod, a, k=kind: pre(mod, a, k)))
            hooks.append(m.register_forward_hook(lambda mod, a, o, k=kind: post(mod, a, o, k)))
    with torch.no_grad():
        model(**kw)
    torch.cuda.synchronize()
    for h in hooks:
        h.remove()
    out: dict[str, float] = defaultdict(float)
    for kind, s, e in events:
        out[kind] += s.elapsed_time(e) / 1e3
    return dict(out)


def analytic_bytes(model: nn.Module, kw: dict, n: int, elt: int, fraction: float) -> dict[str, dict[str, float]]:
    """Bytes sent per call by an interior rank, per kind and mode (stride-2 convs send no lower
    halo). Shapes come from one single-device call."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "parallel"))
    from workers import expected_bytes, layer_shapes  # the parallel tests' byte model (tests/parallel/workers.py)

    shapes = layer_shapes(model, kw)
    key = "sample" if "sample" in kw else "hidden_states"
    hw = tuple(kw[key].shape[2:])
    r = 1 if n > 2 else 0
    return {mode: expected_bytes(shapes, hw, n, r, mode, "sync" if mode == "sync" else "displaced", fraction, elt)
            for mode in ("sync", "displaced", "pcpp")}


def copy_seconds(nbytes: int) -> float:
    """Device-to-device copy time for nbytes (a lower bound for any link; NVLink/PCIe are slower)."""
    a = torch.empty(max(1, nbytes // 2), dtype=torch.float16, device="cuda")
    b = torch.empty_like(a)
    ts = []
    for i in range(8):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        torch.cuda.synchronize()
        if i >= 3:
            ts.append(s.elapsed_time(e) / 1e3)
    return statistics.median(ts)


def single_gpu(args) -> dict:
    from diffaccel import zoo

    rows = []
    for setup, (entry, sizes) in SETUPS.items():
        model = zoo.load(entry, device="cuda", dtype=torch.float16).eval()
        for hw in sizes:
            kw = inputs_for(model, hw, args.batch, "cuda", torch.float16)
            t1 = time_call(model, kw, args.repeats)
            layers = per_layer_times(model, kw)
            row = {"setup": setup, "latent": hw, "batch": args.batch, "t1_s": t1, "layer_s": layers, "N": {}}
            for n in (2, 4, 8):
                try:
                    b = analytic_bytes(model, kw, n, 2, args.fraction)
                except Exception as exc:  # e.g. too few rows for n bands
                    row["N"][n] = {"error": str(exc)}
                    continue
                attn = layers.get("self_attention", 0.0)
                # band attention: queries / N but keys stay L (sync, displaced); PCPP keys (1 + 2f) L / N
                compute = {"sync": (t1 - attn) / n + attn / n, "displaced": (t1 - attn) / n + attn / n,
                           "pcpp": (t1 - attn) / n + attn / n * min(1.0, (1 + 2 * args.fraction) / n)}
                proj = {}
                for mode, kinds in b.items():
                    nbytes = sum(kinds.values())
                    link = nbytes / (args.link_gbps * 1e9) if args.link_gbps else copy_seconds(nbytes)
                    proj[mode] = {"bytes_per_call": kinds,
                                  "comm_s": link,
                                  "PROJECTED_s_per_call": (compute[mode] + link if mode == "sync"
                                                           else max(compute[mode], link)),
                                  }
                    proj[mode]["PROJECTED_speedup"] = t1 / proj[mode]["PROJECTED_s_per_call"]
                row["N"][n] = proj
            rows.append(row)
            print(json.dumps(row, default=str), file=sys.stderr, flush=True)
        del model
        torch.cuda.empty_cache()
    return {"device": torch.cuda.get_device_name(), "link_gbps": args.link_gbps or "device copy (lower bound)",
            "note": "PROJECTION from measured single-GPU compute and an assumed link, not a measured speedup",
            "rows": rows}


def real_multi_gpu(args) -> dict:
    import torch.distributed as dist
    from diffaccel import zoo
    from diffaccel.parallel import PatchParallelConfig, init_distributed, local_device, parallelize

    init_distributed(timeout_s=600)
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = local_device()
    rows = []
    for setup, (entry, sizes) in SETUPS.items():
        model = zoo.load(entry, device=dev, dtype=torch.float16).eval()
        for hw in sizes:
            kw = inputs_for(model, hw, args.batch, dev, torch.float16)
            t1 = time_call(model, kw, args.repeats) if rank == 0 else None
            dist.barrier()
            row = {"setup": setup, "latent": hw, "world": world, "t1_s": t1, "modes": {}}
            for mode in ("sync", "displaced", "pcpp"):
                h = parallelize(model, PatchParallelConfig(mode=mode, warmup_steps=1, pcpp_fraction=args.fraction))
                h.reset()
                t = time_call(model, kw, args.repeats)  # calls after the first two are displaced
                rep = h.comm_report()
                h.remove()
                row["modes"][mode] = {"s_per_call": t, "speedup_vs_1gpu": (t1 / t) if t1 else None,
                                      "bytes": rep["phases"]}
            rows.append(row)
            if rank == 0:
                print(json.dumps(row, default=str), file=sys.stderr, flush=True)
    return {"device": torch.cuda.get_device_name(), "world": world, "rows": rows}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--real", action="store_true", help="under torchrun: measure real multi-GPU latency")
    p.add_argument("--batch", type=int, default=2, help="denoiser batch (2 = one image with CFG)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--fraction", type=float, default=0.3)
    p.add_argument("--link-gbps", type=float, default=None, help="interconnect GB/s for the projection")
    p.add_argument("--json", default=None, help="write the result here")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("error: needs a CUDA GPU", file=sys.stderr)
        return 2
    res = real_multi_gpu(args) if args.real or int(os.environ.get("WORLD_SIZE", "1")) > 1 else single_gpu(args)
    if args.json and int(os.environ.get("RANK", "0")) == 0:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
