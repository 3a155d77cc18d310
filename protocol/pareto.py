"""`diffaccel bench --suite pareto`: every method and several compositions, per model family, on the same seeds.

Each row is a recipe applied with `accelerate` to a freshly loaded zoo pipeline and measured by the shared harness
(`evals.evaluate`: seconds per image timed with `core.measure`, NFE, FLOPs, FID/KID on digits-features, class
accuracy, CLIP score) and paired with the family's unaccelerated reference row at the same seeds (PSNR / SSIM).
`write_report` turns the results into a markdown table and a FID-vs-speed-up plot with the Pareto front marked.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: per zoo model: (reference recipe, [recipes]); digits-sd / digits-dit: the model's own grid at 25 DDIM steps
ROWS: dict[str, tuple[str, list[str]]] = {
    "digits-sd": ("ddim@25:grid=model", [
        "ddim@10",
        "dpm++2m@10",
        "s-pndm@10",
        "s-pndm@10 + time-shift",
        "ddim@25:grid=model + ep:sd50-scaled:parallel",
        "s-pndm@10 + ep:uniform-2:parallel",
        "ddim@10:grid=model + fk:4:every=2:start=2:end=9",
        "ddim@10:grid=model + ep:uniform-2 + fk:4:every=2:start=2:end=9",
        "ddim@10:grid=model + best-of-n:4",
        "one-step:digits-sd-onestep",
        "one-step:digits-sd-onestep + best-of-n:4",
    ]),
    "digits-dit": ("ddim@25:grid=model", [
        "ddim@20:grid=model",
        "dpm++2m@10",
        "s-pndm@10",
        "ddim@20:grid=model + harmonica:digits-dit-20-harmonica-b1",
        "ddim@20:grid=model + fora:2",
        "s-pndm@10 + fora:2",
        "ddim@20:grid=model + time-shift + harmonica:digits-dit-20-harmonica-b1",
        "ddim@10:grid=model + fk:4:every=2:start=2:end=9",
        "ddim@20:grid=model + harmonica:digits-dit-20-harmonica-b1 + fk:4:every=4:start=4:end=19",
    ]),
    # Flow matching (FluxPipeline): the reference is the model's default, FlowMatch-Euler at 28 steps, with no
    # guidance (the card's default). Rows without a sampler keep that scheduler and step count (shipped HarmoniCa
    # plans are bound to it); `ddim` on this model is FlowMatch-Euler at fewer steps.
    "digits-flux": ("plain", [
        "ddim@14",
        "s-pndm@14",
        "s-pndm@8",
        "fora:2:steps=28",
        "fora:3:steps=28:forecast=1",
        "harmonica:digits-flux-28-harmonica-b1",
        "harmonica:digits-flux-28-harmonica-b0",
        "magcache:0.24:steps=28",
        "ddim@14 + fora:2",
        "s-pndm@14 + fora:2",
        "s-pndm@14 + fora:2:forecast=1",
        "ddim@14 + magcache:0.24",
    ]),
}
#: per zoo model: what every call of its rows gets
CALL_KWARGS: dict[str, dict[str, Any]] = {
    "digits-sd": {"guidance_scale": 7.5},
    "digits-dit": {"guidance_scale": 4.0},
    # the zoo's 32x32 images and the 16 T5 tokens digits-flux was trained with
    "digits-flux": {"height": 32, "width": 32, "max_sequence_length": 16},
}
#: the step count of rows whose recipe has no sampler (the pipeline's own scheduler and default steps)
DEFAULT_STEPS = {"digits-flux": 28}


def _factory(model: str, recipe: str):
    def build() -> Any:
        from ..zoo import load
        from .base import accelerate

        pipe = load(model)
        pipe.set_progress_bar_config(disable=True)
        return accelerate(pipe, recipe).as_pipeline()

    return build


def row_name(model: str, recipe: str) -> str:
    return f"{model} | {recipe}"


def pareto_suite(steps: int = 25, models: Sequence[str] = tuple(ROWS)) -> list:
    """`BenchConfig`s of every row; each model's rows pair with its reference row (`steps` is not used: every
    recipe carries its own step count)."""
    from ..evals import BenchConfig
    from .recipe import parse_recipe
    from .samplers import Sampler

    configs = []
    for model in models:
        reference, recipes = ROWS[model]
        ref_name = row_name(model, reference)
        for recipe in [reference, *recipes]:
            methods = parse_recipe(recipe)  # a typo fails before anything runs
            kwargs = dict(CALL_KWARGS[model])
            if model in DEFAULT_STEPS and not any(isinstance(m, Sampler) for m in methods):
                kwargs["num_inference_steps"] = DEFAULT_STEPS[model]
            requires = (model, "digits-sd-onestep") if "one-step" in recipe else (model,)
            configs.append(BenchConfig(row_name(model, recipe), _factory(model, recipe), kwargs, list(range(10)),
                                       requires=requires, reference=ref_name))
    return configs


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (speed-up, FID) that no other point beats on both (higher speed-up, lower FID)."""
    front = []
    for i, (s, f) in enumerate(points):
        if not any((s2 >= s and f2 <= f) and (s2 > s or f2 < f) for j, (s2, f2) in enumerate(points) if j != i):
            front.append(i)
    return front


