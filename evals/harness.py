"""The evaluation harness every method reports through: speed, cost and quality of one pipeline configuration.

`evaluate(pipeline, prompts_or_labels, num_images, seed, **call_kwargs)` generates `num_images` images with
per-image seeds (image i always uses seed + i, whatever the batch size), and measures

- speed: images/second over all timed batches and the median seconds per image over batches (after one untimed
  warm-up call);
- cost: denoiser evaluations (NFE) per image, from a forward pre-hook on the denoiser (`diffaccel.core.count_nfe`),
  and FLOPs per image from torch's `FlopCounterMode` over a one-image call (matmuls, convolutions and attention);
- quality: FID and KID (domain: digits-features, d = 128) against the zoo's digits test split (n = 360), the
  prompted-class accuracy of the digits classifier and the CLIP score (zoo `digits-clip`) when prompts or labels
  exist;
- paired fidelity, when given the unaccelerated images of the same seeds (`paired_reference=`): PSNR, SSIM and
  feature distance image by image (`evals.paired`).

`diffaccel bench` runs named suites of `BenchConfig`s through it; later methods add suites with `register_suite`.
"""

from __future__ import annotations

import inspect
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ..core import count_nfe, make_generators, measure, pipeline_output_to_uint8, to_uint8
from .errors import EvalInputError, FeatureExtractorWeightsNotFound
from .extractors import FeatureExtractor, load_extractor
from .metrics import Features, clip_score, features_from_images, fid_from_stats, kid
from .paired import PairedFidelity, paired_fidelity


@dataclass
class EvalResult:
    """One row of the shared benchmark table; `as_dict()` is what `--json` prints (images excluded)."""

    name: str
    pipeline: str
    num_images: int
    batch_size: int
    seed: int
    call_kwargs: dict
    device: str
    images_per_second: float
    seconds_per_image: float  # median over batches
    nfe_per_image: float  # denoiser calls each image went through
    denoiser_rows_per_image: float  # batch rows through the denoiser per image (2x NFE with batched CFG)
    flops_per_image: float | None
    fid: float
    kid_mean: float
    kid_std: float
    kid_subset_size: int
    class_accuracy: float | None
    clip_score: float | None
    clip_model: str | None
    extractor: str
    extractor_sha256: str
    dims: int
    resize: str
    reference: str
    n_a: int
    n_b: int
    notes: list[str] = field(default_factory=list)
    paired: PairedFidelity | None = None  # against the unaccelerated images of the same seeds, when given
    paired_with: str | None = None  # name of the reference configuration
    images: torch.Tensor | None = field(default=None, repr=False)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("images")
        d["paired"] = self.paired.as_dict() if self.paired is not None else None
        return d


# ------------------------------------------------------------------------------------------------ reference

_REFERENCE_CACHE: dict[tuple, Features] = {}
_EXTRACTOR_CACHE: dict[tuple[str, str], FeatureExtractor] = {}


def _cached_extractor(name: str, resize: str) -> FeatureExtractor:
    """Extractors are read-only (eval mode, no grad): one per (name, resize) per process."""
    if (name, resize) not in _EXTRACTOR_CACHE:
        _EXTRACTOR_CACHE[(name, resize)] = load_extractor(name, resize=resize)
    return _EXTRACTOR_CACHE[(name, resize)]


def reference_images(split: str = "test") -> torch.Tensor:
    """The zoo digits split as uint8 (N, 1, 32, 32) (rounded from the [-1, 1] floats)."""
    from ..zoo import load_split

    return to_uint8(load_split(split).images, value_range=(-1.0, 1.0))


def reference_features(extractor: FeatureExtractor, split: str = "test") -> Features:
    """Features of a zoo split, computed once per process and extractor setting."""
    key = (split, extractor.name, extractor.sha256, extractor.resize)
    if key not in _REFERENCE_CACHE:
        feats = features_from_images(extractor, reference_images(split), source=f"zoo digits {split} split")
        _REFERENCE_CACHE[key] = feats
    return _REFERENCE_CACHE[key]


