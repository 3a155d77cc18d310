"""GPU check: one prepared process that turns diffaccel's CPU claims into GPU numbers inside one short device window.

(Over 450 lines on purpose: one self-contained script, run once per GPU session, whose sections share the
budget, the atomic result writer and the report.)

    python benchmarks/gpu_check.py --out gpu_results            # on a CUDA machine (or: make gpu-check)
    python benchmarks/gpu_check.py --dry-run --out /tmp/gc      # every section at tiny sizes, any machine

It runs from the repository root with or without `pip install -e .` (it imports the checkout it sits in); the
machine needs a CUDA build of torch plus the project's runtime dependencies (diffusers, transformers, safetensors,
scikit-learn, torchmetrics, scipy); xformers and deepcache (`pip install --no-deps deepcache`) are optional rows.

It writes `gpu_check.json` and `gpu_check.md` into `--out` after EVERY section (atomically), so a run that is
killed part-way still leaves what it measured. Each section runs in its own try/except under its own time limit
(SIGALRM) and only if the overall budget still allows it; a skipped, timed-out or failed section is recorded with
the reason. Without CUDA (and without --dry-run) it says so in one line, runs the CPU dry-run and exits 0.

Sections (in run order; the most fragile, torch.compile, runs last):

1. environment — device, memory, torch / CUDA / cuDNN / diffusers versions, xformers and DeepCache availability.
2. zoo_dtypes — every zoo pipeline in fp32, fp16 and bf16: images/s, max |fp16 - fp32| and |bf16 - fp32| of the
   output images, and digits-features class accuracy for the digits models.
3. unet_caching — SD-1.5-size UNet (random weights) in a stock `StableDiffusionPipeline`, 512 px (64x64 latents),
   batch 2 (one image with CFG 7.5), 50 DDIM steps, fp16: plain, encoder propagation (paper `sd50` schedule)
   sequential and parallel decoding, diffaccel's shipped branch reuse plans, DeepCache (interval
   3, branch 0) where installed. Wall seconds per loop and peak memory, median of 3, interleaved. The shipped
   branch reuse plans were calibrated on digits-sd; here their per-step row pattern runs on the SD-1.5 layout,
   which times the pattern (its fidelity on real SD-1.5 weights is not measured by this check).
4. dit_caching — DiT-XL/2 (random weights) 256 px, batch 2 (CFG 4), 20 DDIM steps, fp16: plain, FORA N=2 and N=3,
   the shipped HarmoniCa plans mapped onto 28 blocks. Median of 3, interleaved.
5. attention — SD-1.5 UNet, one call at 512 px batch 2: torch SDPA vs xformers (where installed), median of 10.
6. flux_blocks — FLUX.1-dev-size double- and single-stream blocks (4096 image + 512 text tokens, bf16), when the
   zoo has a `random-flux-dev` entry; the per-step transformer time is projected as 19 x double + 38 x single.
7. parallel_nccl — patch parallelism on 2 ranks of ONE GPU: sync-mode exactness against one process, bytes per
   call, and the overlap of the asynchronous (displaced) exchange. Both ranks share the device, so this is a
   correctness and overlap check, NOT a speed-up. NCCL >= 2.5 refuses two ranks on one device ("Duplicate GPU
   detected"); the section then records that refusal, and uses two GPUs when the machine has them.
8. compile — torch.compile: DiT-XL/2 with regional compilation (each transformer block, mode
   `max-autotune-no-cudagraphs`), plain and with FORA N=2 (HarmoniCa's unit hooks sit inside each block, so the
   recorded graph count shows the recompiles they cause); SD-1.5 UNet with `compile_repeated_blocks` (regional)
   plain, with encoder propagation and with a shipped branch reuse plan (their decisions stay outside the compiled
   transformer blocks), then the whole UNet.
   Compile time (first loop minus a steady loop) is recorded separately from the steady loop time.

Budget (default --budget-s 420, fitted to a 15-minute device window: ~4 min machine start-up and file transfer,
7 min of sections, ~1 min of margin for imports and model construction outside the timed sections and for the
results coming back). Shares of the budget per section: environment 2%, zoo_dtypes 10%, unet_caching 26%,
dit_caching 10%, attention 5%, flux_blocks 5%, parallel_nccl 12%, compile 30% (about 8, 42, 109, 42, 21, 21, 50 and
126 s of the default 420 s). A section may use time an earlier
one left unused, never more than what remains; a section needs at least its minimum to start. In --dry-run the
same code runs at tiny sizes (tiny UNet / DiT / Flux blocks, 2-3 steps, 1 repeat, the `eager` compile backend) in
about a minute of CPU; there every section's limit is at least 120 s (it guards against hangs only, as a slow or
shared CPU must not fail the check).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import importlib
import importlib.util
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _import_diffaccel():
    """The installed package, or the repository this script sits in (loaded as `diffaccel`) when not installed."""
    try:
        return importlib.import_module("diffaccel")
    except ImportError:
        spec = importlib.util.spec_from_file_location("diffaccel", REPO / "__init__.py",
                                                      submodule_search_locations=[str(REPO)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["diffaccel"] = module
        spec.loader.exec_module(module)
        return module


diffaccel = _import_diffaccel()

SECTION_SHARES = {  # fraction of --budget-s (module docstring)
    "environment": 0.02, "zoo_dtypes": 0.10, "unet_caching": 0.26, "dit_caching": 0.10, "attention": 0.05,
    "flux_blocks": 0.05, "parallel_nccl": 0.12, "compile": 0.30,
}
MIN_START_S = {"environment": 1.0, "zoo_dtypes": 10.0, "unet_caching": 20.0, "dit_caching": 10.0, "attention": 5.0,
               "flux_blocks": 5.0, "parallel_nccl": 15.0, "compile": 30.0}
COMPILE_MODE = "max-autotune-no-cudagraphs"
DRY_RUN_MIN_LIMIT_S = 120.0


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class SectionTimeout(Exception):
    """Raised by SIGALRM when a section exceeds its time limit."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise `SectionTimeout` in the main thread after `seconds` (no-op where SIGALRM does not exist)."""
    if not hasattr(signal, "SIGALRM") or seconds <= 0:
        yield
        return

    def _raise(signum, frame):
        raise SectionTimeout(f"time limit of {seconds:.0f} s reached")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ---------------------------------------------------------------------------------------------------- context


