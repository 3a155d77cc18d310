"""Predicted patch-parallel speed-ups for FLUX.1-dev at 1024² and SDXL at 2048² (and 3840², DistriFusion's size).

    python benchmarks/parallel_cost_model.py [--json] > table.md

Everything is measured from the real diffusers models on the meta device (diffaccel.parallel.cost_model); nothing
runs on a GPU. One-device call times: FLUX.1-dev on one H100 is calibrated on xDiT's published 28-step latency
(6.71 s without torch.compile, 4.30 s with it); SDXL on one A100 uses the model-FLOPs utilisation that calibration
implies (stated in the output) because no single-device SDXL time at these sizes is published beside DistriFusion's
speed-ups.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from diffaccel.parallel.cost_model import (
    PEAK_TFLOPS,
    flux_dev_workload,
    max_speedup,
    one_device_call_s,
    predict,
    sdxl_unet_workload,
)

GPUS = (2, 4, 8)


def rows(work, call_s, links, steps, warmup):
    out = []
    for link in links:
        for mode in ("sync", "displaced"):
            preds = [predict(work, n, link, one_device_call_s=call_s, mode=mode, steps=steps, warmup_steps=warmup)
                     for n in GPUS]
            out.append({"link": preds[0].link, "mode": mode, "speedup": [round(p.speedup, 2) for p in preds],
                        "exchange_ms": [round(p.exchange_ms, 1) for p in preds],
                        "compute_ms": [round(p.compute_ms, 1) for p in preds]})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    args = ap.parse_args(argv)
    print("measuring FLUX.1-dev and SDXL on the meta device...", file=sys.stderr)
    flux = flux_dev_workload(1024, 1024)
    flux_call = 6.71 / 28
    mfu = flux.flops / flux_call / (PEAK_TFLOPS["h100-sxm"] * 1e12)
    sdxl2k = sdxl_unet_workload(2048, 2048)
    sdxl4k = sdxl_unet_workload(3840, 3840)
    report = {
        "flux": {"work": asdict(flux), "one_device_call_s": flux_call, "mfu": mfu,
                 "rows": rows(flux, flux_call, ("nvlink-h100", "pcie5", "pcie4"), 28, 1),
                 "rows_compiled": rows(flux, 4.30 / 28, ("nvlink-h100",), 28, 1),
                 "bound": [round(max_speedup(flux, n), 2) for n in GPUS]},
        "sdxl2k": {"work": asdict(sdxl2k), "one_device_call_s": one_device_call_s(sdxl2k, "a100-sxm", mfu),
                   "rows": rows(sdxl2k, one_device_call_s(sdxl2k, "a100-sxm", mfu), ("nvlink-a100", "pcie4"), 50, 4)},
        "sdxl4k": {"work": asdict(sdxl4k), "one_device_call_s": one_device_call_s(sdxl4k, "a100-sxm", mfu),
                   "rows": rows(sdxl4k, one_device_call_s(sdxl4k, "a100-sxm", mfu), ("nvlink-a100",), 50, 4)},
    }
    if args.json:
        print(json.dumps(report, indent=1, default=str))
        return 0
    for key, title in (("flux", "FLUX.1-dev 1024², 28 steps, one H100 call {:.0f} ms (xDiT, no compile)"),
                       ("sdxl2k", "SDXL 2048², CFG batch 2, 50 steps, one A100 call {:.0f} ms (MFU {:.2f})"),
                       ("sdxl4k", "SDXL 3840², CFG batch 2, 50 steps, one A100 call {:.0f} ms (MFU {:.2f})")):
        r = report[key]
        w = r["work"]
        print(f"\n**{title.format(r['one_device_call_s'] * 1e3, mfu)}** — {w['flops'] / 1e12:.1f} TFLOP per call, "
              f"K/V {w['kv_bytes'] / 1e9:.2f} GB over {w['attention_layers']} attention layers, "
              f"halo {w['halo_bytes'] / 1e6:.1f} MB over {w['conv_layers']} convs, replicated share "
              f"{w['replicated_fraction']:.3f}\n")
        print("| link | mode | 2 GPUs | 4 GPUs | 8 GPUs | exchange ms (2/4/8) | compute ms (2/4/8) |")
        print("|---|---|---:|---:|---:|---|---|")
        for row in r["rows"] + r.get("rows_compiled", []):
            s = row["speedup"]
            print(f"| {row['link']} | {row['mode']} | {s[0]:.2f}× | {s[1]:.2f}× | {s[2]:.2f}× | "
                  f"{'/'.join(map(str, row['exchange_ms']))} | {'/'.join(map(str, row['compute_ms']))} |")
    print(f"\nFlux compute-only bound (replicated text tokens): {report['flux']['bound']} on {GPUS} GPUs.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