# ----------------------------------------------------------------------------------------------- generation


def _conditioning(pipe, prompts_or_labels: Sequence | None, num_images: int) -> tuple[str, list | None]:
    """('prompt' | 'class_labels' | 'none', per-image conditioning) for a pipeline's call signature."""
    from ..zoo import caption, label_from_prompt

    params = inspect.signature(pipe.__call__).parameters
    kind = "prompt" if "prompt" in params else "class_labels" if "class_labels" in params else "none"
    if kind == "none":
        if prompts_or_labels:
            raise EvalInputError(f"{type(pipe).__name__} is unconditional; it takes no prompts or labels")
        return kind, None
    items = list(prompts_or_labels) if prompts_or_labels else list(range(10))
    cond = [items[i % len(items)] for i in range(num_images)]
    if kind == "prompt":
        return kind, [caption(c) if isinstance(c, (int, np.integer)) else str(c) for c in cond]
    labels = []
    for c in cond:
        lab = int(c) if isinstance(c, (int, np.integer)) else label_from_prompt(str(c))
        if lab is None:
            raise EvalInputError(f"cannot turn {c!r} into a class label for {type(pipe).__name__}")
        labels.append(lab)
    return kind, labels


def _call(pipe, kind: str, cond: list | None, start: int, stop: int, seed: int, call_kwargs: dict):
    kw = dict(call_kwargs)
    kw.setdefault("output_type", "np")
    gens = make_generators(seed + start, stop - start)
    if kind == "none":
        return pipe(batch_size=stop - start, generator=gens, **kw)
    return pipe(cond[start:stop], generator=gens, **kw)


def _flops_one_image(pipe, kind: str, cond: list | None, seed: int, call_kwargs: dict) -> float | None:
    from ..core.flops import flop_counter

    counter = flop_counter()
    try:
        with counter, torch.no_grad():
            _call(pipe, kind, cond, 0, 1, seed, call_kwargs)
    except Exception:  # noqa: BLE001 - an op the counter cannot trace must not stop the evaluation
        return None
    return float(counter.get_total_flops())


