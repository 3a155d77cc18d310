"""Reward and class accuracy vs NFE for inference-time scaling on digits-sd (issue #9) and digits-flux (issue #17).

Methods at equal NFE budgets (NFE = image-step evaluations per prompt, CFG counted once; base = T):
base sampling, best-of-N and zero-order search (DDIM eta = 0, `noise_search`), and FK steering with k particles
(DDIM eta = 1, `FKSteering`, potentials `max` / `diff` / `immediate`, λ = 10, 5 events as in the paper's schedule).
On a flow-matching model (`--model digits-flux`) the deterministic sampler is the pipeline's FlowMatch-Euler and
the stochastic one its eta = 1 counterpart `FlowMatchSDEScheduler` (ancestral steps with the ODE's marginals).
Reward = `ClassifierReward` (log-probability of the prompted digit under zoo `digits-features`); accuracy = that
classifier's prediction; held-out metric = CLIP score (`diffaccel.evals.clip_score`, zoo `digits-clip`). Search and
FK report their best particle (argmax reward), as FK's reference evaluation does.

    python benchmarks/steering.py                      # 20 prompts (digits 0–9 cycled), T = 20, budgets 2 4 8
    python benchmarks/steering.py --report-only        # rebuild steering.md and the PNG from steering.jsonl
    python benchmarks/steering.py --model digits-flux --guidance 1 --target unconditional --lmbda 1 \
        --budgets 4 8 --potentials max immediate --out benchmarks/results/steering_uncond_flux.jsonl

Rows are appended to `benchmarks/results/steering.jsonl` as they finish (`--resume` skips finished rows).
Progress on stderr; the table on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
from diffaccel import zoo
from diffaccel.core import make_generator, to_uint8
from diffaccel.core.families import family_for
from diffaccel.samplers.steering import ClassifierReward, FKConfig, FKSteering, best_of_n, zero_order_search

RESULTS = Path(__file__).resolve().parent / "results"


def prompts_for(n: int) -> list[tuple[str, int]]:
    return [(zoo.caption(i % 10, template=0), i % 10) for i in range(n)]


def fk_schedule(steps: int) -> dict:
    """The paper's 5-event schedule (20, 40, 60, 80, 99 of 100) scaled to `steps`."""
    every = max(1, steps // 5)
    return dict(resample_start=every, resample_every=every, resample_end=min(4 * every, steps - 1))


def run_method(pipe, reward, method: str, budget: int, prompt: str, seed: int, args) -> tuple[torch.Tensor, int]:
    """One prompt: returns the chosen image ([1, C, H, W] in [0, 1]) and the NFE spent."""
    steps, g = args.steps, args.guidance
    if args.target == "unconditional":
        # The model sees the empty prompt; only the reward knows the digit (a fixed-target classifier reward).
        label = zoo.label_from_prompt(prompt)
        reward = ClassifierReward(classifier=reward.classifier, label_fn=lambda _p, y=label: y)
        prompt = ""
    if method == "base":
        out = best_of_n(pipe, prompt, reward, n=1, num_inference_steps=steps, guidance_scale=g,
                        generator=make_generator(seed))
        return out.image, out.nfe["nfe"]
    if method == "best-of-N":
        out = best_of_n(pipe, prompt, reward, n=budget, num_inference_steps=steps, guidance_scale=g,
                        generator=make_generator(seed))
        return out.image, out.nfe["nfe"]
    if method == "zero-order":
        m = 1 if budget <= 4 else 3
        out = zero_order_search(pipe, prompt, reward, neighbours=m, rounds=(budget - 1) // m, num_inference_steps=steps,
                                guidance_scale=g, generator=make_generator(seed))
        return out.image, out.nfe["nfe"]
    potential = "bon" if method.endswith("eta=1") else method.split()[1]  # best-of-N on the FK sampler
    cfg = FKConfig(num_particles=budget, potential=potential, lmbda=args.lmbda, resampler=args.resampler,
                   **fk_schedule(steps))
    out = FKSteering(pipe, reward, cfg)(prompt, num_inference_steps=steps, guidance_scale=g, eta=1.0,
                                        generator=make_generator(seed), output_type="pt")
    best = int(out.best()[0])
    return out.images[best:best + 1], out.nfe["denoiser_rows"] // family_for(pipe).cfg_rows(g)


def methods_for(budget: int, potentials: list[str]) -> list[str]:
    if budget == 1:
        return ["base", "base eta=1"]
    return ["best-of-N", "best-of-N eta=1", "zero-order"] + [f"FK {p}" for p in potentials]


def run(args) -> None:
    torch.set_num_threads(args.threads)
    pipe = zoo.load(args.model)
    pipe.set_progress_bar_config(disable=True)
    reward = ClassifierReward()
    from diffaccel.evals import clip_score

    out_path = args.out
    done = set()
    if args.resume and out_path.exists():
        done = {(r["method"], r["budget"]) for r in map(json.loads, out_path.read_text().splitlines())}
    prompts = prompts_for(args.prompts)
    command = "python benchmarks/steering.py " + shlex.join(sys.argv[1:])
    for budget in [1, *args.budgets]:
        for method in methods_for(budget, args.potentials):
            if (method, budget) in done or (args.methods and method not in args.methods):
                continue
            t0 = time.perf_counter()
            images, nfes = [], []
            for i, (prompt, _) in enumerate(prompts):
                img, nfe = run_method(pipe, reward, method, budget, prompt, args.seed + i, args)
                images.append(img)
                nfes.append(nfe)
            images = torch.cat(images)
            texts = [p for p, _ in prompts]
            labels = torch.tensor([y for _, y in prompts])
            r = reward(images, texts)
            acc = (reward.classifier.predict(to_uint8(images)) == labels).float()
            clip = clip_score(to_uint8(images), texts).score
            row = {"method": method, "budget": budget, "nfe": sum(nfes) / len(nfes), "reward": r.mean().item(),
                   "reward_se": (r.std() / math.sqrt(len(r))).item(), "accuracy": acc.mean().item(),
                   "rewards": [round(v, 5) for v in r.tolist()], "correct": [int(v) for v in acc.tolist()],
                   "clip_score": float(clip), "n_prompts": len(prompts), "steps": args.steps,
                   "lmbda": args.lmbda, "target": args.target, "guidance": args.guidance, "model": args.model,
                   "seconds": time.perf_counter() - t0, "command": command,
                   "machine": f"{args.machine}", "python": platform.python_version(), "torch": torch.__version__}
            with out_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{method:>14} budget {budget}: reward {row['reward']:.3f} acc {row['accuracy']:.2f} "
                  f"clip {row['clip_score']:.2f} nfe {row['nfe']:.0f} ({row['seconds']:.0f}s)", file=sys.stderr)