@dataclass
class Ctx:
    """What every section sees: device, dtype, sizes (full or dry-run), the clock, and the shared model cache."""

    device: torch.device
    dry_run: bool
    out: Path
    budget_s: float
    started: float = field(default_factory=time.monotonic)
    section_deadline: float = math.inf
    models: dict[str, Any] = field(default_factory=dict)
    partial: dict[str, Any] = field(default_factory=dict)  # what the running section measured so far

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def half(self) -> torch.dtype:
        """fp16 on CUDA; fp32 on CPU (CPU fp16 kernels are missing or slow — the dry-run checks code paths only)."""
        return torch.float16 if self.cuda else torch.float32

    def left(self) -> float:
        return min(self.budget_s - (time.monotonic() - self.started), self.section_deadline - time.monotonic())

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_mib(self) -> float | None:
        return torch.cuda.max_memory_allocated(self.device) / 2**20 if self.cuda else None

    def free(self, *names: str) -> None:
        for n in names:
            self.models.pop(n, None)
        import gc

        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


def timed(ctx: Ctx, fn: Callable[[], Any]) -> tuple[float, Any]:
    ctx.sync()
    t0 = time.perf_counter()
    out = fn()
    ctx.sync()
    return time.perf_counter() - t0, out


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def interleaved(ctx: Ctx, methods: dict[str, Callable[[], Any]], repeats: int, *, reserve_s: float = 0.0,
                warmup: bool = True, into: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Time each method `repeats` times, interleaved (round-robin), with per-method peak memory. Stops early (and
    says so) when the section's time runs low: every finished round is kept, and `into` (the section's partial
    result) holds the rows as they grow, so a time-out keeps them too."""
    rows: dict[str, dict[str, Any]] = into if into is not None else {}
    rows.update({m: {"seconds": [], "median_s": None, "peak_mib": None, "error": None} for m in methods})
    outputs: dict[str, Any] = {}
    if warmup:
        for name, fn in methods.items():
            try:
                _, outputs[name] = timed(ctx, fn)
            except SectionTimeout:
                raise
            except Exception as exc:  # noqa: BLE001 - one broken method must not hide the others
                rows[name]["error"] = f"{type(exc).__name__}: {exc}"
    for rep in range(repeats):
        for name, fn in methods.items():
            if rows[name]["error"]:
                continue
            est = rows[name]["seconds"][-1] if rows[name]["seconds"] else 0.0
            if ctx.left() - reserve_s < est * 1.2:
                rows[name].setdefault("stopped", f"time ran low after {rep} repeats")
                continue
            ctx.reset_peak()
            try:
                dt, outputs[name] = timed(ctx, fn)
            except SectionTimeout:
                raise
            except Exception as exc:  # noqa: BLE001
                rows[name]["error"] = f"{type(exc).__name__}: {exc}"
                continue
            rows[name]["seconds"].append(dt)
            rows[name]["median_s"] = median(rows[name]["seconds"])
            peak = ctx.peak_mib()
            if peak is not None:
                rows[name]["peak_mib"] = max(rows[name]["peak_mib"] or 0.0, peak)
    for name in methods:
        rows[name]["_output"] = outputs.get(name)
    return rows


def strip_outputs(rows: dict[str, dict[str, Any]], reference: str | None = None) -> dict[str, dict[str, Any]]:
    """Replace each row's output tensor by its max relative difference to the reference row's output."""
    ref = rows.get(reference, {}).get("_output") if reference else None
    for name, row in rows.items():
        out = row.pop("_output", None)
        if ref is not None and out is not None and name != reference:
            a, b = _as_tensor(out).float(), _as_tensor(ref).float()
            row["max_rel_diff_vs_" + reference] = float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
    base = rows.get(reference, {}).get("median_s") if reference else None
    if base:
        for row in rows.values():
            if row.get("median_s"):
                row["speedup_vs_" + reference] = base / row["median_s"]
    return rows


def _as_tensor(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    for attr in ("images", "sample", "prev_sample"):
        if hasattr(x, attr):
            return _as_tensor(getattr(x, attr))
    if isinstance(x, (tuple, list)):
        return _as_tensor(x[0])
    return torch.as_tensor(x)


# ---------------------------------------------------------------------------------------------------- sections


def section_environment(ctx: Ctx) -> dict[str, Any]:
    import diffusers

    env: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available()
        else None, "diffusers": diffusers.__version__, "diffaccel": getattr(diffaccel, "__version__", None),
        "cuda_available": torch.cuda.is_available(), "device": str(ctx.device), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if ctx.cuda:
        props = torch.cuda.get_device_properties(ctx.device)
        env.update(device_name=props.name, device_memory_gib=round(props.total_memory / 2**30, 2),
                   compute_capability=f"{props.major}.{props.minor}", device_count=torch.cuda.device_count(),
                   bf16_supported=torch.cuda.is_bf16_supported())
        with contextlib.suppress(Exception):
            import torch.distributed as dist

            env["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if dist.is_nccl_available() else None
    else:
        env["device_name"] = platform.processor() or platform.machine()
    for mod in ("xformers", "DeepCache", "triton", "transformers", "accelerate"):
        try:
            m = importlib.import_module(mod)
            env[f"{mod}_version"] = getattr(m, "__version__", "installed")
        except Exception as exc:  # noqa: BLE001 - xformers may import-fail on a CPU torch: record why
            env[f"{mod}_version"] = None
            env[f"{mod}_missing_because"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return env


def _conditioning(pipe, n: int) -> tuple[dict[str, Any], list[int | None]]:
    """Call kwargs that condition `n` images on the digits 0..9 (prompts or class labels), and the labels."""
    import inspect

    from diffaccel.zoo import caption

    params = inspect.signature(pipe.__call__).parameters
    labels = [i % 10 for i in range(n)]
    if "prompt" in params:
        return {"prompt": [caption(d) for d in labels]}, labels
    if "class_labels" in params:
        return {"class_labels": labels}, labels
    return {"batch_size": n}, [None] * n


def _pipeline_entries(ctx: Ctx) -> list[str]:
    from diffaccel.zoo import ENTRIES, entry_path

    names = [n for n, e in ENTRIES.items() if e.kind.endswith("Pipeline") and (not e.trained or
                                                                               entry_path(n).is_dir())]
    if ctx.dry_run:
        names = [n for n in ("random-sd", "digits-dit") if n in names]
    return names


def section_zoo_dtypes(ctx: Ctx) -> dict[str, Any]:
    from diffaccel.core import make_generators, pipeline_output_to_uint8
    from diffaccel.evals import load_extractor
    from diffaccel.zoo import load

    n, steps = (2, 2) if ctx.dry_run else (16, 20)
    dtypes = ["float32", "float16", "bfloat16"] if ctx.cuda else ["float32", "bfloat16"]
    classifier = load_extractor("digits", device=ctx.device)
    rows = ctx.partial
    rows.update({"images_per_call": n, "steps": steps, "dtypes": dtypes, "pipelines": {}})
    if not ctx.cuda:
        rows["note"] = "no CUDA: fp16 skipped (CPU fp16 is refused by the zoo loader)"
    for name in _pipeline_entries(ctx):
        if ctx.left() < 5:
            rows["pipelines"][name] = {"skipped": "section time ran out"}
            continue
        entry: dict[str, Any] = {}
        rows["pipelines"][name] = entry
        ref = None
        for dt in dtypes:
            try:
                pipe = load(name, device=ctx.device, dtype=dt)
                pipe.set_progress_bar_config(disable=True)
                cond, labels = _conditioning(pipe, n)
                kw = {**cond, "num_inference_steps": steps, "output_type": "np"}
                pipe(**{**kw, "num_inference_steps": 1})  # warm-up (kernels, allocator)
                dt_s, out = timed(ctx, lambda p=pipe, k=kw: p(generator=make_generators(0, n), **k).images)
                imgs = torch.as_tensor(out, dtype=torch.float32)
                row = {"images_per_s": n / dt_s, "seconds": dt_s, "finite": bool(torch.isfinite(imgs).all())}
                if dt == "float32":
                    ref = imgs
                elif ref is not None:
                    row["max_abs_diff_vs_fp32"] = float((imgs - ref).abs().max())
                    row["mean_abs_diff_vs_fp32"] = float((imgs - ref).abs().mean())
                if name.startswith("digits-") and labels[0] is not None:
                    u8 = pipeline_output_to_uint8(out)
                    pred = classifier.logits(u8.to(ctx.device)).argmax(dim=1).cpu()
                    row["class_accuracy"] = float((pred == torch.tensor(labels)).float().mean())
                entry[dt] = row
                del pipe
            except SectionTimeout:
                raise
            except Exception as exc:  # noqa: BLE001 - record and go on with the next dtype / pipeline
                entry[dt] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            ctx.free()
        log(f"zoo_dtypes {name}: " + ", ".join(f"{d} {r.get('images_per_s', float('nan')):.1f} img/s"
                                               for d, r in entry.items()))
    return rows


# ------------------------------------------------------------------------------------------- SD-1.5-size UNet


def sd_ddim():
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def sd15_pipeline(ctx: Ctx):
    """A stock StableDiffusionPipeline around the SD-1.5 UNet (random weights; tiny UNet in --dry-run) with a tiny
    text encoder and VAE: the loop is driven by `prompt_embeds` and returns latents, so only the UNet and the
    scheduler are timed, exactly as a user's pipeline call runs them."""
    if "sd15_pipe" in ctx.models:
        return ctx.models["sd15_pipe"]
    from diffaccel.zoo import load
    from diffusers import StableDiffusionPipeline

    small = load("random-sd")
    unet = small.unet if ctx.dry_run else load("random-sd15-unet")
    pipe = StableDiffusionPipeline(vae=small.vae, text_encoder=small.text_encoder, tokenizer=small.tokenizer,
                                   unet=unet, scheduler=sd_ddim(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe = pipe.to(ctx.device, ctx.half)
    pipe.set_progress_bar_config(disable=True)
    ctx.models["sd15_pipe"] = pipe
    return pipe


def sd15_call_kwargs(ctx: Ctx, pipe, steps: int) -> dict[str, Any]:
    latent = 8 if ctx.dry_run else 64  # 64x64 latents = 512 px
    dim = pipe.unet.config.cross_attention_dim
    g = torch.Generator().manual_seed(0)
    pe = torch.randn(1, 77, dim, generator=g).to(ctx.device, ctx.half)
    ne = torch.randn(1, 77, dim, generator=g).to(ctx.device, ctx.half)
    side = latent * pipe.vae_scale_factor
    return {"prompt_embeds": pe, "negative_prompt_embeds": ne, "guidance_scale": 7.5, "num_inference_steps": steps,
            "height": side, "width": side, "output_type": "latent"}


def _generator(ctx: Ctx) -> torch.Generator:
    return torch.Generator(ctx.device).manual_seed(0)


def unet_plan_rows(pipe, steps: int) -> dict[str, Callable[[], Callable[[], Any]]]:
    """diffaccel's shipped branch reuse plans for `steps` steps, their per-step row pattern mapped onto this UNet:
    name -> installer returning a remover."""
    from diffaccel.caching import BranchReusePlan, apply_branch_reuse, remove_branch_reuse, shipped_unet_plans
    from diffaccel.caching.calibrate import plan_from_rows

    out = {}
    for name, path in shipped_unet_plans().items():
        shipped = BranchReusePlan.load(path)
        rows = shipped.metadata.get("rows", "").split(",")
        if len(rows) != shipped.num_steps:
            continue
        if len(rows) != steps:  # dry run: the pattern's first rows
            rows = (rows * (steps // len(rows) + 1))[:steps]
        plan = plan_from_rows(rows, pipe.unet, {"from": name})

        def install(plan=plan):
            apply_branch_reuse(pipe, plan)
            return lambda: remove_branch_reuse(pipe)
        out[f"branch_reuse[{name}]"] = install
    return out


def section_unet_caching(ctx: Ctx) -> dict[str, Any]:
    from diffaccel.caching import (
        EncoderPropagationConfig,
        apply_encoder_propagation,
        cached_call,
        remove_encoder_propagation,
    )

    steps, repeats = (3, 1) if ctx.dry_run else (50, 3)
    pipe = sd15_pipeline(ctx)
    kw = sd15_call_kwargs(ctx, pipe, steps)
    schedule = "sd50" if steps == 50 else "uniform-2"
    notes: list[str] = []

    def plain():
        return pipe(generator=_generator(ctx), **kw).images

    def with_ep(parallel: bool):
        def run():
            apply_encoder_propagation(pipe, EncoderPropagationConfig(key_steps=schedule, parallel=parallel,
                                                                     noise_injection=None))
            try:
                return cached_call(pipe, generator=_generator(ctx), **kw).images
            finally:
                remove_encoder_propagation(pipe)
        return run

    methods: dict[str, Callable[[], Any]] = {"plain": plain, f"ep_{schedule}_sequential": with_ep(False),
                                             f"ep_{schedule}_parallel": with_ep(True)}
    for name, install in unet_plan_rows(pipe, steps).items():
        def run(install=install):
            remove = install()
            try:
                return cached_call(pipe, generator=_generator(ctx), **kw).images
            finally:
                remove()
        methods[name] = run
    if len(methods) == 3:
        notes.append("no shipped branch reuse plan in this checkout: row skipped")
    try:
        from DeepCache import DeepCacheSDHelper

        def deepcache():
            helper = DeepCacheSDHelper(pipe=pipe)
            helper.set_params(cache_interval=3, cache_branch_id=0)
            helper.enable()
            try:
                return pipe(generator=_generator(ctx), **kw).images
            finally:
                helper.disable()
        methods["deepcache_i3_b0"] = deepcache
    except ImportError:
        notes.append("DeepCache not installed (pip install --no-deps deepcache): row skipped")
    res = ctx.partial
    res.update({"model": "tiny random-sd UNet (dry run)" if ctx.dry_run else "random-sd15-unet (SD-1.5 UNet, 860M)",
                "dtype": str(ctx.half), "latent": kw["height"] // pipe.vae_scale_factor, "batch_rows": 2,
                "guidance_scale": 7.5, "steps": steps, "scheduler": "DDIM", "repeats": repeats,
                "timing": "wall seconds per whole pipeline call (latents out), median over interleaved repeats",
                "rows": {}, "notes": notes})
    rows = strip_outputs(interleaved(ctx, methods, repeats, into=res["rows"]), "plain")
    for name, row in rows.items():
        log(f"unet_caching {name}: median {row['median_s']} s, peak {row['peak_mib']} MiB, error {row['error']}")
    return res


# ------------------------------------------------------------------------------------------------ DiT-XL/2


def dit_model(ctx: Ctx):
    if "dit" not in ctx.models:
        from diffaccel.zoo import load

        model = load("random-dit").transformer if ctx.dry_run else load("random-dit-xl-2")
        ctx.models["dit"] = model.to(ctx.device, ctx.half).eval()
    return ctx.models["dit"]


@torch.no_grad()
def dit_loop(ctx: Ctx, transformer, scheduler, steps: int, guidance: float = 4.0) -> torch.Tensor:
    """DiTPipeline's sampling loop (CFG on a batch of 2: class 1 and the null class), latents out."""
    cfg = transformer.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g).to(ctx.device, ctx.half)
    labels = torch.tensor([1, cfg.num_embeds_ada_norm], device=ctx.device)
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        inp = torch.cat([x, x])
        out = transformer(inp, timestep=t.expand(2).to(ctx.device), class_labels=labels).sample
        eps = out[:, :cfg.in_channels]
        cond, uncond = eps.chunk(2)
        eps = uncond + guidance * (cond - uncond)
        x = scheduler.step(eps, t, x).prev_sample
    return x


def _harmonica_plans(transformer) -> dict[str, Any]:
    """Shipped HarmoniCa plans mapped onto this transformer's depth (nearest block in relative depth)."""
    from diffaccel import caching

    resample = getattr(caching, "resample_plan", None)
    if resample is None:
        resample = importlib.import_module("diffaccel.caching.harmonica").resample_plan
    out = {}
    for name, path in caching.shipped_plans().items():
        if "harmonica" in name:
            out[name] = resample(caching.CachePlan.load(path), transformer)
    return out


def section_dit_caching(ctx: Ctx) -> dict[str, Any]:
    from diffaccel.caching import apply_cache_plan, fora_plan, remove_cache_plan, reset_caches
    from diffusers import DDIMScheduler

    steps, repeats = (3, 1) if ctx.dry_run else (20, 3)
    transformer = dit_model(ctx)
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    from diffaccel.caching.harmonica import unit_modules

    n_units = len(unit_modules(transformer))
    plans = {f"fora_n{n}": fora_plan(steps, n_units, n) for n in (2, 3)}
    notes = []
    try:
        for name, plan in _harmonica_plans(transformer).items():
            if not any(name.endswith(k) for k in ("-b1", "-b2")):
                continue
            if plan.num_steps == steps:
                plans[name] = plan
            elif ctx.dry_run:  # exercise the path: the plan's first rows
                plans[name] = type(plan)(plan.mask[:steps], metadata={"dry_run": f"first {steps} rows"})
                notes.append(f"{name}: first {steps} of its {plan.num_steps} rows (dry run)")
            else:
                notes.append(f"{name}: made for {plan.num_steps} steps, not {steps}: skipped")
    except Exception as exc:  # noqa: BLE001
        notes.append(f"shipped HarmoniCa plans unavailable: {type(exc).__name__}: {exc}")

    def plain():
        return dit_loop(ctx, transformer, scheduler, steps)

    def with_plan(plan):
        def run():
            apply_cache_plan(transformer, plan, force=True, timesteps_callback=lambda: scheduler.timesteps)
            try:
                reset_caches(transformer)
                return dit_loop(ctx, transformer, scheduler, steps)
            finally:
                remove_cache_plan(transformer)
        return run

    methods = {"plain": plain, **{name: with_plan(p) for name, p in plans.items()}}
    res = ctx.partial
    res.update({"model": "tiny random-dit (dry run)" if ctx.dry_run else "random-dit-xl-2 (DiT-XL/2, 675M)",
                "dtype": str(ctx.half), "latent": transformer.config.sample_size, "batch_rows": 2,
                "guidance_scale": 4.0, "steps": steps, "scheduler": "DDIM", "repeats": repeats, "units": n_units,
                "rows": {}, "notes": notes,
                "usage_ratio": {name: float(p.usage_ratio) for name, p in plans.items()}})
    rows = strip_outputs(interleaved(ctx, methods, repeats, into=res["rows"]), "plain")
    for name, row in rows.items():
        log(f"dit_caching {name}: median {row['median_s']} s, peak {row['peak_mib']} MiB, error {row['error']}")
    return res


# ---------------------------------------------------------------------------------------------- attention


def unet_call_inputs(ctx: Ctx, unet) -> dict[str, Any]:
    latent = 8 if ctx.dry_run else 64
    g = torch.Generator().manual_seed(0)
    return {"sample": torch.randn(2, unet.config.in_channels, latent, latent, generator=g).to(ctx.device, ctx.half),
            "timestep": torch.tensor(500, device=ctx.device),
            "encoder_hidden_states": torch.randn(2, 77, unet.config.cross_attention_dim,
                                                 generator=g).to(ctx.device, ctx.half)}


def section_attention(ctx: Ctx) -> dict[str, Any]:
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet = sd15_pipeline(ctx).unet
    inputs = unet_call_inputs(ctx, unet)
    repeats = 2 if ctx.dry_run else 10

    @torch.no_grad()
    def call():
        return unet(**inputs).sample

    methods = {"sdpa": call}
    notes = []
    xformers_ok = False
    if ctx.cuda:
        try:
            import xformers  # noqa: F401

            xformers_ok = True
        except ImportError:
            notes.append("xformers not installed: row skipped")
    else:
        notes.append("xformers has no CPU kernels: row skipped")
    unet.set_attn_processor(AttnProcessor2_0())
    if xformers_ok:
        def call_xformers():
            unet.enable_xformers_memory_efficient_attention()
            try:
                return call()
            finally:
                unet.set_attn_processor(AttnProcessor2_0())
        methods["xformers"] = call_xformers
    rows = strip_outputs(interleaved(ctx, methods, repeats), "sdpa")
    return {"model": "random-sd15-unet" if not ctx.dry_run else "tiny random-sd UNet (dry run)",
            "dtype": str(ctx.half), "timing": "one UNet call, batch 2, median", "repeats": repeats, "rows": rows,
            "notes": notes}


# ---------------------------------------------------------------------------------------------- Flux blocks

FLUX_DEV = {"dim": 3072, "heads": 24, "head_dim": 128, "double": 19, "single": 38, "img_tokens": 4096,
            "txt_tokens": 512}


def _flux_dims(ctx: Ctx) -> dict[str, int]:
    if ctx.dry_run:
        return {"dim": 64, "heads": 2, "head_dim": 32, "double": 2, "single": 4, "img_tokens": 64, "txt_tokens": 8}
    dims = dict(FLUX_DEV)
    with contextlib.suppress(Exception):  # the zoo entry's own config, built on the meta device (no weights)
        from diffaccel.zoo.random_models import build_random

        with torch.device("meta"):
            model = build_random("random-flux-dev")
        c = model.config
        dims.update(dim=c.num_attention_heads * c.attention_head_dim, heads=c.num_attention_heads,
                    head_dim=c.attention_head_dim, double=c.num_layers, single=c.num_single_layers)
    return dims


def section_flux_blocks(ctx: Ctx) -> dict[str, Any] | None:
    from diffaccel.zoo import ENTRIES

    if "random-flux-dev" not in ENTRIES and not ctx.dry_run:
        raise SkipSection("the zoo has no `random-flux-dev` entry in this checkout")
    from diffusers.models.embeddings import FluxPosEmbed
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    d = _flux_dims(ctx)
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    torch.manual_seed(0)
    double = FluxTransformerBlock(d["dim"], d["heads"], d["head_dim"]).to(ctx.device, dtype).eval()
    single = FluxSingleTransformerBlock(d["dim"], d["heads"], d["head_dim"]).to(ctx.device, dtype).eval()
    img = torch.randn(1, d["img_tokens"], d["dim"], device=ctx.device, dtype=dtype)
    txt = torch.randn(1, d["txt_tokens"], d["dim"], device=ctx.device, dtype=dtype)
    temb = torch.randn(1, d["dim"], device=ctx.device, dtype=dtype)
    side = int(math.isqrt(d["img_tokens"]))
    ids = torch.cat([torch.zeros(d["txt_tokens"], 3),
                     torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(side).float(), torch.arange(side).float(),
                                                indexing="ij"), -1).reshape(-1, 3).float()]).to(ctx.device)
    rope = FluxPosEmbed(theta=10000, axes_dim=[d["head_dim"] // 8, 7 * d["head_dim"] // 16,
                                               7 * d["head_dim"] // 16])(ids)
    repeats = 2 if ctx.dry_run else 10

    @torch.no_grad()
    def run_double():
        return double(hidden_states=img, encoder_hidden_states=txt, temb=temb, image_rotary_emb=rope)

    @torch.no_grad()
    def run_single():
        return single(hidden_states=img, encoder_hidden_states=txt, temb=temb, image_rotary_emb=rope)

    rows = interleaved(ctx, {"double_stream_block": run_double, "single_stream_block": run_single}, repeats)
    for row in rows.values():
        row.pop("_output", None)
    t2, t1 = rows["double_stream_block"]["median_s"], rows["single_stream_block"]["median_s"]
    projected = d["double"] * t2 + d["single"] * t1 if t2 and t1 else None
    return {"dims": d, "dtype": str(dtype), "entry_present": "random-flux-dev" in ENTRIES, "rows": rows,
            "projected_transformer_s_per_step": projected,
            "note": "one block of each kind timed; the per-step figure is 'double x t_double + single x t_single' "
                    "(embedders and the final layer excluded)"}


# -------------------------------------------------------------------------------------- patch parallel (NCCL)


def _rank_worker(args) -> int:
    """One rank of the parallel check (run as a subprocess by `section_parallel_nccl`); writes JSON to args.rank_out."""
    import torch.distributed as dist
    from diffaccel.parallel import PatchParallelConfig, init_distributed, parallelize

    result: dict[str, Any] = {"rank": int(os.environ["RANK"])}
    try:
        init_distributed(backend=args.backend, timeout_s=60)
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if args.backend == "nccl" else torch.device("cpu")
        dtype = torch.float16 if dev.type == "cuda" else torch.float32
        if args.worker_tiny:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "parallel"))
            from workers import tiny_unet  # the parallel tests' tiny UNet (tests/parallel/workers.py)

            unet, latent = tiny_unet(dtype).to(dev), 16
        else:
            from diffaccel.zoo import load

            unet, latent = load("random-sd15-unet").to(dev, dtype).eval(), 64
        g = torch.Generator().manual_seed(1)
        inputs = {"sample": torch.randn(2, unet.config.in_channels, latent, latent, generator=g).to(dev, dtype),
                  "timestep": torch.tensor(500, device=dev),
                  "encoder_hidden_states": torch.randn(2, 77, unet.config.cross_attention_dim,
                                                       generator=g).to(dev, dtype)}

        def call():
            with torch.no_grad():
                out = unet(**inputs, return_dict=False)[0]
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            return out

        ref = call()
        h = parallelize(unet, PatchParallelConfig(mode="sync", timeout_s=60))
        h.reset()
        got = call()
        result["sync_max_rel_err"] = float((got - ref).abs().max() / ref.abs().max())
        result["sync_comm"] = h.comm_report()
        h.remove()
        reps = 2 if args.worker_tiny else 5
        times: dict[str, float] = {}
        for variant, extra in (("async", {}), ("compute_only", {"skip_transfers": True}),
                               ("blocking", {"blocking_transfers": True})):
            h = parallelize(unet, PatchParallelConfig(mode="displaced", warmup_steps=1, timeout_s=60, **extra))
            h.reset()
            call(), call()  # calls 0 and 1 are synchronous warm-up
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                call()
                ts.append(time.perf_counter() - t0)
            times[variant] = statistics.median(ts)
            if variant == "async":
                result["displaced_comm"] = h.comm_report()
            h.remove()
        exposed = times["blocking"] - times["compute_only"]
        result["displaced_s_per_call"] = times
        result["overlap_fraction"] = (times["blocking"] - times["async"]) / exposed if exposed > 0 else None
        dist.barrier()
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which decides what it means
        result["error"] = f"{type(exc).__name__}: {str(exc)[:1500]}"
    Path(args.rank_out).write_text(json.dumps(result, default=str))
    return 0


def _launch_ranks(backend: str, local_ranks: list[int], tiny: bool, timeout_s: float) -> list[dict[str, Any]]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-ranks-"))
    procs = []
    for rank, local in enumerate(local_ranks):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(len(local_ranks)), "LOCAL_RANK": str(local),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, str(Path(__file__).resolve()), "--rank-worker", "--backend", backend,
               "--rank-out", str(tmp / f"rank{rank}.json")] + (["--worker-tiny"] if tiny else [])
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      start_new_session=True))
    deadline = time.monotonic() + timeout_s
    results = []
    try:
        for rank, p in enumerate(procs):
            try:
                _, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                _, err = p.communicate()
                results.append({"rank": rank, "error": f"timed out after {timeout_s:.0f} s (killed)"})
                continue
            f = tmp / f"rank{rank}.json"
            res = json.loads(f.read_text()) if f.is_file() else {"rank": rank, "error": "no result written"}
            if "error" in res or p.returncode:
                res["stderr_tail"] = err.decode(errors="replace")[-800:]
            results.append(res)
    finally:  # a section time-out lands here too: no rank outlives the section
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return results