def evaluate(pipeline, prompts_or_labels: Sequence[str | int] | None = None, num_images: int = 100, seed: int = 0,
             *, name: str | None = None, batch_size: int | None = None, extractor: str | FeatureExtractor = "digits",
             resize: str = "clean", reference: str = "test", clip_model: str | None = "digits-clip",
             kid_subsets: int = 100, kid_subset_size: int = 1000, count_flops: bool = True, warmup: bool = True,
             keep_images: bool = False, progress: bool = False, paired_reference: torch.Tensor | None = None,
             paired_with: str | None = None, **call_kwargs: Any) -> EvalResult:
    """Generate `num_images` images with `pipeline(...)` and measure speed, cost and quality (module docstring).

    `prompts_or_labels` are cycled to `num_images`: prompts (or digits, turned into captions) for text-to-image
    pipelines, digit labels (or prompts naming one) for class-conditional ones, None for unconditional ones
    (default for conditional pipelines: the digits 0-9). `call_kwargs` go to every pipeline call
    (e.g. `num_inference_steps=25`, `guidance_scale=4.0`). `paired_reference`: the unaccelerated images of the
    same seeds and conditioning (uint8 NCHW, e.g. another result's `images`), named `paired_with`; the result then
    carries their paired fidelity."""
    if num_images < 2:
        raise EvalInputError(f"num_images must be >= 2 for FID/KID, got {num_images}")
    if paired_reference is not None and paired_reference.shape[0] != num_images:
        raise EvalInputError(f"paired_reference has {paired_reference.shape[0]} images, expected {num_images} "
                             "(the same seeds and count)")
    batch_size = batch_size or min(num_images, 50)
    if batch_size < 1:
        raise EvalInputError(f"batch_size must be >= 1, got {batch_size}")
    if hasattr(pipeline, "set_progress_bar_config"):
        pipeline.set_progress_bar_config(disable=True)
    kind, cond = _conditioning(pipeline, prompts_or_labels, num_images)
    notes: list[str] = []
    flops = None
    if count_flops:
        flops = _flops_one_image(pipeline, kind, cond, seed, call_kwargs)
        if flops is None:
            notes.append("FLOP counting failed for this pipeline")
    elif warmup:
        _call(pipeline, kind, cond, 0, 1, seed, call_kwargs)

    outputs, per_image, calls_per_image, total = [], [], [], 0.0
    starts = list(range(0, num_images, batch_size))
    with count_nfe(pipeline) as nfe, torch.no_grad():
        for start in starts:
            stop = min(start + batch_size, num_images)
            before = nfe.calls
            t = measure(lambda s=start, e=stop: _call(pipeline, kind, cond, s, e, seed, call_kwargs),
                        warmup=0, repeats=1, device=getattr(pipeline, "device", None))
            # a search that runs prompt by prompt (best-of-N: one record per prompt) makes its denoiser calls once
            # per prompt; every image of one batched loop (FK: one record) went through all of them
            calls_per_image.append((nfe.calls - before) / len(getattr(t.result, "searches", None) or [None]))
            outputs.append(pipeline_output_to_uint8(t.result.images))
            per_image.append(t.median / (stop - start))
            total += t.median
            if progress:
                print(f"  {name or type(pipeline).__name__}: {stop}/{num_images} images", file=sys.stderr)
    images = torch.cat(outputs)

    ext = _cached_extractor(extractor, resize) if isinstance(extractor, str) else extractor
    gen = features_from_images(ext, images, with_logits=ext.has_logits and ext.name == "domain:digits-features")
    ref = reference_features(ext, reference)
    if gen.stats.n <= ext.num_features:
        notes.append(f"n_a={gen.stats.n} <= d={ext.num_features}: rank-deficient covariance, FID dominated by noise")
    m = min(kid_subset_size, gen.stats.n, ref.stats.n)
    k = kid(gen.stats.features, ref.stats.features, subsets=kid_subsets, subset_size=m, seed=seed)

    accuracy = None
    labels = cond if kind == "class_labels" else None
    if kind == "prompt":
        from ..zoo import label_from_prompt

        labels = [label_from_prompt(p) for p in cond]
    if labels is not None and any(lab is not None for lab in labels):
        logits = gen.logits if gen.logits is not None else _cached_extractor("digits", resize).logits(images)
        pred = np.asarray(logits).argmax(axis=1)
        hits = [int(p == lab) for p, lab in zip(pred, labels, strict=True) if lab is not None]
        accuracy = float(np.mean(hits))

    clip_value = clip_name = None
    if cond is not None and clip_model:
        from ..zoo import caption

        captions = cond if kind == "prompt" else [caption(lab) for lab in cond]
        try:
            cs = clip_score(images, captions, clip_model)
            clip_value, clip_name = cs.score, cs.model
        except FeatureExtractorWeightsNotFound as exc:
            notes.append(f"CLIP score skipped: {exc}")

    paired = None
    if paired_reference is not None:
        paired = paired_fidelity(images, paired_reference, extractor=ext)

    desc = ext.describe()
    return EvalResult(
        name=name or type(pipeline).__name__, pipeline=type(pipeline).__name__, num_images=num_images,
        batch_size=batch_size, seed=seed, call_kwargs={k_: repr(v) if not isinstance(v, (int, float, str, bool))
                                                       else v for k_, v in call_kwargs.items()},
        device=str(getattr(pipeline, "device", "cpu")), images_per_second=num_images / total,
        seconds_per_image=float(np.median(per_image)), nfe_per_image=float(np.mean(calls_per_image)),
        denoiser_rows_per_image=nfe.rows / num_images, flops_per_image=flops,
        fid=fid_from_stats(gen.reference(), ref.reference()), kid_mean=k.mean, kid_std=k.std, kid_subset_size=m,
        class_accuracy=accuracy, clip_score=clip_value, clip_model=clip_name, extractor=desc["extractor"],
        extractor_sha256=desc["extractor_sha256"], dims=desc["dims"], resize=desc["resize"],
        reference=f"zoo digits {reference} split", n_a=gen.stats.n, n_b=ref.stats.n, notes=notes, paired=paired,
        paired_with=paired_with if paired is not None else None, images=images if keep_images else None)


