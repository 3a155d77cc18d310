"""Cache-plan speed on the FLUX.1-dev-size transformer (`random-flux-dev`, random weights): per-call time and FLOPs.

`random-flux-dev` keeps FLUX.1-dev's width but only 2 of its 19 double-stream and 4 of its 38 single-stream blocks
(so that fp32 weights fit a 24 GB machine). One run, single calls interleaved so that machine noise hits all kinds
alike, repeated `--repeats` times (medians reported):

* `plain`: the transformer with no hooks;
* `compute`: a HarmoniCa cache plan attached, at a step whose plan row computes every unit (caches are written);
* `reuse`: the next step, whose row reuses every unit (what FORA's non-compute steps do; the single-stream blocks'
  fused output projection then returns its stored output too; the adaLN modulation, the MLP activation, the norms
  and the embedders still run).

Each block's time is taken by forward pre/post hooks, so the projection to the real depth is
`other + 19 t_double + 38 t_single`, for plain and reuse calls alike. FLOPs come from `core.flops.flop_counter`
(executed ops only), per block likewise. Loop speed-ups of FORA plans at N steps follow from the per-call numbers:
`N plain / (K compute + (N - K) reuse)`, K = ceil(N / n) computed steps.

    python benchmarks/flux_dev_speed.py --resolution 512 --text-len 256 --repeats 2

Progress goes to stderr; a JSON summary to stdout (and --out).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
from diffaccel import zoo
from diffaccel.caching import apply_cache_plan, cache_plan_counters, remove_cache_plan
from diffaccel.caching.harmonica import fora_plan, unit_modules
from diffaccel.core.flops import flop_counter
from diffaccel.zoo.random_models import FLUX_DEV_REAL_BLOCKS


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def inputs(model, resolution: int, text_len: int, batch: int) -> dict:
    """Packed latents and conditioning of a `FluxPipeline` call at `resolution` px (16 px per packed token)."""
    cfg = model.config
    side = resolution // 16
    ids = torch.zeros(side, side, 3)
    ids[..., 1] += torch.arange(side)[:, None]
    ids[..., 2] += torch.arange(side)[None, :]
    return {"hidden_states": torch.randn(batch, side * side, cfg.in_channels),
            "encoder_hidden_states": torch.randn(batch, text_len, cfg.joint_attention_dim),
            "pooled_projections": torch.randn(batch, cfg.pooled_projection_dim),
            "guidance": torch.full((batch,), 3.5) if cfg.guidance_embeds else None,
            "txt_ids": torch.zeros(text_len, 3), "img_ids": ids.reshape(-1, 3)}


class BlockTimer:
    """Wall seconds spent inside each double- and single-stream block during one call (forward hooks)."""

    def __init__(self, model) -> None:
        self.kinds = {}
        self.handles = []
        self.times: dict[str, float] = {}
        for kind, blocks in (("double", model.transformer_blocks), ("single", model.single_transformer_blocks)):
            for block in blocks:
                self.kinds[block] = kind
                self.handles.append(block.register_forward_pre_hook(self._start))
                self.handles.append(block.register_forward_hook(self._stop))
        self._t0 = 0.0

    def _start(self, module, args) -> None:
        self._t0 = time.perf_counter()

    def _stop(self, module, args, out) -> None:
        kind = self.kinds[module]
        self.times[kind] = self.times.get(kind, 0.0) + time.perf_counter() - self._t0

    def take(self) -> dict[str, float]:
        out, self.times = self.times, {}
        return out

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def per_block_flops(counts: dict[str, dict], model) -> dict[str, float]:
    """Total FLOPs split into double blocks, single blocks and everything else (from FlopCounterMode's tree)."""
    name = type(model).__name__
    total = sum(counts.get(name, {}).values())
    double = sum(sum(v.values()) for k, v in counts.items() if k.count(".") == 2 and ".transformer_blocks." in k)
    single = sum(sum(v.values()) for k, v in counts.items()
                 if k.count(".") == 2 and ".single_transformer_blocks." in k)
    return {"total": total, "double": double, "single": single, "other": total - double - single}


def projected(parts: dict[str, float], blocks: tuple[int, int], real: tuple[int, int]) -> float:
    """Scale block-wise measurements to the real depth: other + D * per-double + S * per-single."""
    return parts["other"] + real[0] * parts["double"] / blocks[0] + real[1] * parts["single"] / blocks[1]


@torch.no_grad()
def run(args: argparse.Namespace) -> dict:
    log("building random-flux-dev")
    model = zoo.load("random-flux-dev").eval()
    blocks = (len(model.transformer_blocks), len(model.single_transformer_blocks))
    kw = inputs(model, args.resolution, args.text_len, args.batch)
    n_units = len(unit_modules(model))
    plan = fora_plan(2, n_units, 2, model=model)  # row 0 computes every unit, row 1 reuses every unit
    t_hi, t_lo = torch.full((args.batch,), 1.0), torch.full((args.batch,), 0.9)

    def call(t: torch.Tensor) -> None:
        model(timestep=t, return_dict=False, **kw)

    # FLOPs: plain call, then compute / reuse rows of the plan
    with flop_counter() as fc:
        call(t_hi)
    flops = {"plain": per_block_flops(fc.get_flop_counts(), model)}
    apply_cache_plan(model, plan)
    try:
        with flop_counter() as fc:
            call(t_hi)
        flops["compute"] = per_block_flops(fc.get_flop_counts(), model)
        with flop_counter() as fc:
            call(t_lo)
        flops["reuse"] = per_block_flops(fc.get_flop_counts(), model)
        runs = cache_plan_counters(model).runs
        assert runs == [1] * n_units, runs  # every unit ran at row 0 only
    finally:
        remove_cache_plan(model)
    log("GFLOPs per call: " + ", ".join(f"{k} {v['total'] / 1e9:.1f}" for k, v in flops.items()))

    timer = BlockTimer(model)
    wall: dict[str, list[dict[str, float]]] = {"plain": [], "compute": [], "reuse": []}
    try:
        call(t_hi)  # warm-up
        timer.take()
        for rep in range(args.repeats):
            for kind in wall:
                if kind == "compute":
                    apply_cache_plan(model, plan)
                t0 = time.perf_counter()
                call(t_hi if kind != "reuse" else t_lo)
                total = time.perf_counter() - t0
                parts = timer.take()
                wall[kind].append({"total": total, "double": parts.get("double", 0.0),
                                   "single": parts.get("single", 0.0),
                                   "other": total - parts.get("double", 0.0) - parts.get("single", 0.0)})
                if kind == "reuse":
                    remove_cache_plan(model)
            log(f"rep {rep}: " + ", ".join(f"{k} {v[-1]['total']:.2f}s" for k, v in wall.items()))
    finally:
        timer.close()
        remove_cache_plan(model)

    def median(rows: list[dict[str, float]]) -> dict[str, float]:
        return {k: sorted(r[k] for r in rows)[len(rows) // 2] for k in rows[0]}

    med = {k: median(v) for k, v in wall.items()}
    real = FLUX_DEV_REAL_BLOCKS
    proj_s = {k: projected(v, blocks, real) for k, v in med.items()}
    proj_f = {k: projected(v, blocks, real) for k, v in flops.items()}
    loops = []
    for n in args.fora:
        k = math.ceil(args.steps / n)
        row = {"plan": f"FORA n={n}", "steps": args.steps, "computed_steps": k}
        for label, per in (("measured_depth", {x: med[x]["total"] for x in med}), ("real_depth", proj_s)):
            row[f"speedup_{label}"] = args.steps * per["plain"] / (k * per["compute"] + (args.steps - k) * per["reuse"])
        row["flops_ratio_real_depth"] = args.steps * proj_f["plain"] / (k * proj_f["compute"] +
                                                                        (args.steps - k) * proj_f["reuse"])
        loops.append(row)
        log(f"{row['plan']} at {args.steps} steps: FLOPs ratio {row['flops_ratio_real_depth']:.2f}, wall speed-up "
            f"{row['speedup_measured_depth']:.2f} (measured depth) / {row['speedup_real_depth']:.2f} (real depth)")
    return {"model": "random-flux-dev", "blocks": blocks, "real_blocks": real, "resolution": args.resolution,
            "image_tokens": (args.resolution // 16) ** 2, "text_tokens": args.text_len, "batch": args.batch,
            "dtype": "float32", "threads": torch.get_num_threads(), "repeats": args.repeats,
            "machine": f"{os.cpu_count()}-core {platform.machine()} CPU, torch {torch.__version__}",
            "flops_per_call": flops, "flops_per_call_real_depth": proj_f, "seconds_per_call_median": med,
            "seconds_per_call_real_depth": proj_s, "loops": loops, "command": args.command}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--resolution", type=int, default=512, help="image side in pixels (16 px per packed token)")
    ap.add_argument("--text-len", type=int, default=256, help="T5 tokens (FLUX.1-dev uses up to 512)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=28, help="loop length of the derived FORA speed-ups")
    ap.add_argument("--fora", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    args.command = "python benchmarks/flux_dev_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = json.dumps(run(args), indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