def _rank_summary(r: dict[str, Any]) -> dict[str, Any]:
    """The numbers that matter from one rank's report: exactness, bytes per call, overlap."""
    def per_call(rep: dict | None, phase: str) -> float | None:
        if not rep:
            return None
        return sum(rep.get("phases", {}).get(phase, {}).get("wire_bytes_per_call", {}).values()) or None

    return {"rank": r.get("rank"), "error": r.get("error"), "sync_max_rel_err": r.get("sync_max_rel_err"),
            "sync_wire_bytes_per_call": per_call(r.get("sync_comm"), "sync"),
            "displaced_wire_bytes_per_call": per_call(r.get("displaced_comm"), "displaced"),
            "displaced_s_per_call": r.get("displaced_s_per_call"), "overlap_fraction": r.get("overlap_fraction")}


def section_parallel_nccl(ctx: Ctx) -> dict[str, Any]:
    note = ("2 ranks share one device: a correctness and overlap check (sync exactness, bytes, async overlap), "
            "NOT a speed-up")
    out: dict[str, Any] = {"note": note}
    if not ctx.cuda:
        out["backend"] = "gloo (CPU dry run)"
        out["ranks"] = _launch_ranks("gloo", [0, 0], True, max(10.0, ctx.left() - 2))
        out["summary"] = [_rank_summary(r) for r in out["ranks"]]
        return out
    out["backend"] = "nccl"
    out["ranks"] = _launch_ranks("nccl", [0, 0], ctx.dry_run, max(10.0, min(90.0, ctx.left() / 2)))
    errors = [r.get("error", "") for r in out["ranks"] if r.get("error")]
    if errors:
        out["same_device_result"] = ("NCCL refused two ranks on one GPU (NCCL >= 2.5 checks for a duplicate GPU)"
                                     if any("uplicate GPU" in e or "invalid usage" in e for e in errors)
                                     else "failed: see ranks")
        if torch.cuda.device_count() >= 2 and ctx.left() > 20:
            out["two_gpus"] = _launch_ranks("nccl", [0, 1], ctx.dry_run, max(10.0, ctx.left() - 5))
            out["note"] = "2 ranks on 2 GPUs of this machine (same-GPU NCCL refused): correctness and overlap check"
            out["summary"] = [_rank_summary(r) for r in out["two_gpus"]]
    else:
        out["summary"] = [_rank_summary(r) for r in out["ranks"]]
    return out


