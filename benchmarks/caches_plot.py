"""Paired PSNR against compute for every cache benchmarked on the digits models, one panel per model.

Reads the committed results of `benchmarks/branch_reuse.py` (digits-sd: DeepCache, encoder propagation, calibrated
branch reuse; whole-call FLOPs ratio) and `benchmarks/dit_caches.py` (digits-dit: FORA, HarmoniCa, calibrated
forecast plans, diffusers' FirstBlockCache / TaylorSeer / MagCache; denoiser FLOPs ratio) and draws one curve per
method, every point a measured row (no new measurement):

    python benchmarks/caches_plot.py --out benchmarks/results/caches_psnr_vs_flops.png
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from plots import curves

RESULTS = Path(__file__).resolve().parent / "results"

#: (regex on the row name, series name), first match wins
SERIES = [(r"^deepcache", "DeepCache (pip deepcache)"), (r"^ep-", "encoder propagation"),
          (r"^branch-reuse", "diffaccel branch reuse, calibrated"),
          (r"^fora-\d+-forecast2", "FORA + order-2 forecast (diffaccel)"),
          (r"^fora-\d+-forecast", "FORA + forecast (diffaccel)"), (r"^fora-", "FORA"),
          (r"^harmonica", "HarmoniCa (shipped routers)"),
          (r"^calibrated-.*-forecast2-greedy", None),  # not drawn: below the order-1 greedy plans
          (r"^calibrated-.*-forecast2-local", "diffaccel calibrated + order-2 forecast, local"),
          (r"^calibrated-.*-forecast-greedy", "diffaccel calibrated + forecast, greedy"),
          (r"^calibrated-.*-forecast-local", "diffaccel calibrated + forecast, local"),
          (r"^diffusers-fbc", "diffusers FirstBlockCache"),
          (r"^diffusers-taylorseer-\d+-o2", "diffusers TaylorSeer, order 2"),
          (r"^diffusers-taylorseer", "diffusers TaylorSeer"),
          (r"^diffusers-magcache", "diffusers MagCache")]


def series_of(rows: list[dict], ratio_key: str) -> dict[str, list[tuple[float, float]]]:
    out: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        psnr = (r.get("paired") or {}).get("psnr")
        name = next((s for pat, s in SERIES if re.search(pat, r["name"])), None)  # first match; None: not drawn
        if psnr is None or name is None:
            continue
        out.setdefault(name, []).append((float(r[ratio_key]), float(psnr)))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--unet", type=Path, default=RESULTS / "branch_reuse.json")
    p.add_argument("--dit", type=Path, default=RESULTS / "dit_caches.json")
    p.add_argument("--out", type=Path, default=RESULTS / "caches_psnr_vs_flops.png")
    args = p.parse_args(argv)
    unet, dit = (json.loads(path.read_text()) for path in (args.unet, args.dit))
    panels = [(f"digits-sd, {unet['steps']} DDIM steps, {unet['num_images']} images", "paired PSNR vs uncached (dB)",
               series_of(unet["rows"], "flops_ratio")),
              (f"digits-dit, {dit['steps']} DDIM steps, {dit['num_images']} images", "paired PSNR vs uncached (dB)",
               series_of(dit["rows"], "denoiser_flops_ratio"))]
    print(curves(panels, args.out, "FLOPs ratio vs uncached (whole call on digits-sd, denoiser on digits-dit)",
                 logx=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