def plot(rows: list[dict], path: Path) -> None:
    """Mean reward and class accuracy vs NFE (log x), one curve per method starting from its base sample."""
    from plots import curves

    methods = list(dict.fromkeys(r["method"] for r in rows if not r["method"].startswith("base")))
    bases = {"base": next((r for r in rows if r["method"] == "base"), None),
             "base eta=1": next((r for r in rows if r["method"] == "base eta=1"), None)}
    panels = []
    for key, title in (("reward", "mean reward (log p(digit))"), ("accuracy", "class accuracy")):
        series = {}
        for m in methods:
            pts = [(r["nfe"], r[key]) for r in rows if r["method"] == m]
            base = bases["base" if m in ("best-of-N", "zero-order") else "base eta=1"]
            series[m] = ([(base["nfe"], base[key])] if base is not None else []) + pts
        panels.append((f"{title} vs NFE", title, series))
    curves(panels, path, "NFE per prompt (log)")


def paired(rows: list[dict], r: dict) -> str:
    """Mean per-prompt reward difference of row `r` to best-of-N at the same budget (± s.e.), or '—'."""
    ref = next((x for x in rows if x["method"] == "best-of-N" and x["budget"] == r["budget"]), None)
    if ref is None or r is ref or "rewards" not in r or "rewards" not in ref:
        return "—"
    d = torch.tensor(r["rewards"]) - torch.tensor(ref["rewards"])
    return f"{d.mean().item():+.3f} ± {(d.std() / math.sqrt(len(d))).item():.3f}"


def report(args) -> str:
    rows = [json.loads(line) for line in args.out.read_text().splitlines()] if args.out.exists() else []
    if not rows:
        return "no rows yet"
    png = args.out.with_name(args.out.stem + "_reward_vs_nfe.png")
    plot(rows, png)
    r0 = rows[0]
    model = r0.get("model", "digits-sd")
    flow = model == "digits-flux"
    ode, sde = ("FlowMatch-Euler (the pipeline's ODE sampler)", "FlowMatchSDEScheduler eta = 1 (ancestral, the ODE's "
                "marginals)") if flow else ("DDIM eta = 0", "DDIM eta = 1")
    lines = [f"## Steering: reward and class accuracy vs NFE on {model}", "",
             f"Machine: {r0['machine']}. {r0['n_prompts']} prompts (digits 0–9 cycled), T = {r0['steps']} "
             f"{'steps' if flow else 'DDIM steps'}, "
             f"CFG {r0.get('guidance', args.guidance)}, seeds {args.seed}..; λ = {r0['lmbda']}. "
             + ("The model is given the EMPTY prompt (unconditional); only the reward names the target digit. "
                if r0.get("target") == "unconditional" else "")
             + "Reward = log p(target digit) under "
             "zoo `digits-features`; accuracy = its argmax; CLIP = `diffaccel.evals.clip_score` (digits-clip, "
             f"held out from steering). base / best-of-N / zero-order: {ode} (noise search); `base eta=1`, "
             f"`best-of-N eta=1` (FK potential `bon`) and FK: {sde}, FK events at "
             "the paper's 5-event schedule scaled to T; each method reports its best particle. "
             "NFE = image-step evaluations per prompt (CFG counted once), measured.", "",
             "Commands:", "", *[f"    {c}" for c in dict.fromkeys(r["command"] for r in rows)], "",
             f"![reward and accuracy vs NFE]({png.name})", "",
             f"`vs best-of-N` = mean per-prompt reward difference to best-of-N ({ode}) at the same budget, "
             "same prompts and seeds (paired), ± its standard error.", "",
             "| method | budget | NFE/prompt | mean reward (± s.e.) | accuracy | CLIP score | vs best-of-N | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["budget"], r["method"])):
        lines.append(f"| {r['method']} | {r['budget']} | {r['nfe']:.0f} | {r['reward']:.3f} ± {r['reward_se']:.3f} | "
                     f"{r['accuracy']:.2f} | {r['clip_score']:.2f} | {paired(rows, r)} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="digits-sd")
    p.add_argument("--prompts", type=int, default=20)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--budgets", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--potentials", nargs="+", default=["max", "diff", "immediate"])
    p.add_argument("--lmbda", type=float, default=10.0)
    p.add_argument("--resampler", default="systematic")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--target", choices=["prompt", "unconditional"], default="prompt",
                   help="prompt: the model is prompted with the digit the reward scores; unconditional: the model "
                        "gets the empty prompt and only the reward names the digit (steering does all the work)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--machine", default="2-core x86_64 CPU")
    p.add_argument("--out", type=Path, default=RESULTS / "steering.jsonl")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                   help="run only these rows (e.g. 'best-of-N' 'FK max'); default: all")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        run(args)
    text = report(args)
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