# -------------------------------------------------------------------------------------------------- compile


def _compile_kwargs(ctx: Ctx) -> dict[str, Any]:
    return {"backend": "eager"} if ctx.dry_run or not ctx.cuda else {"mode": COMPILE_MODE}


def _uncompile(model: torch.nn.Module) -> None:
    for m in model.modules():
        if getattr(m, "_compiled_call_impl", None) is not None:
            m._compiled_call_impl = None


def _first_and_steady(ctx: Ctx, fn: Callable[[], Any], steady: int, compiled: bool = True) -> dict[str, Any]:
    """First loop (includes compilation), then `steady` loops; compile time = first - median steady. Also the
    graphs dynamo compiled and the graph breaks it hit meanwhile (recompiles show up as extra graphs)."""
    from torch._dynamo.utils import counters

    graphs0, breaks0 = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    first, _ = timed(ctx, fn)
    times = []
    for _ in range(steady):
        if ctx.left() < first * 0.5 + 2:
            break
        t, _ = timed(ctx, fn)
        times.append(t)
    med = median(times)
    return {"first_loop_s": first, "steady_s": times, "median_s": med,
            "compile_s": first - med if med is not None and compiled else None,
            "graphs_compiled": counters["stats"]["unique_graphs"] - graphs0,
            "graph_breaks": sum(counters["graph_break"].values()) - breaks0}


