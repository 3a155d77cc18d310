"""The demo's generation logic, free of any UI: one `RunRequest` in, one `RunResult` out.

(Over 450 lines: request, validation messages, model loading and the two timed sides; the accelerations
themselves are the protocol's `recipe_for`. Splitting request/result types into their own module is the next step.)

`DemoRunner.run(request)` validates the request, loads (or reuses) the pipeline, then generates the same images twice
with the same per-image seeds (`core.make_generators`): once as the *baseline* (the pipeline's own scheduler at
`baseline_steps`) and once *accelerated* (a chosen sampler, optionally Time-Shift, a feature cache, steering or
search, or the one-step student). Each side is timed with `core.measure`, its denoiser calls are counted with
`core.count_nfe`, and the batch is scored with the zoo's `digits-features` classifier (share of images showing the
prompted digit) and the CLIP score of `diffaccel.evals` with `digits-clip`.

Every acceleration is attached for the accelerated call only and removed afterwards (scheduler restored, hooks
removed), so a cached pipeline always returns to its plain state. Invalid input raises `RunInputError` with a
message naming the field, the value and what is allowed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import sys
import threading
import traceback
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core import (
    count_nfe,
    families,
    make_generators,
    measure,
    pipeline_output_to_uint8,
    tensor_to_pil,
    to_uint8,
)
from ..core.errors import InputError, WeightsError
from ..core.weights import check_finite_parameters, check_pipeline_folder
from .access import LocalAccess, check_no_custom_code

SAMPLERS: tuple[str, ...] = ("DDIM", "DPM-Solver++", "UniPC", "S-PNDM", "F-PNDM")
CACHES: tuple[str, ...] = ("none", "encoder propagation", "HarmoniCa plan", "FORA")
STEERING: tuple[str, ...] = ("none", "best-of-N", "FK steering")
EP_SCHEDULES: tuple[str, ...] = ("sd50-scaled", "uniform-2", "uniform-3", "uniform-4")
ONE_STEP_ENTRY = "digits-sd-onestep"
ONE_STEP_TEACHER = "digits-sd"
#: families the demo can drive (the family layer's), by pipeline class name; "rf" (diffaccel's rectified-flow
#: pipeline) is offered only as the one-step student, which runs without CFG
FAMILIES = {name: cls.name for cls in families.FAMILIES.values() for name in cls.pipeline_classes}
DEFAULT_GUIDANCE = {cls.name: cls.default_guidance for cls in families.FAMILIES.values()}

LIMITS = {  # field: (low, high), inclusive
    "seed": (0, 2**31 - 1),
    "num_images": (1, 16),
    "baseline_steps": (1, 200),
    "steps": (1, 200),
    "guidance_scale": (0.0, 20.0),
    "particles": (1, 16),
    "fora_interval": (2, 10),
    "warmup": (0, 3),
}
#: longest text accepted per field (the page's text boxes and the API alike)
TEXT_LIMITS = {"model": 1024, "prompt": 500, "cache_plan": 1024, "sampler": 64, "cache": 64, "ep_schedule": 64,
               "steering": 64, "potential": 64}
FLAG_FIELDS = ("time_shift", "ep_parallel", "one_step")

Progress = Callable[[float, str], None]


class RunInputError(InputError):
    """A request the demo cannot run; the message is meant for the user as it stands."""


# ---------------------------------------------------------------------------------------------- optional parts


def shipped_plan_names() -> list[str]:
    """Names of the HarmoniCa plans shipped in `caching/plans`."""
    from ..caching import shipped_plans

    return sorted(shipped_plans())


def zoo_family(name: str) -> str | None:
    """The family (`sd`, `dit`, `ddpm`, `pixart`) of a zoo pipeline entry, None for anything else."""
    from ..zoo.registry import ENTRIES

    entry = ENTRIES.get(str(name).strip())
    return None if entry is None else FAMILIES.get(entry.kind)


def zoo_pipelines() -> list[str]:
    """Zoo entries that are diffusers pipelines (what the model picker offers)."""
    from ..zoo.registry import ENTRIES

    return [name for name, e in ENTRIES.items() if e.kind.endswith("Pipeline") and name != ONE_STEP_ENTRY]


# ---------------------------------------------------------------------------------------------- request / result


@dataclass
class RunRequest:
    """Everything one comparison needs. `steps` and `sampler` are the accelerated side's; the baseline runs the
    pipeline's own scheduler at `baseline_steps`. `guidance_scale=None` takes the model family's default.

    For class-conditional pipelines (DiT) the class is the digit named in `prompt` ("7", "seven", "a handwritten
    digit seven"); unconditional pipelines (DDPM) take no prompt. `particles` is N for best-of-N and k for FK.
    """

    model: str = "digits-sd"
    prompt: str = "a handwritten digit seven"
    seed: int = 0
    num_images: int = 4
    baseline_steps: int = 25
    steps: int = 10
    guidance_scale: float | None = None
    sampler: str = "DPM-Solver++"
    time_shift: bool = False
    cache: str = "none"
    ep_schedule: str = "sd50-scaled"
    ep_parallel: bool = True
    cache_plan: str | None = None
    fora_interval: int = 2
    steering: str = "none"
    particles: int = 4
    potential: str = "max"
    one_step: bool = False
    warmup: int = 1

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class SideResult:
    """One column of the comparison: images (uint8 NCHW), timing, cost and on-batch quality."""

    name: str
    config: str
    images: torch.Tensor
    seconds_per_image: float
    seconds_total: float
    nfe_calls: int
    evals_per_image: float
    class_accuracy: float | None = None
    clip_score: float | None = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "images"}


@dataclass
class RunResult:
    """Baseline and accelerated side by side, with the seeds, the conditioning and any notes."""

    request: RunRequest
    model_description: str
    seeds: list[int]
    caption: str | None
    label: int | None
    baseline: SideResult
    accelerated: SideResult
    notes: list[str] = field(default_factory=list)

    @property
    def speedup(self) -> float:
        """Baseline seconds per image over accelerated seconds per image (> 1: faster)."""
        return self.baseline.seconds_per_image / max(self.accelerated.seconds_per_image, 1e-12)

    def as_dict(self) -> dict[str, Any]:
        return {"request": self.request.as_dict(), "model": self.model_description, "seeds": self.seeds,
                "caption": self.caption, "label": self.label, "speedup": self.speedup,
                "baseline": self.baseline.as_dict(), "accelerated": self.accelerated.as_dict(), "notes": self.notes}

    def metrics_rows(self) -> list[list[Any]]:
        """The metrics table: one row per side."""

        def fmt(v: float | None, spec: str) -> str:
            return "—" if v is None else format(v, spec)

        rows = []
        for side, speed in ((self.baseline, 1.0), (self.accelerated, self.speedup)):
            rows.append([side.name, side.config, f"{side.seconds_per_image:.4f}", f"{speed:.2f}×", side.nfe_calls,
                         f"{side.evals_per_image:g}", fmt(side.class_accuracy, ".0%"), fmt(side.clip_score, ".2f")])
        return rows

    def zip_bytes(self) -> bytes:
        """PNG files of both sides at native resolution plus `metrics.json`, as a zip archive."""
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for side in (self.baseline, self.accelerated):
                for seed, im in zip(self.seeds, tensor_to_pil(side.images, value_range=(0, 255)), strict=True):
                    png = io.BytesIO()
                    im.save(png, format="PNG")
                    zf.writestr(f"{side.name}/seed-{seed}.png", png.getvalue())
            zf.writestr("metrics.json", json.dumps(self.as_dict(), indent=1))
        return buf.getvalue()


METRIC_HEADERS = ["side", "configuration", "s/image", "speed-up", "NFE (denoiser calls)", "evals/image",
                  "class accuracy", "CLIP score"]


# ---------------------------------------------------------------------------------------------- models


@dataclass
class LoadedPipeline:
    """A pipeline in the cache, with what the runner needs to put it back into its plain state."""

    name: str
    pipe: Any
    family: str
    scheduler: Any  # the scheduler it was loaded with (restored after every accelerated call)

    @property
    def description(self) -> str:
        return f"{self.name} ({type(self.pipe).__name__})"


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~")) and " " not in name


def load_pipeline(name: str, access: LocalAccess | None = None) -> LoadedPipeline:
    """A zoo pipeline, a local diffusers pipeline folder, or a hub id already in the local cache (never downloads).

    `access` decides which local folders may be opened (default: any, as on a loopback server); a restricted
    server takes folders under its models folder only and no hub ids. Weights load from safetensors only and
    no code shipped with a model runs.
    """
    from ..zoo.registry import ENTRIES, ZooError
    from ..zoo.registry import load as zoo_load

    access = access or LocalAccess()
    name = name.strip()
    if not name:
        raise RunInputError("model is empty: choose a zoo pipeline, or give a local diffusers pipeline folder")
    safe = dict(local_files_only=True, use_safetensors=True, trust_remote_code=False)
    if name in ENTRIES:
        kind = ENTRIES[name].kind
        if not kind.endswith("Pipeline"):
            raise RunInputError(f"zoo entry {name!r} is a {kind}, not a pipeline; the demo runs pipelines: "
                                f"{', '.join(zoo_pipelines())}")
        try:
            pipe = zoo_load(name)
        except ZooError as exc:
            raise RunInputError(f"zoo model {name!r} cannot be loaded: {exc}") from exc
    elif access.restricted or Path(name).expanduser().exists():
        from diffusers import DiffusionPipeline

        try:
            path = access.folder(name)
        except InputError as exc:
            raise RunInputError(str(exc)) from exc
        shown = access.shown(path)
        if not path.is_dir():
            raise RunInputError(f"{shown!r} is a file, not a diffusers pipeline folder (a folder with "
                                "model_index.json, as written by pipe.save_pretrained)")
        fix = "re-save the pipeline with pipe.save_pretrained(folder)"
        try:
            check_no_custom_code(path, FAMILIES, shown)
            check_pipeline_folder(path, fix=fix)  # names a missing or broken component before loading
        except (InputError, WeightsError) as exc:
            raise RunInputError(str(exc).replace(str(path), shown)) from exc
        try:
            pipe = DiffusionPipeline.from_pretrained(str(path), **safe)
        except Exception as exc:  # noqa: BLE001 - any loader failure becomes a message naming the folder
            detail = "" if access.restricted else f": {type(exc).__name__}: {exc}"
            if access.restricted:
                traceback.print_exc(file=sys.stderr)  # the details stay in the server's log
            raise RunInputError(f"could not load a diffusers pipeline (safetensors weights) from {shown!r}"
                                f"{detail}") from exc
    elif _looks_like_hub_id(name):
        from diffusers import DiffusionPipeline

        try:
            pipe = DiffusionPipeline.from_pretrained(name, **safe)
        except Exception as exc:  # noqa: BLE001
            raise RunInputError(f"{name!r} looks like a Hugging Face Hub id, but it is not in the local cache and "
                                "this demo runs offline (it never downloads). Download the pipeline on a "
                                "connected machine and pass its local folder instead.") from exc
    else:
        raise RunInputError(f"unknown model {name!r}: not a zoo pipeline ({', '.join(zoo_pipelines())}), not an "
                            "existing folder, and not a hub id of the form org/name")
    cls = type(pipe).__name__
    family = FAMILIES.get(cls)
    if family is None:
        raise RunInputError(f"{name!r} is a {cls}; the demo supports {', '.join(FAMILIES)}")
    try:
        check_finite_parameters(pipe, fix="its weights are damaged; re-save or re-download the pipeline", what=name)
    except WeightsError as exc:
        raise RunInputError(str(exc)) from exc
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return LoadedPipeline(name, pipe, family, pipe.scheduler)


class ModelCache:
    """Least-recently-used cache of loaded pipelines, owned by one runner (no module-level state)."""

    def __init__(self, max_models: int = 3, loader: Callable[[str], LoadedPipeline] = load_pipeline) -> None:
        if max_models < 1:
            raise InputError(f"max_models must be >= 1, got {max_models}")
        self.max_models = max_models
        self.loader = loader
        self._items: OrderedDict[str, LoadedPipeline] = OrderedDict()

    def get(self, name: str) -> LoadedPipeline:
        key = name.strip()
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        loaded = self.loader(key)
        self._items[key] = loaded
        while len(self._items) > self.max_models:
            self._items.popitem(last=False)
        return loaded

    def __contains__(self, name: str) -> bool:
        return name.strip() in self._items

    def names(self) -> list[str]:
        return list(self._items)


# ---------------------------------------------------------------------------------------------- validation


def _check_int(name: str, value: Any, problems: list[str]) -> None:
    lo, hi = LIMITS[name]
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        if isinstance(value, float) and value.is_integer():
            problems.append(f"{name} = {value!r} must be given as a whole number (int)")
        else:
            problems.append(f"{name} = {value!r} is not a whole number; allowed: {lo}..{hi}")
        return
    if not lo <= value <= hi:
        problems.append(f"{name} = {value} is out of range; allowed: {lo}..{hi}")


def normalize_request(request: RunRequest) -> RunRequest:
    """Whole-number floats from UI widgets (4.0) become ints; anything else is left for `validate_request`."""
    out = dataclasses.replace(request)
    for name in ("seed", "num_images", "baseline_steps", "steps", "particles", "fora_interval", "warmup"):
        v = getattr(out, name)
        if isinstance(v, float) and v.is_integer():
            setattr(out, name, int(v))
    return out


def validate_request(request: RunRequest, family: str | None = None) -> None:
    """Raise `RunInputError` listing every problem of the request; `family` adds the model-dependent checks."""
    from ..samplers.steering.potentials import POTENTIALS
    from ..zoo import label_from_prompt

    r = request
    problems: list[str] = []
    for name, longest in TEXT_LIMITS.items():
        v = getattr(r, name)
        if v is None and name == "cache_plan":
            continue
        if not isinstance(v, str):
            problems.append(f"{name} = {v!r} must be text")
        elif len(v) > longest:
            problems.append(f"{name} is {len(v)} characters long; allowed: at most {longest}")
    for name in FLAG_FIELDS:
        if not isinstance(getattr(r, name), bool):
            problems.append(f"{name} = {getattr(r, name)!r} must be true or false")
    if problems:  # the checks below assume text and flags
        raise RunInputError("; ".join(problems))
    for name in ("seed", "num_images", "baseline_steps", "steps", "particles", "fora_interval", "warmup"):
        _check_int(name, getattr(r, name), problems)
    if r.guidance_scale is not None:
        lo, hi = LIMITS["guidance_scale"]
        g = r.guidance_scale
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not np.isfinite(g) or not lo <= g <= hi:
            problems.append(f"guidance_scale = {g!r} is out of range; allowed: {lo}..{hi}")
    if r.sampler not in SAMPLERS:
        problems.append(f"sampler {r.sampler!r} is unknown; choose one of {', '.join(SAMPLERS)}")
    if r.cache not in CACHES:
        problems.append(f"cache {r.cache!r} is unknown; choose one of {', '.join(CACHES)}")
    if r.steering not in STEERING:
        problems.append(f"steering {r.steering!r} is unknown; choose one of {', '.join(STEERING)}")
    if r.cache == "encoder propagation" and r.ep_schedule not in EP_SCHEDULES:
        problems.append(f"encoder-propagation schedule {r.ep_schedule!r} is unknown; choose one of "
                        f"{', '.join(EP_SCHEDULES)}")
    if r.steering == "FK steering" and r.potential not in POTENTIALS:
        problems.append(f"FK potential {r.potential!r} is unknown; choose one of {', '.join(POTENTIALS)}")
    if r.steering == "best-of-N" and isinstance(r.particles, int) and r.particles < 2:
        problems.append(f"best-of-N needs N >= 2 candidates, got particles = {r.particles}")
    if r.sampler == "F-PNDM" and isinstance(r.steps, int) and r.steps < 4 and not r.one_step:
        problems.append(f"F-PNDM needs at least 4 steps (3 Runge-Kutta warm-up steps + 1), got steps = {r.steps}")
    if r.cache == "HarmoniCa plan" and not (r.cache_plan or "").strip():
        problems.append("cache 'HarmoniCa plan' needs a plan: choose a shipped plan or give a plan file")
    if r.one_step:
        if r.model.strip() != ONE_STEP_TEACHER:
            problems.append(f"the one-step student is distilled from {ONE_STEP_TEACHER}; pick that model to compare "
                            f"against it (model is {r.model!r})")
    if family == "rf":
        problems.append(f"{r.model!r} is a rectified-flow (distilled) pipeline; it is compared as the one-step "
                        f"student: choose model {ONE_STEP_TEACHER} and tick 'one-step student'")
    if family is not None:
        cond = family in ("sd", "pixart", "dit")
        if cond and not r.prompt.strip():
            problems.append("prompt is empty: this model is conditional; type a prompt such as "
                            "'a handwritten digit seven'" + (" (the digit is the class label)" if family == "dit"
                                                             else ""))
        elif family == "dit" and label_from_prompt(r.prompt) is None:
            problems.append(f"prompt {r.prompt!r} names no single digit; a class-conditional DiT needs the class "
                            "label, e.g. '7' or 'seven'")
        if r.steering != "none" and family in ("sd", "dit") and label_from_prompt(r.prompt) is None:
            problems.append(f"steering rewards the prompted digit (digits-features log-probability); prompt "
                            f"{r.prompt!r} names no single digit")
    if problems:
        raise RunInputError("; ".join(problems))


# ---------------------------------------------------------------------------------------------- accelerations


#: demo sampler name -> protocol sampler (on the pipeline's own grid, as the pipeline's scheduler config)
SAMPLER_RECIPES = {"DDIM": "ddim", "DPM-Solver++": "dpm++2m", "UniPC": "unipc", "S-PNDM": "s-pndm", "F-PNDM": "f-pndm"}


def recipe_for(request: RunRequest, family: str, plan: str | None = None) -> tuple[Any, ...]:
    """The accelerated side as protocol methods: every composition the protocol allows is allowed here too.
    `plan`: the HarmoniCa plan (shipped name or checked path; default the request's)."""
    from .. import protocol
    from ..samplers.bench import ts_params

    r = request
    methods: list[Any] = []
    if r.one_step:
        methods.append(protocol.OneStep(ONE_STEP_ENTRY))
    else:
        methods.append(protocol.Sampler(SAMPLER_RECIPES[r.sampler], None, grid="model"))
    if r.time_shift:
        methods.append(protocol.TimeShift(window=ts_params(r.steps)["window"], cutoff=ts_params(r.steps)["cutoff"]))
    if r.cache == "encoder propagation":
        noise = None if family == "ddpm" else (0.003, 0.5)  # prior noise as the paper, on latent models
        methods.append(protocol.EncoderPropagation(r.ep_schedule, parallel=r.ep_parallel, prior_noise=noise))
    elif r.cache == "HarmoniCa plan":
        methods.append(protocol.HarmoniCa(plan or (r.cache_plan or "").strip()))
    elif r.cache == "FORA":
        methods.append(protocol.FORA(r.fora_interval, steps=r.steps))
    if r.steering == "best-of-N":
        methods.append(protocol.BestOfN(r.particles))
    elif r.steering == "FK steering":
        every = max(1, r.steps // 5)
        methods.append(protocol.FKSteering(k=r.particles, potential=r.potential, every=every,
                                           start=min(every, r.steps - 1), end=r.steps - 1))
    return tuple(methods)


def check_recipe(loaded: LoadedPipeline, request: RunRequest, access: LocalAccess | None = None) -> tuple[Any, ...]:
    """The request's methods, or `RunInputError` with the protocol's reason (naming both methods)."""
    from ..protocol import CompositionError, check

    plan = plan_reference(request, access) if request.cache == "HarmoniCa plan" else None
    try:
        methods = recipe_for(request, loaded.family, plan)
        check(loaded.pipe, *methods)
    except (CompositionError, ValueError) as exc:
        raise RunInputError(str(exc)) from exc
    return methods


def sampler_label(request: RunRequest) -> str:
    if request.one_step:
        return f"one-step student {ONE_STEP_ENTRY}, 1 step, no CFG"
    label = f"{request.sampler}, {request.steps} steps"
    if request.time_shift:
        from ..samplers.bench import ts_params

        p = ts_params(request.steps)
        label = f"TS-{label} (window {p['window']}, cutoff {p['cutoff']})"
    return label


@contextlib.contextmanager
def accelerated(loaded: LoadedPipeline, request: RunRequest, access: LocalAccess | None = None
                ) -> Iterator[Any]:
    """`diffaccel.accelerate` with the request's recipe for the duration of the block; always removed after.

    Yields the handle (``handle(...)`` generates; ``str(handle)`` is the recipe)."""
    from ..protocol import accelerate

    methods = check_recipe(loaded, request, access)
    try:
        handle = accelerate(loaded.pipe, *methods)
    except (TypeError, ValueError) as exc:
        raise RunInputError(f"cannot apply {' + '.join(map(str, methods))}: {exc}") from exc
    try:
        yield handle
    finally:
        handle.remove()


def plan_reference(request: RunRequest, access: LocalAccess | None = None) -> str:
    """The HarmoniCa plan the request names: a shipped plan's name, or a plan file — only inside the models folder
    when the demo is exposed (`access.restricted`), like a model folder."""
    from ..caching import shipped_plans

    key = (request.cache_plan or "").strip()
    plans = shipped_plans()
    if key in plans:
        return key
    if access is not None and access.restricted:
        try:
            folder = access.folder(str(Path(key).parent))
        except InputError:
            folder = None
        path = folder / Path(key).name if folder is not None else None
        if path is None or not path.is_file() or path.resolve().parent != folder:
            raise RunInputError(f"HarmoniCa plan {key!r} is neither a shipped plan "
                                f"({', '.join(sorted(plans)) or 'none'}) nor a plan file in the models folder")
        return str(path)
    path = Path(key).expanduser()
    if not path.exists():
        raise RunInputError(f"HarmoniCa plan {key!r} is neither a shipped plan ({', '.join(sorted(plans)) or 'none'}) "
                            "nor an existing file")
    return str(path)


# ---------------------------------------------------------------------------------------------- the runner


def _call_kwargs(loaded: LoadedPipeline, prompt: str, label: int | None, n: int, steps: int,
                 guidance: float | None, generators: list[torch.Generator]) -> dict[str, Any]:
    family = families.family_for(loaded.pipe)
    cond = label if family.conditioning_kind == "class" else prompt
    return family.call_kwargs(cond, n, steps, guidance, generator=generators, output_type="np")


def _cfg_rows(family: str, guidance: float | None) -> int:
    default = DEFAULT_GUIDANCE.get(family)
    return 2 if default is not None and guidance is not None and guidance > 1.0 else 1


class DemoRunner:
    """Runs comparisons; owns the model cache and the quality models. One run at a time (a lock guards it)."""

    def __init__(self, max_models: int = 3, clip_model: str = "digits-clip", access: LocalAccess | None = None
                 ) -> None:
        self.access = access or LocalAccess()
        self.models = ModelCache(max_models, loader=functools.partial(load_pipeline, access=self.access))
        self.clip_model = clip_model
        self._classifier = None
        self._lock = threading.Lock()

    @property
    def classifier(self):
        if self._classifier is None:
            from ..zoo import load

            self._classifier = load("digits-features")
        return self._classifier

    # -------------------------------------------------------------------------------------------- public

    def run(self, request: RunRequest, progress: Progress | None = None) -> RunResult:
        """Validate, generate both sides with the same seeds, measure and score them."""
        from ..zoo import caption as digit_caption
        from ..zoo import label_from_prompt

        report = progress or (lambda frac, desc: None)
        request = normalize_request(request)
        validate_request(request, zoo_family(request.model))  # before any loading; folders are checked after
        with self._lock:
            report(0.02, f"loading {request.model}")
            loaded = self.models.get(request.model)
            validate_request(request, loaded.family)
            guidance = request.guidance_scale
            if guidance is None:
                guidance = DEFAULT_GUIDANCE[loaded.family]
            notes: list[str] = []
            if loaded.family == "ddpm":
                guidance = None
                notes.append("unconditional model: prompt and guidance are not used")
            label = label_from_prompt(request.prompt) if loaded.family != "ddpm" else None
            if loaded.family == "dit":
                cap = digit_caption(label)
            elif loaded.family == "ddpm":
                cap = None
            else:
                cap = request.prompt.strip()
            prompt = request.prompt.strip()
            n, seeds = request.num_images, list(range(request.seed, request.seed + request.num_images))

            report(0.1, f"baseline: {type(loaded.scheduler).__name__}, {request.baseline_steps} steps")
            baseline = self._plain_side(loaded, "baseline",
                                        f"{_scheduler_name(loaded.scheduler)}, {request.baseline_steps} steps",
                                        prompt, label, n, request.seed, request.baseline_steps, guidance,
                                        request.warmup)
            report(0.45, "accelerated")
            accel = self._accelerated_side(loaded, request, prompt, label, guidance)
            report(0.85, "quality: digits-features accuracy and CLIP score")
            for side in (baseline, accel):
                side.class_accuracy, side.clip_score = self._quality(side.images, label, cap)
            report(1.0, "done")
            return RunResult(request, loaded.description, seeds, cap, label, baseline, accel, notes)

    # -------------------------------------------------------------------------------------------- sides

    def _timed(self, pipe: Any, fn: Callable[[], Any], warmup: int) -> tuple[Any, float, int, int]:
        with count_nfe(pipe) as nfe:
            t = measure(fn, warmup=warmup, repeats=1)
        runs = warmup + 1
        return t.result, t.median, nfe.calls // runs, nfe.rows // runs

    def _plain_side(self, loaded: LoadedPipeline, name: str, config: str, prompt: str, label: int | None, n: int,
                    seed: int, steps: int, guidance: float | None, warmup: int, pipe: Any = None,
                    family: str | None = None) -> SideResult:
        from ..caching import cached_call

        pipe = loaded.pipe if pipe is None else pipe
        probe = LoadedPipeline(loaded.name, pipe, family or loaded.family, pipe.scheduler)

        def call() -> Any:
            kw = _call_kwargs(probe, prompt, label, n, steps, guidance, make_generators(seed, n))
            with torch.no_grad():
                return cached_call(pipe, **kw).images

        try:
            images, seconds, calls, rows = self._timed(pipe, call, warmup)
        except RunInputError:
            raise
        except (TypeError, ValueError) as exc:
            raise RunInputError(f"{name} run failed: {exc}") from exc
        return SideResult(name, config, pipeline_output_to_uint8(images), seconds / n, seconds, calls,
                          rows / n / _cfg_rows(probe.family, guidance))

    def _accelerated_side(self, loaded: LoadedPipeline, request: RunRequest, prompt: str, label: int | None,
                          guidance: float | None) -> SideResult:
        n, seed, k = request.num_images, request.seed, request.particles
        steps = 1 if request.one_step else request.steps
        config = sampler_label(request)
        if request.steering == "best-of-N":
            config = f"best-of-{k} ({config}, eta 0; reward: digits-features log p(digit))"
        elif request.steering == "FK steering":
            every = max(1, steps // 5)
            config = (f"FK steering, k={k}, potential {request.potential}, resample every {every} steps "
                      f"({config}, eta 1; reward: digits-features log p(digit))")
        with accelerated(loaded, request, self.access) as handle:
            family = families.family_for(loaded.pipe)
            cond = label if family.conditioning_kind == "class" else prompt
            # the student is distilled without CFG: guidance 1 keeps the pipeline from batching unconditional rows
            kw = family.call_kwargs(cond, n, steps, 1.0 if request.one_step else guidance, output_type="pt")
            kw.pop("num_inference_steps")
            gens = n * k if request.steering == "FK steering" else n  # FK: one generator per particle

            def call() -> Any:
                with torch.no_grad():
                    return handle(**kw, num_inference_steps=steps, generator=make_generators(seed, gens)).images

            try:
                images, seconds, calls, rows = self._timed(loaded.pipe, call, request.warmup)
            except RunInputError:
                raise
            except (TypeError, ValueError) as exc:
                raise RunInputError(f"accelerated run ({handle}) failed: {exc}") from exc
            notes = handle.notes
        side = SideResult("accelerated", config, to_uint8(images.float().cpu()), seconds / n, seconds, calls,
                          rows / n / _cfg_rows(loaded.family, None if request.one_step else guidance))
        side.notes.append(f"recipe: {handle}")
        if request.one_step:
            side.notes.append("the one-step student runs without classifier-free guidance (distilled)")
        if notes:
            side.config += " + " + "; ".join(notes)
        return side

    # -------------------------------------------------------------------------------------------- quality

    def _quality(self, images: torch.Tensor, label: int | None, cap: str | None) -> tuple[float | None, float | None]:
        from ..evals import clip_score

        accuracy = None
        if label is not None:
            pred = self.classifier.predict(images)
            accuracy = float((pred == label).float().mean())
        clip = None
        if cap:
            clip = clip_score(images, [cap] * len(images), self.clip_model).score
        return accuracy, clip


def _scheduler_name(scheduler: Any) -> str:
    return type(scheduler).__name__.removesuffix("Scheduler") or type(scheduler).__name__
