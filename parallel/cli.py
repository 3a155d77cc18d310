"""`diffaccel parallel` / `python -m diffaccel.parallel`: sample one image with patch parallelism.

Launch with `torchrun --nproc_per_node N -m diffaccel.parallel --model random-sd ...` (or
`accelerate launch --multi_gpu --num_processes N -m diffaccel.parallel ...`); without a launcher it runs on one
process. Rank 0 writes the image and prints the result (latency, bytes per call and kind for every rank) on
stdout; progress goes to stderr. Exit codes: 0 ok; 1 communication failure (message names the rank) or
unexpected error; 2 bad input (invalid option, unsupported model or resolution, mismatched ranks).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..core.options import MAX_STEPS, float_in, int_in, seed_option, steps_option
from .config import GN_MODES, MODES, PatchParallelConfig, PatchParallelError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="random-sd",
                   help="zoo pipeline (SD 1.x, SDXL, SD3, Flux, DiT or PixArt; default random-sd)")
    p.add_argument("--mode", default="displaced", choices=[*MODES, "distrifusion"], help="default displaced")
    p.add_argument("--warmup-steps", type=int_in(0, MAX_STEPS), default=4,
                   help="synchronous model calls after call 0 (default 4)")
    p.add_argument("--pcpp-fraction", type=float_in(0.0, 1.0), default=0.3, help="neighbour rows attended in pcpp mode")
    p.add_argument("--gn-mode", default="corrected", choices=GN_MODES, help="GroupNorm statistics in displaced calls")
    p.add_argument("--halo-transport", default="p2p", choices=["p2p", "allgather"])
    p.add_argument("--cfg-parallel", action="store_true", help="run the two CFG branches on two rank groups")
    p.add_argument("--prompt", default="a handwritten digit seven")
    p.add_argument("--class-label", type=int_in(0), default=7, help="class for DiT pipelines")
    p.add_argument("--steps", type=steps_option, default=20)
    p.add_argument("--guidance", type=float_in(0.0, 100.0), default=5.0)
    p.add_argument("--height", type=int_in(8, 16384), default=None,
                   help="image height in pixels (default: the model's)")
    p.add_argument("--width", type=int_in(8, 16384), default=None)
    p.add_argument("--seed", type=seed_option, default=0)
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--timeout", type=float_in(0.0, 86400.0, lo_open=True), default=300.0,
                   help="seconds before a silent rank is reported")
    p.add_argument("--out", type=Path, default=Path("outputs/parallel.png"), help="image written by rank 0")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_parallel)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("parallel", help="sample with patch parallelism over torchrun ranks",
                       description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)


def _pipe_kwargs(pipe, args) -> dict:
    name = type(pipe).__name__
    if name == "DiTPipeline":
        if args.height or args.width:
            raise PatchParallelError("DiTPipeline has a fixed resolution; drop --height/--width")
        return {"class_labels": [args.class_label]}
    kw = {"prompt": [args.prompt], "height": args.height, "width": args.width}
    if name.startswith("PixArt"):
        kw.update(use_resolution_binning=False, clean_caption=False)
    return kw


def cmd_parallel(args) -> int:
    import torch
    import torch.distributed as dist

    from ..core import resolve_dtype
    from ..zoo import load
    from .comm import init_distributed, local_device
    from .parallelize import parallelize

    init_distributed(timeout_s=args.timeout)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    device = local_device()

    def log(msg: str) -> None:
        if rank == 0:
            print(msg, file=sys.stderr, flush=True)

    cfg = PatchParallelConfig(mode=args.mode, warmup_steps=args.warmup_steps, pcpp_fraction=args.pcpp_fraction,
                              gn_mode=args.gn_mode, halo_transport=args.halo_transport,
                              cfg_parallel=args.cfg_parallel, timeout_s=args.timeout)
    log(f"loading {args.model} on {world} rank(s) ({device}) ...")
    pipe = load(args.model, device=device, dtype=resolve_dtype(args.dtype, device))
    pipe.set_progress_bar_config(disable=True)
    handle = parallelize(pipe, cfg)
    kw = _pipe_kwargs(pipe, args)
    log(f"sampling {args.steps} steps, mode {cfg.mode}, cfg_parallel={cfg.cfg_parallel} ...")
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    images = pipe(**kw, num_inference_steps=args.steps, guidance_scale=args.guidance,
                  generator=torch.Generator(device).manual_seed(args.seed)).images
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    report = handle.comm_report(all_ranks=True) if handle.enabled else handle.comm_report()
    if dist.is_initialized():
        dist.barrier()
    if rank != 0:
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(args.out)
    per_rank = report.get("per_rank", [report]) if handle.enabled else []
    result = {"model": args.model, "mode": cfg.mode, "world_size": world, "cfg_parallel": cfg.cfg_parallel,
              "steps": args.steps, "seconds": seconds, "image": str(args.out),
              "bytes_per_call": [{"rank": i, **{ph: s["phases"][ph]["wire_bytes_per_call"]
                                                for ph in ("sync", "displaced")}} for i, s in enumerate(per_rank)]}
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"{args.model}: {args.steps} steps on {world} rank(s), mode {cfg.mode}: {seconds:.3f} s")
        for row in result["bytes_per_call"]:
            for ph in ("sync", "displaced"):
                kinds = " ".join(f"{k}={v / 1024:.1f}KiB" for k, v in row[ph].items() if v)
                print(f"  rank {row['rank']} {ph:9s} per call: {kinds or '-'}")
        print(f"image written to {args.out}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`torchrun ... -m diffaccel.parallel`: errors become one line and their exit code (core/errors.py)."""
    from ..core.errors import run_command
    from ..core.options import ArgumentParser

    parser = ArgumentParser(prog="python -m diffaccel.parallel", description=__doc__.split("\n\n", 1)[1],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_command(lambda: args.func(args), debug=args.debug)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