def section_compile(ctx: Ctx) -> dict[str, Any]:
    import torch._dynamo as dynamo
    from diffaccel.caching import (
        EncoderPropagationConfig,
        apply_cache_plan,
        apply_encoder_propagation,
        cached_call,
        fora_plan,
        remove_cache_plan,
        remove_encoder_propagation,
        reset_caches,
    )
    from diffaccel.caching.harmonica import unit_modules
    from diffusers import DDIMScheduler

    kw_compile = _compile_kwargs(ctx)
    steady = 1 if ctx.dry_run else 3
    out = ctx.partial
    out.update({"compile_kwargs": kw_compile, "rows": {}, "notes": []})
    if "backend" in kw_compile:
        out["notes"].append("dry run / no CUDA: backend 'eager' (dynamo tracing only, no inductor code generation)")
    rows = out["rows"]

    # DiT-XL/2: regional compilation of every transformer block; the cache plan's hooks stay outside.
    transformer = dit_model(ctx)
    steps = 2 if ctx.dry_run else 20
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    plan = fora_plan(steps, len(unit_modules(transformer)), 2)
    rows["dit_eager"] = _first_and_steady(ctx, lambda: dit_loop(ctx, transformer, scheduler, steps), steady, False)
    dynamo.reset()
    for block in transformer.transformer_blocks:
        block.compile(**kw_compile)
    try:
        rows["dit_regional"] = _first_and_steady(ctx, lambda: dit_loop(ctx, transformer, scheduler, steps), steady)
        apply_cache_plan(transformer, plan, force=True, timesteps_callback=lambda: scheduler.timesteps)
        try:
            def fora():
                reset_caches(transformer)
                return dit_loop(ctx, transformer, scheduler, steps)
            rows["dit_regional_fora_n2"] = _first_and_steady(ctx, fora, steady)
        finally:
            remove_cache_plan(transformer)
    finally:
        _uncompile(transformer)
    log(f"compile dit: {json.dumps({k: v.get('median_s') for k, v in rows.items()})}")
    ctx.free("dit")

    # SD-1.5 UNet: regional (compile_repeated_blocks) plain and with encoder propagation, then the whole UNet.
    pipe = sd15_pipeline(ctx)
    kw = sd15_call_kwargs(ctx, pipe, 2 if ctx.dry_run else 50)
    unet = pipe.unet
    rows["unet_eager"] = _first_and_steady(ctx, lambda: pipe(generator=_generator(ctx), **kw).images, steady, False)
    dynamo.reset()
    try:
        unet.compile_repeated_blocks(**kw_compile)
        rows["unet_regional"] = _first_and_steady(ctx, lambda: pipe(generator=_generator(ctx), **kw).images, steady)
        apply_encoder_propagation(pipe, EncoderPropagationConfig(key_steps="sd50" if kw["num_inference_steps"] == 50
                                                                 else "uniform-2", parallel=True,
                                                                 noise_injection=None))
        try:
            rows["unet_regional_ep_parallel"] = _first_and_steady(
                ctx, lambda: cached_call(pipe, generator=_generator(ctx), **kw).images, steady)
        finally:
            remove_encoder_propagation(pipe)
        plans = unet_plan_rows(pipe, kw["num_inference_steps"])
        if plans:
            name, install = next(iter(plans.items()))
            remove = install()
            try:
                rows[f"unet_regional_{name}"] = _first_and_steady(
                    ctx, lambda: pipe(generator=_generator(ctx), **kw).images, steady)
            finally:
                remove()
    finally:
        _uncompile(unet)
    if ctx.left() > 20:
        dynamo.reset()
        compiled = torch.compile(unet, **kw_compile)
        pipe.unet = compiled
        try:
            rows["unet_full"] = _first_and_steady(ctx, lambda: pipe(generator=_generator(ctx), **kw).images, steady)
        finally:
            pipe.unet = unet
    else:
        out["notes"].append("whole-UNet compile skipped: time ran low")
    for name, row in rows.items():
        base = rows.get("dit_eager" if name.startswith("dit") else "unet_eager", {}).get("median_s")
        if base and row.get("median_s"):
            row["speedup_vs_eager"] = base / row["median_s"]
    return out