# -------------------------------------------------------------------------------------------------- bench


@dataclass
class BenchConfig:
    """One benchmark row: a name, how to build the pipeline, and what to call it with."""

    name: str
    factory: Callable[[], Any]
    call_kwargs: dict = field(default_factory=dict)
    prompts_or_labels: Sequence[str | int] | None = None
    requires: tuple[str, ...] = ()  # zoo entries whose weights must exist (checked before anything runs)
    reference: str | None = None  # name of the unaccelerated configuration to pair with (PSNR/SSIM)


def missing_requirements(configs: Sequence[BenchConfig]) -> list[str]:
    """Zoo entries the configurations need whose weight folders do not exist."""
    from ..zoo import entry_path

    return sorted({r for c in configs for r in c.requires if not entry_path(r).is_dir()})


def _zoo_with_ddim(model: str) -> Callable[[], Any]:
    def build():
        from diffusers import DDIMScheduler

        from ..zoo import load

        pipe = load(model)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        return pipe

    return build


def baseline_suite(steps: int = 50) -> list[BenchConfig]:
    """The zoo pipelines with DDIM at `steps` steps: the baseline every acceleration is compared with."""
    digits = list(range(10))
    return [
        BenchConfig(f"digits-ddpm DDIM-{steps}", _zoo_with_ddim("digits-ddpm"), {"num_inference_steps": steps},
                    requires=("digits-ddpm",)),
        BenchConfig(f"digits-sd DDIM-{steps} cfg7.5", _zoo_with_ddim("digits-sd"),
                    {"num_inference_steps": steps, "guidance_scale": 7.5}, digits, requires=("digits-sd",)),
        BenchConfig(f"digits-dit DDIM-{steps} cfg4", _zoo_with_ddim("digits-dit"),
                    {"num_inference_steps": steps, "guidance_scale": 4.0}, digits, requires=("digits-dit",)),
    ]


def smoke_suite(steps: int = 4) -> list[BenchConfig]:
    """Random-weight tiny pipelines: exercises the harness in seconds (numbers are meaningless)."""
    from ..zoo import load

    return [
        BenchConfig(f"random-ddpm DDIM-{steps}", lambda: load("random-ddpm"), {"num_inference_steps": steps}),
        BenchConfig(f"random-sd DDIM-{steps}", lambda: load("random-sd"), {"num_inference_steps": steps}, [0, 1]),
        BenchConfig(f"random-dit DDIM-{steps}", lambda: load("random-dit"), {"num_inference_steps": steps}, [0, 1]),
    ]


SUITES: dict[str, Callable[[int], list[BenchConfig]]] = {"baseline": baseline_suite, "smoke": smoke_suite}
DEFAULT_STEPS = {"baseline": 50, "smoke": 4}
#: suite name -> report(results, out_dir, command) writing files (e.g. the Pareto table and plot); returns paths
REPORTS: dict[str, Callable[..., Sequence[Any]]] = {}


def register_suite(name: str, builder: Callable[[int], list[BenchConfig]], default_steps: int = 50,
                   report: Callable[..., Sequence[Any]] | None = None) -> None:
    """Add a named suite for `diffaccel bench --suite NAME` (a method issue registers its rows here), optionally
    with a report that `bench --out DIR` writes."""
    SUITES[name] = builder
    DEFAULT_STEPS[name] = default_steps
    if report is not None:
        REPORTS[name] = report


