"""Samplers on a flow-matching model: FID / class accuracy / paired fidelity vs NFE on `digits-flux` (issue #16).

    python benchmarks/flow_samplers.py                   # NFE 4 8 16 28, 200 images per cell
    python benchmarks/flow_samplers.py --report-only     # rebuild flow_samplers.md from flow_samplers.jsonl

Every sampler runs inside the stock `FluxPipeline` on the same seeds and prompts. The σ grid is the pipeline's own
(FLUX.1-dev's dynamic shift at this resolution); diffusers' DPM-Solver++ and UniPC run in their flow mode
(`use_flow_sigmas`, `prediction_type="flow_prediction"`, `use_dynamic_shifting` with the pipeline's μ), so all rows
apply the same exponential time shift. diffusers' `FlowMatchHeunDiscreteScheduler` takes neither custom sigmas
nor `mu` and so cannot run in FluxPipeline; Heun's method is the `pie` row (equal to textbook Heun, tested).
Paired PSNR/SSIM are against FlowMatch-Euler at 100 steps on the same seeds (the converged trajectory).
Rows are appended to `benchmarks/results/flow_samplers.jsonl` as they finish (`--resume` skips finished cells).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from diffaccel.evals import evaluate
from diffaccel.samplers import PseudoNumericalScheduler
from diffaccel.samplers.bench import _ts, ts_params
from diffaccel.samplers.pndm import transitions_for_nfe
from diffaccel.zoo import load
from diffaccel.zoo.quality import flux_call_kwargs

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "digits-flux"
REFERENCE_STEPS = 100


def machine() -> str:
    return (f"{os.cpu_count()}-core {platform.machine()} CPU, torch {torch.__version__}, "
            f"threads {torch.get_num_threads()}")


def _pndm(method: str):
    def build(config: dict, nfe: int):
        n = transitions_for_nfe(method, nfe)
        return None if n is None else (PseudoNumericalScheduler.from_config(config, method=method), n)
    return build


def _flow_multistep(cls_name: str, **kw):
    def build(config: dict, nfe: int):
        import diffusers

        cls = getattr(diffusers, cls_name)
        # FluxPipeline passes mu: these schedulers then apply the same dynamic (exponential) time shift
        return cls(use_flow_sigmas=True, prediction_type="flow_prediction", use_dynamic_shifting=True,
                   time_shift_type="exponential", **kw), nfe
    return build


def _euler(config: dict, nfe: int):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(config), nfe


SAMPLERS = {
    "FlowMatch-Euler": _euler,
    "Heun (pie)": _pndm("pie"),
    "DPM-Solver++(2M) flow": _flow_multistep("DPMSolverMultistepScheduler", algorithm_type="dpmsolver++",
                                             solver_order=2),
    "UniPC flow": _flow_multistep("UniPCMultistepScheduler"),
    "S-PNDM": _pndm("s-pndm"),
    "PLMS-LDM": _pndm("plms-ldm"),
    "F-PNDM": _pndm("f-pndm"),
    "TS-Euler": _ts(_euler),
    "TS-S-PNDM": _ts(_pndm("s-pndm")),
}


def call_kwargs(pipe) -> dict:
    # no true CFG (the card's default); 32x32 and the 16 T5 tokens the model was trained with
    return flux_call_kwargs(pipe, 0, None)


def run(args: argparse.Namespace) -> None:
    args.results.mkdir(parents=True, exist_ok=True)
    jsonl = args.results / "flow_samplers.jsonl"
    done = set()
    if args.resume and jsonl.exists():
        for line in jsonl.read_text().splitlines():
            r = json.loads(line)
            done.add((r["sampler"], r["nfe_target"], r["num_images"]))
    pipe = load(MODEL)
    pipe.set_progress_bar_config(disable=True)
    config = dict(pipe.scheduler.config)
    euler = pipe.scheduler
    kw = call_kwargs(pipe)
    t0 = time.perf_counter()
    ref = evaluate(pipe, list(range(10)), args.num_images, args.seed, name="reference", batch_size=args.batch_size,
                   count_flops=False, clip_model=None, keep_images=True, num_inference_steps=REFERENCE_STEPS, **kw)
    print(f"[flow] reference Euler-{REFERENCE_STEPS}: FID {ref.fid:.3f} acc {ref.class_accuracy:.3f} "
          f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    for nfe in args.nfe:
        for name in args.samplers:
            if (name, nfe, args.num_images) in done:
                continue
            built = SAMPLERS[name](config, nfe)
            if built is None:
                print(f"[flow] {name} NFE {nfe}: infeasible", file=sys.stderr)
                continue
            pipe.scheduler, steps = built
            t0 = time.perf_counter()
            res = evaluate(pipe, list(range(10)), args.num_images, args.seed, name=f"{name} NFE{nfe}",
                           batch_size=args.batch_size, count_flops=False, clip_model=None,
                           paired_reference=ref.images, paired_with=f"FlowMatch-Euler {REFERENCE_STEPS} steps",
                           num_inference_steps=steps, **kw)
            pipe.scheduler = euler
            d = res.paired.as_dict() if res.paired is not None else {}
            row = {"model": MODEL, "sampler": name, "nfe_target": nfe, "nfe": res.nfe_per_image,
                   "num_inference_steps": steps, "fid": res.fid, "class_accuracy": res.class_accuracy,
                   "psnr": d.get("psnr"), "ssim": d.get("ssim"), "seconds_per_image": res.seconds_per_image,
                   "num_images": args.num_images, "seed": args.seed, "reference_fid": ref.fid,
                   "reference_accuracy": ref.class_accuracy, "machine": machine(), "command": args.command,
                   "ts": ts_params(steps) if name.startswith("TS-") else None}
            with jsonl.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"[flow] {name:24s} NFE {row['nfe']:5.1f} FID {res.fid:7.3f} acc {res.class_accuracy:.3f} "
                  f"PSNR {row['psnr']} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)


def report(args: argparse.Namespace) -> str:
    path = args.results / "flow_samplers.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    latest = {(r["sampler"], r["nfe_target"]): r for r in rows}
    nfes = sorted({k[1] for k in latest})
    names = [s for s in SAMPLERS if any(k[0] == s for k in latest)]
    if not rows:
        return "no rows yet\n"
    r0 = rows[-1]
    commands = list(dict.fromkeys(r["command"].strip() for r in latest.values()))  # first-use order
    plural = "Commands (each appended cells, same seeds)" if len(commands) > 1 else "Command"
    refs = sorted({f"{r['reference_fid']:.2f}" for r in latest.values()})
    out = [f"### {MODEL}: FID / class accuracy / PSNR (dB) / SSIM vs Euler-{REFERENCE_STEPS} by NFE, "
           f"{r0['num_images']} images per cell\n",
           f"Reference (FlowMatch-Euler, {REFERENCE_STEPS} steps): FID {' / '.join(refs)}, accuracy "
           f"{r0['reference_accuracy']:.1%}. {plural}"
           f": {'; '.join(f'`{c}`' for c in commands)}; machine: {r0['machine']}.\n",
           "| sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|" + "---:|" * len(nfes)]
    best = {n: min((r["fid"] for k, r in latest.items() if k[1] == n), default=None) for n in nfes}
    for s in names:
        cells = []
        for n in nfes:
            r = latest.get((s, n))
            if r is None:
                cells.append("—")
                continue
            c = f"{r['fid']:.2f} / {r['class_accuracy']:.0%}"
            if r["psnr"] is not None:
                c += f" / {r['psnr']:.1f} / {r['ssim']:.3f}"
            cells.append(f"**{c}**" if r["fid"] == best[n] else c)
        out.append(f"| {s} | " + " | ".join(cells) + " |")
    text = "\n".join(out) + "\n"
    (args.results / "flow_samplers.md").write_text(text)
    return text


def common_parser(doc: str | None) -> argparse.ArgumentParser:
    """The options both digits-flux benchmarks (this one and `flux_caches.py`) take; each adds its own."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-images", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--report-only", action="store_true", help="rewrite the report from the saved rows")
    p.add_argument("--results", type=Path, default=RESULTS)
    return p


def run_and_report(p: argparse.ArgumentParser, argv: list[str] | None, script: str, run, report) -> int:
    """Parse, set the thread count, record the command, run the rows (unless --report-only) and print the report."""
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.command = f"python benchmarks/{script} " + " ".join(argv if argv is not None else sys.argv[1:])
    if not args.report_only:
        run(args)
    print(report(args))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = common_parser(__doc__)
    p.add_argument("--nfe", type=int, nargs="+", default=[4, 8, 16, 28])
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS))
    p.add_argument("--resume", action="store_true")
    return run_and_report(p, argv, "flow_samplers.py", run, report)


if __name__ == "__main__":
    sys.exit(main())