# ---------------------------------------------------------------------------------------------------- runner


class SkipSection(Exception):
    """A section that does not apply here (missing optional piece): recorded as skipped with the reason."""


SECTIONS: list[tuple[str, Callable[[Ctx], Any]]] = [
    ("environment", section_environment),
    ("zoo_dtypes", section_zoo_dtypes),
    ("unet_caching", section_unet_caching),
    ("dit_caching", section_dit_caching),
    ("attention", section_attention),
    ("flux_blocks", section_flux_blocks),
    ("parallel_nccl", section_parallel_nccl),
    ("compile", section_compile),
]


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return _json_safe(obj.item())
    return str(obj)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec) if isinstance(v, (int, float)) else str(v)


def _md_timing(report: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for name in ("unet_caching", "dit_caching", "attention"):
        res = report["sections"].get(name, {}).get("result")
        if not res:
            continue
        steps = f", {res['steps']} steps" if res.get("steps") else ""
        lines += ["", f"## {name}: {res.get('model')}, {res.get('dtype')}{steps}", "",
                  "| row | median s | speed-up | peak MiB | max rel diff vs reference | note |",
                  "|---|---:|---:|---:|---:|---|"]
        for row_name, row in res["rows"].items():
            diff = next((v for k, v in row.items() if k.startswith("max_rel_diff")), None)
            speed = next((v for k, v in row.items() if k.startswith("speedup")), None)
            lines.append(f"| {row_name} | {_fmt(row.get('median_s'), '.4f')} | {_fmt(speed, '.3f')} | "
                         f"{_fmt(row.get('peak_mib'), '.0f')} | {_fmt(diff, '.2e')} | "
                         f"{row.get('error') or row.get('stopped') or ''} |")
        for note in res.get("notes", []):
            lines.append(f"- {note}")
    return lines


def _md_zoo(report: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    zoo = report["sections"].get("zoo_dtypes", {}).get("result")
    if zoo:
        lines += ["", f"## zoo_dtypes ({zoo['images_per_call']} images, {zoo['steps']} steps)", "",
                  "| pipeline | dtype | images/s | max abs diff vs fp32 | class accuracy | error |",
                  "|---|---|---:|---:|---:|---|"]
        for pname, entry in zoo["pipelines"].items():
            for dt, row in entry.items():
                if isinstance(row, dict):
                    lines.append(f"| {pname} | {dt} | {_fmt(row.get('images_per_s'), '.2f')} | "
                                 f"{_fmt(row.get('max_abs_diff_vs_fp32'), '.2e')} | "
                                 f"{_fmt(row.get('class_accuracy'), '.3f')} | {row.get('error', '')} |")
    return lines


def _md_compile(report: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    comp = report["sections"].get("compile", {}).get("result")
    if comp:
        lines += ["", f"## compile ({comp['compile_kwargs']})", "",
                  "| row | compile s | steady median s | speed-up vs eager | graphs | graph breaks |",
                  "|---|---:|---:|---:|---:|---:|"]
        for row_name, row in comp["rows"].items():
            lines.append(f"| {row_name} | {_fmt(row.get('compile_s'), '.1f')} | {_fmt(row.get('median_s'), '.4f')}"
                         f" | {_fmt(row.get('speedup_vs_eager'), '.3f')} | {row.get('graphs_compiled', '-')} | "
                         f"{row.get('graph_breaks', '-')} |")
        for note in comp.get("notes", []):
            lines.append(f"- {note}")
    return lines


def _md_flux(report: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    flux = report["sections"].get("flux_blocks", {}).get("result")
    if flux:
        rows = flux.get("rows", {})
        lines += ["", f"## flux_blocks ({flux['dims']}, {flux['dtype']})", "",
                  f"double-stream block {_fmt(rows.get('double_stream_block', {}).get('median_s'), '.5f')} s, "
                  f"single-stream block {_fmt(rows.get('single_stream_block', {}).get('median_s'), '.5f')} s; "
                  f"projected transformer time per step {_fmt(flux.get('projected_transformer_s_per_step'), '.4f')}"
                  f" s ({flux['note']})."]
    return lines


def _md_parallel(report: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    par = report["sections"].get("parallel_nccl", {}).get("result")
    if par:
        lines += ["", f"## parallel_nccl ({par.get('backend')})", "", par.get("note", ""), ""]
        if par.get("same_device_result"):
            lines.append(f"Same-device result: {par['same_device_result']}.")
        for r in par.get("summary", []):
            lines.append(f"- rank {r['rank']}: sync max rel err {_fmt(r['sync_max_rel_err'], '.2e')}, wire bytes "
                         f"per call sync {_fmt(r['sync_wire_bytes_per_call'], '.0f')} / displaced "
                         f"{_fmt(r['displaced_wire_bytes_per_call'], '.0f')}, displaced s/call "
                         f"{r['displaced_s_per_call']}, overlap {_fmt(r['overlap_fraction'], '.2f')}"
                         + (f", error: {r['error']}" if r.get("error") else ""))
        for r in par.get("ranks", []):
            if r.get("error"):
                lines.append(f"- rank {r.get('rank')} error: {r['error'][:300]}")
    return lines


def markdown(report: dict[str, Any]) -> str:
    """The summary; a block that cannot be rendered (odd partial result) says so instead of failing the run."""
    env = report["sections"].get("environment", {}).get("result") or {}
    lines = [f"# diffaccel GPU check ({'DRY RUN, tiny sizes' if report['dry_run'] else 'full sizes'})", "",
             f"Machine: {env.get('device_name', '?')} ({env.get('device_memory_gib', '?')} GiB), torch "
             f"{env.get('torch', '?')}, CUDA {env.get('torch_cuda')}, diffusers {env.get('diffusers', '?')}, "
             f"xformers {env.get('xformers_version')}, DeepCache {env.get('DeepCache_version')}. Started "
             f"{report['started_utc']}, budget {report['budget_s']:.0f} s, elapsed {report['elapsed_s']:.0f} s.",
             f"Command: `{report['command']}`", "", "| section | status | seconds | limit |", "|---|---|---:|---:|"]
    for name, sec in report["sections"].items():
        lines.append(f"| {name} | {sec['status']}{': ' + sec['reason'] if sec.get('reason') else ''} | "
                     f"{_fmt(sec.get('seconds'), '.1f')} | {_fmt(sec.get('limit_s'), '.0f')} |")
    for block in (_md_timing, _md_zoo, _md_compile, _md_flux, _md_parallel):
        try:
            lines += block(report)
        except Exception as exc:  # noqa: BLE001 - the JSON has everything; the summary must never stop the run
            lines += ["", f"({block.__name__[4:]}: could not render the summary: {type(exc).__name__}: {exc})"]
    return "\n".join(lines) + "\n"


def run(ctx: Ctx, command: str, only: list[str] | None = None) -> dict[str, Any]:
    ctx.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"dry_run": ctx.dry_run, "device": str(ctx.device), "budget_s": ctx.budget_s,
                              "started_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                              "command": command, "sections": {}, "elapsed_s": 0.0}

    def save() -> None:
        report["elapsed_s"] = time.monotonic() - ctx.started
        _atomic_write(ctx.out / "gpu_check.json", json.dumps(_json_safe(report), indent=1) + "\n")
        _atomic_write(ctx.out / "gpu_check.md", markdown(report))

    shares_left = sum(SECTION_SHARES.values())
    for name, fn in SECTIONS:
        share = SECTION_SHARES[name]
        remaining = ctx.budget_s - (time.monotonic() - ctx.started)
        # this section's share of what is left, in proportion to the shares still to come (unused time carries on)
        limit = remaining * share / shares_left if shares_left > 0 else remaining
        shares_left -= share
        if ctx.dry_run:  # tiny sizes on a possibly slow, shared CPU: the limits only guard against hangs
            limit = max(limit, DRY_RUN_MIN_LIMIT_S)
        sec: dict[str, Any] = {"status": "skipped", "limit_s": limit}
        report["sections"][name] = sec
        if only and name not in only:
            sec["reason"] = "not selected (--only)"
            continue
        if limit < MIN_START_S[name] * (0.1 if ctx.dry_run else 1.0):
            sec["reason"] = f"budget: {limit:.0f} s left for it, needs {MIN_START_S[name]:.0f} s to start"
            save()
            continue
        log(f"section {name}: up to {limit:.0f} s")
        t0 = time.monotonic()
        ctx.section_deadline = t0 + limit
        ctx.partial = {}
        try:
            with time_limit(limit):
                sec["result"] = fn(ctx)
            sec["status"] = "ok"
        except SkipSection as exc:
            sec["reason"] = str(exc)
        except SectionTimeout as exc:
            sec["status"], sec["reason"] = "timed out", str(exc)
            sec["result"] = ctx.partial  # what it measured before the limit
        except Exception as exc:  # noqa: BLE001 - the next section still runs
            sec["status"], sec["reason"] = "error", f"{type(exc).__name__}: {str(exc)[:500]}"
            sec["traceback"] = traceback.format_exc()[-3000:]
            sec["result"] = ctx.partial
        sec["seconds"] = time.monotonic() - t0
        ctx.section_deadline = math.inf
        log(f"section {name}: {sec['status']} in {sec['seconds']:.1f} s {sec.get('reason', '')}")
        save()
    ctx.free(*list(ctx.models))
    save()
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("gpu_check_results"), help="folder for gpu_check.json/.md")
    ap.add_argument("--budget-s", type=float, default=420.0, help="seconds for all sections together (default 420)")
    ap.add_argument("--dry-run", action="store_true", help="every section at tiny sizes (any machine)")
    ap.add_argument("--only", nargs="+", choices=[n for n, _ in SECTIONS], default=None,
                    help="run only these sections (the others are recorded as skipped)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--rank-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--backend", default="nccl", help=argparse.SUPPRESS)
    ap.add_argument("--rank-out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-tiny", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rank_worker:
        return _rank_worker(args)
    if args.budget_s <= 0:
        ap.error("--budget-s must be > 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    dry = args.dry_run
    if torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        print("gpu_check: no CUDA device here; running the CPU dry run of every section at tiny sizes.",
              file=sys.stderr, flush=True)
        device, dry = torch.device("cpu"), True
    import diffusers  # noqa: F401 - heavy imports before the budget clock starts (the docstring's margin)
    import transformers  # noqa: F401

    ctx = Ctx(device=device, dry_run=dry, out=args.out, budget_s=args.budget_s if not dry else
              max(args.budget_s, len(SECTIONS) * DRY_RUN_MIN_LIMIT_S))
    command = "python benchmarks/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = run(ctx, command.strip(), args.only)
    bad = [n for n, s in report["sections"].items() if s["status"] in ("error", "timed out")]
    log(f"done in {report['elapsed_s']:.0f} s; wrote {args.out / 'gpu_check.json'} and gpu_check.md"
        + (f"; sections with problems: {', '.join(bad)}" if bad else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