def run_bench(configs: Sequence[BenchConfig], num_images: int = 100, seed: int = 0, *, progress: bool = True,
              reference: str | None = None, **evaluate_kwargs: Any) -> list[EvalResult]:
    """Evaluate each configuration with the same seeds and image count.

    A configuration whose `reference` (or, for all of them, `reference=`) names another configuration of the run
    is paired with that one's images: PSNR/SSIM/feature distance against the same seeds. Referenced
    configurations run first."""
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise EvalInputError(f"configuration names must be unique, got {names}")
    wanted = {c.name: reference or c.reference for c in configs}
    for name, ref in wanted.items():
        if ref is not None and ref not in names:
            raise EvalInputError(f"configuration {name!r} pairs with {ref!r}, which is not in this run; "
                                 f"available: {', '.join(names)}")
    referenced = {ref for ref in wanted.values() if ref is not None}
    order = sorted(configs, key=lambda c: c.name not in referenced)  # stable: references first
    keep_all = bool(evaluate_kwargs.pop("keep_images", False))
    kept: dict[str, torch.Tensor] = {}
    by_name: dict[str, EvalResult] = {}
    for cfg in order:
        t0 = time.perf_counter()
        if progress:
            print(f"[bench] {cfg.name}: loading", file=sys.stderr)
        pipe = cfg.factory()
        ref = wanted[cfg.name]
        if ref is not None and ref != cfg.name and ref not in kept:
            raise EvalInputError(f"configuration {cfg.name!r} pairs with {ref!r}, which itself pairs with another "
                                 "configuration; pair every row with one unaccelerated configuration")
        res = evaluate(pipe, cfg.prompts_or_labels, num_images, seed, name=cfg.name, progress=progress,
                       keep_images=keep_all or cfg.name in referenced,
                       paired_reference=kept.get(ref) if ref != cfg.name else None, paired_with=ref,
                       **evaluate_kwargs, **cfg.call_kwargs)
        if cfg.name in referenced:
            kept[cfg.name] = res.images
            if not keep_all:
                res.images = None
        if progress:
            print(f"[bench] {cfg.name}: done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        by_name[cfg.name] = res
    return [by_name[n] for n in names]


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def format_table(results: Sequence[EvalResult]) -> str:
    """Fixed-width table of the rows (FID/KID are domain: digits-features unless the header says otherwise)."""
    paired = any(r.paired is not None for r in results)
    head = (f"{'configuration':30s} {'img/s':>7s} {'s/img':>8s} {'NFE':>5s} {'GFLOP/img':>10s} {'FID':>8s} "
            f"{'KIDx1e3':>8s} {'acc':>6s} {'CLIP':>6s}")
    if paired:
        head += f" {'PSNR':>6s} {'SSIM':>6s} {'fdist':>6s}"
    lines = [head, "-" * len(head)]
    for r in results:
        gflops = None if r.flops_per_image is None else r.flops_per_image / 1e9
        line = (f"{r.name[:30]:30s} {r.images_per_second:7.2f} {r.seconds_per_image:8.4f} "
                f"{r.nfe_per_image:5.0f} {_fmt(gflops, '10.3f'):>10s} {r.fid:8.3f} "
                f"{r.kid_mean * 1e3:8.2f} {_fmt(r.class_accuracy, '6.1%'):>6s} {_fmt(r.clip_score, '6.2f'):>6s}")
        if paired:
            p = r.paired
            line += ("" if p is None else
                     f" {'inf' if math.isinf(p.psnr) else format(p.psnr, '6.2f'):>6s} {p.ssim:6.4f} "
                     f"{_fmt(p.feature_dist, '6.4f'):>6s}")
        lines.append(line)
    if results:
        r = results[0]
        lines.append(f"FID/KID: {r.extractor} (d={r.dims}, resize={r.resize}) vs {r.reference}, "
                     f"n_a={r.n_a}, n_b={r.n_b}, KID subsets of {r.kid_subset_size}")
    refs = sorted({r.paired_with for r in results if r.paired is not None})
    if refs:
        lines.append(f"PSNR (dB, mean over differing pairs) / SSIM / feature distance: image by image against "
                     f"the same seeds of {', '.join(refs)}")
    return "\n".join(lines)