def _fmt(v: float | None, spec: str) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def report_rows(results: Sequence[Any]) -> list[dict[str, Any]]:
    """One dict per row with the speed-up against the row's reference (same run, same seeds)."""
    by_name = {r.name: r for r in results}
    rows = []
    for r in results:
        model, recipe = r.name.split(" | ", 1)
        ref = by_name.get(r.paired_with or "", r)
        p = r.paired
        flops = (ref.flops_per_image / r.flops_per_image) if ref.flops_per_image and r.flops_per_image else None
        rows.append({"model": model, "recipe": recipe, "speedup": ref.seconds_per_image / r.seconds_per_image,
                     "flops_speedup": flops,
                     "seconds_per_image": r.seconds_per_image, "nfe": r.nfe_per_image,
                     "rows_per_image": r.denoiser_rows_per_image, "gflops": None if r.flops_per_image is None
                     else r.flops_per_image / 1e9, "fid": r.fid, "kid": r.kid_mean, "accuracy": r.class_accuracy,
                     "clip": r.clip_score, "psnr": None if p is None else p.psnr,
                     "ssim": None if p is None else p.ssim, "reference": r.paired_with == r.name})
    axis = "flops_speedup" if all(row["flops_speedup"] for row in rows) else "speedup"
    for model in {row["model"] for row in rows}:
        mine = [row for row in rows if row["model"] == model]
        for i in pareto_front([(row[axis], row["fid"]) for row in mine]):
            mine[i]["pareto"] = True
    return rows


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    head = ("| model | recipe | speed-up (wall) | FLOPs ratio | s/image | NFE | denoiser rows/image | GFLOP/image | "
            "FID | KID×1e3 | class acc. | CLIP | PSNR (dB) | SSIM | Pareto |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        psnr = "ref" if r["reference"] else ("∞" if r["psnr"] is not None and math.isinf(r["psnr"])
                                              else _fmt(r["psnr"], ".2f"))
        lines.append(f"| {r['model']} | `{r['recipe']}` | {r['speedup']:.2f}× | {_fmt(r['flops_speedup'], '.2f')}× | "
                     f"{r['seconds_per_image']:.4f} | "
                     f"{r['nfe']:.0f} | {r['rows_per_image']:.0f} | {_fmt(r['gflops'], '.3f')} | {r['fid']:.2f} | "
                     f"{r['kid'] * 1e3:.2f} | {_fmt(r['accuracy'], '.1%')} | {_fmt(r['clip'], '.2f')} | {psnr} | "
                     f"{'ref' if r['reference'] else _fmt(r['ssim'], '.3f')} | {'★' if r.get('pareto') else ''} |")
    return "\n".join(lines)


def plot(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """FID vs speed-up (log) per model family, the Pareto front joined and its points labelled. The x axis is the
    FLOPs ratio when every row has one (deterministic; wall-clock ratios on a shared machine are noisy), else the
    measured speed-up."""
    axis = "flops_speedup" if all(r.get("flops_speedup") for r in rows) else "speedup"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 5), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        mine = [r for r in rows if r["model"] == model]
        ax.scatter([r[axis] for r in mine], [r["fid"] for r in mine], color="0.6", s=18, zorder=2)
        front = sorted((r for r in mine if r.get("pareto")), key=lambda r: r[axis])
        ax.plot([r[axis] for r in front], [r["fid"] for r in front], "-o", color="C3", zorder=3,
                label="Pareto front")
        for r in mine:
            ax.annotate(r["recipe"], (r[axis], r["fid"]), fontsize=6, xytext=(3, 3), textcoords="offset points",
                        color="C3" if r.get("pareto") else "0.35")
        ax.set_xscale("log")
        ax.set_xlabel("FLOPs ratio vs the reference row (whole generation, one image)" if axis == "flops_speedup" else
                      "wall-clock speed-up vs the reference row (same run)")
        ax.set_ylabel("FID (digits-features, lower is better)")
        ax.set_title(model)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(results: Sequence[Any], out: Path, command: str, machine: str) -> tuple[Path, Path]:
    """`pareto.md` (table, command, machine) and `pareto.png` under `out`."""
    rows = report_rows(results)
    out.mkdir(parents=True, exist_ok=True)
    png = plot(rows, out / "pareto.png")
    n = results[0].num_images if results else 0
    text = (f"# Pareto report\n\n`{command}` — {n} images per row, same seeds for every row, on {machine}. "
            "Speed-up (wall): the row's reference (first row of its model) divided by the row's seconds per image, "
            "timed with `core.measure` in the same run; FLOPs ratio: the reference's FLOPs per image (counted by "
            "`torch.utils.flop_counter` on one image) over the row's. The Pareto front and the plot use the FLOPs "
            "ratio: on a shared machine wall-clock ratios move with other jobs. PSNR/SSIM: image by image against the "
            "reference row at the same seeds. FK rows "
            "return the best particle per prompt; their NFE counts steps, the denoiser rows count every particle. "
            "★ marks the Pareto front (FLOPs ratio vs FID) per model.\n\n" + markdown_table(rows) + "\n")
    md = out / "pareto.md"
    md.write_text(text)
    return md, png
