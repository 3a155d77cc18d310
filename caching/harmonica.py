"""HarmoniCa learned unit caching for diffusers DiT / PixArt transformers, as `diffusers.hooks` (spec §3).

Huang et al., "HarmoniCa: Harmonizing Training and Inference for Better Feature Caching in Diffusion Transformer
Acceleration", ICML 2025 (arXiv 2410.01723). A *unit* is one branch of a transformer block whose output can be
reused across steps: the self-attention branch (`attn1`) and the MLP branch (`ff`) of every DiT block, taken before
the adaLN gate and the residual add (paper §3, "cache units"; u = 2b for attn1 of block b, u = 2b + 1 for its ff).
When unit u is reused at step s, the block still computes its adaLN modulation for t_s and adds
`gate(t_s) * c_u` to the current residual stream — reuse is neither skipping the block nor reusing its output.

A `CachePlan` is a binary [steps, units] matrix P (1 = compute, 0 = reuse, row 0 always computes); the cache-usage
ratio (CUR) is the share of zeros. A `Router` holds learnable logits Θ [steps, units]; the plan is
`P[s, u] = 1[sigmoid(Θ[s, u]) > τ]` with τ = 0.1 (paper §4.1 / released defaults). Routers are trained by
`caching.harmonica_train` (Step-wise Denoising Training + Image-Error-Proxy-guided objective).

Hooks: `diffaccel.harmonica.step` on the transformer (step tracking, plan row checks), `diffaccel.harmonica.unit`
on every unit module.
FORA (Selvaraju et al. 2024: every unit computed every n-th step) and random plans run through the same engine.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.errors import InputError
from ..core.families import find_denoiser
from ..core.files import atomic_save
from ..core.hooks import (
    StatefulHook,
    StepTracker,
    get_argument,
    get_hook,
    has_hook,
    hook_state,
    input_signature,
    register_hook,
    remove_hooks,
    take_rows,
)
from ..core.schedulers import class_name as sched_name

STEP_HOOK = "diffaccel.harmonica.step"
UNIT_HOOK = "diffaccel.harmonica.unit"
HOOK_NAMES = (STEP_HOOK, UNIT_HOOK)
PLAN_FORMAT = "diffaccel.cache_plan.v1"
ROUTER_FORMAT = "diffaccel.router.v1"
DEFAULT_THRESHOLD = 0.1  # τ of the released HarmoniCa / Learning-to-Cache DiT code
PLANS_DIR = Path(__file__).resolve().parent / "plans"

# Unit layout per transformer class (spec §3.1). PixArt's set is our choice: HarmoniCa's PixArt code is unreleased.
DEFAULT_UNITS: dict[str, tuple[str, ...]] = {
    "DiTTransformer2DModel": ("attn1", "ff"),
    "PixArtTransformer2DModel": ("attn1", "attn2", "ff"),
}


# ----------------------------------------------------------------------------------------------------------------------
# unit layout


def default_units(transformer: nn.Module) -> tuple[str, ...]:
    """The cache units per block of a supported transformer class."""
    name = type(transformer).__name__
    if name not in DEFAULT_UNITS:
        raise TypeError(f"HarmoniCa caching supports {', '.join(DEFAULT_UNITS)}, got {name}")
    return DEFAULT_UNITS[name]


def unit_modules(transformer: nn.Module, units: Sequence[str] | None = None) -> list[tuple[str, nn.Module]]:
    """`[(qualified name, module)]` in unit order u = len(units) * b + j (block b, unit j)."""
    units = tuple(units) if units is not None else default_units(transformer)
    out = []
    for b, block in enumerate(transformer.transformer_blocks):
        if getattr(block, "_chunk_size", None) is not None:
            raise InputError(f"transformer_blocks.{b} uses feed-forward chunking (chunk size {block._chunk_size}), "
                             "which calls `ff` once per chunk; disable it before attaching a cache plan")
        for name in units:
            module = getattr(block, name, None)
            if not isinstance(module, nn.Module):
                raise InputError(f"transformer_blocks.{b} has no unit {name!r}; its units are "
                                 f"{[n for n in ('attn1', 'attn2', 'ff') if getattr(block, n, None) is not None]}")
            out.append((f"transformer_blocks.{b}.{name}", module))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# plans


@dataclass
class CachePlan:
    """Binary cache plan P [steps, units] (True = compute, False = reuse) plus the setting it is valid for.

    model_class / num_blocks / units describe the unit layout (None = a generic plan, checked only by its unit
    count); scheduler_class the scheduler it was made for (None = any); metadata free-form strings (training
    command, guidance, threshold, ...).
    """

    mask: torch.Tensor
    model_class: str | None = None
    num_blocks: int | None = None
    units: tuple[str, ...] | None = None
    scheduler_class: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        mask = torch.as_tensor(self.mask)
        if mask.ndim != 2 or mask.shape[0] < 1 or mask.shape[1] < 1:
            raise InputError(f"a cache plan is a [steps, units] matrix, got shape {tuple(mask.shape)}")
        if mask.dtype != torch.bool:
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise InputError("cache plan entries must be 0/1 (or bool)")
            mask = mask != 0
        self.mask = mask.detach().cpu().contiguous()
        if not bool(self.mask[0].all()):
            raise InputError(f"row 0 of a cache plan must compute every unit (nothing is cached before step 0); "
                             f"it reuses units {(~self.mask[0]).nonzero().flatten().tolist()}")
        if self.units is not None:
            self.units = tuple(self.units)
        if self.num_blocks is not None and self.units is not None \
                and self.num_blocks * len(self.units) != self.mask.shape[1]:
            raise InputError(f"plan has {self.mask.shape[1]} unit columns but its layout is {self.num_blocks} blocks "
                             f"x {len(self.units)} units {self.units} = {self.num_blocks * len(self.units)}")
        self.metadata = {str(k): str(v) for k, v in self.metadata.items()}

    @property
    def num_steps(self) -> int:
        return int(self.mask.shape[0])

    @property
    def num_units(self) -> int:
        return int(self.mask.shape[1])

    @property
    def skipped_units(self) -> int:
        """Number of (step, unit) pairs that reuse their cache."""
        return int((~self.mask).sum())

    @property
    def usage_ratio(self) -> float:
        """Cache-usage ratio (CUR, spec §0): reused (step, unit) pairs over all steps x units."""
        return self.skipped_units / self.mask.numel()

    @property
    def unit_kind(self) -> str | None:
        return None if self.units is None else "+".join(self.units)

    def computes(self, step: int, unit: int) -> bool:
        return bool(self.mask[step, unit])

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary (what `diffaccel cache plan-info` prints)."""
        return {"steps": self.num_steps, "units": self.num_units, "model_class": self.model_class,
                "num_blocks": self.num_blocks, "unit_kind": self.unit_kind, "scheduler_class": self.scheduler_class,
                "usage_ratio": self.usage_ratio, "skipped_units": self.skipped_units,
                "computed_units_per_step": self.mask.sum(dim=1).tolist(), "metadata": dict(self.metadata)}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the plan as safetensors (a uint8 `mask` tensor; layout and metadata in the header), atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        header = {"format": PLAN_FORMAT, "model_class": self.model_class or "",
                  "num_blocks": str(self.num_blocks or ""), "units": ",".join(self.units or ()),
                  "scheduler_class": self.scheduler_class or "",
                  "metadata": json.dumps(self.metadata, sort_keys=True)}
        atomic_save(path, lambda tmp: save_file({"mask": self.mask.to(torch.uint8)}, str(tmp), metadata=header))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> CachePlan:
        """Read a plan written by `save` (or a shipped plan's name, see `shipped_plans`)."""
        from safetensors import safe_open

        path = _plan_path(path)
        if path.is_dir():
            raise InputError(f"{path} is a folder, not a cache plan file (.safetensors)")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                if header.get("format") != PLAN_FORMAT:
                    raise InputError(f"{path} is not a diffaccel cache plan (format {header.get('format')!r}, "
                                     f"expected {PLAN_FORMAT!r})")
                mask = f.get_tensor("mask")
        except InputError:
            raise
        except Exception as exc:  # safetensors raises its own error types for files that are not safetensors
            raise InputError(f"{path} is not a readable cache plan (.safetensors): {exc}") from exc
        return cls(mask=mask, model_class=header.get("model_class") or None,
                   num_blocks=int(header["num_blocks"]) if header.get("num_blocks") else None,
                   units=tuple(header["units"].split(",")) if header.get("units") else None,
                   scheduler_class=header.get("scheduler_class") or None,
                   metadata=json.loads(header.get("metadata") or "{}"))


def shipped_plans() -> dict[str, Path]:
    """Plans shipped with diffaccel: `{name: path}`, e.g. `"digits-dit-20-harmonica-b1"`."""
    return {p.stem: p for p in sorted(PLANS_DIR.glob("*.safetensors")) if not p.stem.endswith(".router")}


def _plan_path(name_or_path: str | os.PathLike) -> Path:
    path = Path(name_or_path)
    if path.exists():
        return path
    shipped = shipped_plans()
    if str(name_or_path) in shipped:
        return shipped[str(name_or_path)]
    raise InputError(f"no cache plan file {str(name_or_path)!r}; shipped plans: {', '.join(shipped) or 'none'}")


def _layout_of(model: Any | None, num_units: int) -> dict[str, Any]:
    if model is None:
        return {}
    transformer = find_denoiser(model)
    units = default_units(transformer)
    n = len(transformer.transformer_blocks) * len(units)
    if n != num_units:
        raise InputError(f"num_units={num_units} but {type(transformer).__name__} has {n} cache units "
                         f"({len(transformer.transformer_blocks)} blocks x {units})")
    scheduler = getattr(model, "scheduler", None)
    return {"model_class": type(transformer).__name__, "num_blocks": len(transformer.transformer_blocks),
            "units": units, "scheduler_class": None if scheduler is None else sched_name(scheduler)}


def fora_plan(num_steps: int, num_units: int, interval: int, *, model: Any | None = None) -> CachePlan:
    """FORA (Selvaraju et al. 2024): every unit is computed at steps s with s % interval == 0 and reused otherwise.

    `model` (a transformer or pipeline) binds the plan to that layout and scheduler; without it the plan is generic.
    """
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise InputError(f"FORA interval must be an int >= 1, got {interval!r}")
    _check_size(num_steps, num_units)
    mask = (torch.arange(num_steps) % interval == 0)[:, None].expand(num_steps, num_units)
    return CachePlan(mask, **_layout_of(model, num_units), metadata={"kind": "fora", "interval": str(interval)})


def random_plan(num_steps: int, num_units: int, usage_ratio: float, seed: int = 0, *,
                model: Any | None = None) -> CachePlan:
    """A plan reusing `round(usage_ratio * steps * units)` (step, unit) pairs drawn uniformly from rows 1..N-1."""
    _check_size(num_steps, num_units)
    total = num_steps * num_units
    k = round(usage_ratio * total)
    if not 0.0 <= usage_ratio <= 1.0 or k > (num_steps - 1) * num_units:
        raise InputError(f"usage_ratio {usage_ratio} asks for {k} reused pairs but only "
                         f"{(num_steps - 1) * num_units} of {total} are reusable (row 0 always computes)")
    g = torch.Generator().manual_seed(seed)
    flat = torch.ones(total, dtype=torch.bool)
    idx = torch.randperm((num_steps - 1) * num_units, generator=g)[:k] + num_units
    flat[idx] = False
    return CachePlan(flat.view(num_steps, num_units), **_layout_of(model, num_units),
                     metadata={"kind": "random", "seed": str(seed), "usage_ratio": f"{k / total:.6f}"})


def _check_size(num_steps: int, num_units: int) -> None:
    if num_steps < 1 or num_units < 1:
        raise InputError(f"num_steps and num_units must be >= 1, got {num_steps}, {num_units}")


def resample_plan(plan: CachePlan, model: Any) -> CachePlan:
    """Map a plan onto a deeper/shallower transformer of the same unit kind by nearest block in relative depth
    (a diffaccel helper for speed measurements on the full-size model; not from the paper)."""
    transformer = find_denoiser(model)
    units = default_units(transformer)
    if plan.units is not None and tuple(plan.units) != units:
        raise InputError(f"plan units {plan.units} differ from {type(transformer).__name__}'s {units}")
    blocks_from = plan.num_units // len(units)
    blocks_to = len(transformer.transformer_blocks)
    cols = []
    for b in range(blocks_to):
        src = min(blocks_from - 1, int((b + 0.5) * blocks_from / blocks_to))
        cols += [src * len(units) + j for j in range(len(units))]
    return CachePlan(plan.mask[:, cols], type(transformer).__name__, blocks_to, units, plan.scheduler_class,
                     {**plan.metadata, "resampled_from_blocks": str(blocks_from)})


# ----------------------------------------------------------------------------------------------------------------------
# router


class Router(nn.Module):
    """Learnable per-step, per-unit logits Θ [steps, units]; r = sigmoid(Θ) ≈ 1 computes, ≈ 0 reuses (spec §3.2).

    Row 0 is the constant `first_logit` (5.0, sigmoid ≈ 0.9933, as in the released code) and not trainable; rows
    1..N-1 are separate parameters initialised from N(0, init_std²) so that an optimiser skips rows without a
    gradient. `clamp_()` keeps Θ in [-clamp, clamp] after each update.
    """

    def __init__(self, num_steps: int, num_units: int, *, model_class: str | None = None,
                 num_blocks: int | None = None, units: Sequence[str] | None = None,
                 scheduler_class: str | None = None, init_std: float = 1.0, first_logit: float = 5.0,
                 clamp: float = 5.0, seed: int = 0) -> None:
        super().__init__()
        _check_size(num_steps, num_units)
        if num_steps < 2:
            raise InputError("a router needs at least 2 steps (row 0 always computes)")
        self.num_steps, self.num_units = num_steps, num_units
        self.model_class, self.num_blocks = model_class, num_blocks
        self.units = tuple(units) if units is not None else None
        self.scheduler_class = scheduler_class
        self.first_logit, self.clamp = float(first_logit), float(clamp)
        g = torch.Generator().manual_seed(seed)
        self.rows = nn.ParameterList(
            [nn.Parameter(torch.randn(num_units, generator=g) * init_std) for _ in range(num_steps - 1)])
        self.register_buffer("first", torch.full((num_units,), self.first_logit), persistent=False)

    @classmethod
    def for_model(cls, model: Any, num_steps: int, **kwargs: Any) -> Router:
        """A router shaped for a transformer (or a pipeline's transformer and scheduler)."""
        transformer = find_denoiser(model)
        units = default_units(transformer)
        scheduler = getattr(model, "scheduler", None)
        return cls(num_steps, len(transformer.transformer_blocks) * len(units),
                   model_class=type(transformer).__name__, num_blocks=len(transformer.transformer_blocks),
                   units=units, scheduler_class=None if scheduler is None else sched_name(scheduler), **kwargs)

    @property
    def logits(self) -> torch.Tensor:
        """Θ as one [steps, units] tensor (differentiable w.r.t. rows 1..N-1)."""
        return torch.cat([self.first[None], torch.stack(list(self.rows))])

    def row_scores(self, step: int) -> torch.Tensor:
        """sigmoid(Θ[step]) — differentiable for step >= 1."""
        return torch.sigmoid(self.first if step == 0 else self.rows[step - 1])

    def scores(self) -> torch.Tensor:
        return torch.sigmoid(self.logits)

    def forward(self) -> torch.Tensor:  # noqa: D102
        return self.scores()

    @torch.no_grad()
    def clamp_(self) -> None:
        for p in self.rows:
            p.clamp_(-self.clamp, self.clamp)

    def to_plan(self, threshold: float = DEFAULT_THRESHOLD) -> CachePlan:
        """Binary plan `P = sigmoid(Θ) > threshold`, row 0 forced to compute (spec §3.3)."""
        if not 0.0 < threshold < 1.0:
            raise InputError(f"threshold must be in (0, 1), got {threshold}")
        with torch.no_grad():
            mask = self.scores() > threshold
        mask[0] = True
        return CachePlan(mask, self.model_class, self.num_blocks, self.units, self.scheduler_class,
                         {"kind": "harmonica", "threshold": str(threshold)})

    @classmethod
    def from_released(cls, state_dict: dict[str, torch.Tensor], model: Any | None = None, **kwargs: Any) -> Router:
        """Import a router saved by the released HarmoniCa / Learning-to-Cache DiT code (spec §3.2).

        Those store one `prob` logit vector (2 * depth entries) per step in a ModuleList indexed by the *respaced
        diffusion index*, the reverse of execution order: execution step s is stored router N - 1 - s. Keys are
        matched as `<...>.<i>.prob`. The imported row 0 is replaced by the fixed first row (it always computes).
        """
        import re

        rows: dict[int, torch.Tensor] = {}
        for key, value in state_dict.items():
            m = re.search(r"(?:^|\.)(\d+)\.prob$", key)
            if m:
                rows[int(m.group(1))] = torch.as_tensor(value).detach().float().reshape(-1)
        if not rows or sorted(rows) != list(range(len(rows))):
            raise InputError(f"expected router keys '<i>.prob' for i = 0..N-1, got {sorted(state_dict)[:6]}...")
        n = len(rows)
        units = {v.numel() for v in rows.values()}
        if len(units) != 1:
            raise InputError(f"released router rows have different lengths {sorted(units)}")
        router = cls.for_model(model, n, **kwargs) if model is not None else cls(n, units.pop(), **kwargs)
        if router.num_units != rows[0].numel():
            raise InputError(f"released router has {rows[0].numel()} units per step but the model has "
                             f"{router.num_units}")
        with torch.no_grad():
            for s in range(1, n):
                router.rows[s - 1].copy_(rows[n - 1 - s])
        return router

    def _header(self) -> dict[str, str]:
        return {"format": ROUTER_FORMAT, "num_steps": str(self.num_steps), "num_units": str(self.num_units),
                "model_class": self.model_class or "", "num_blocks": str(self.num_blocks or ""),
                "units": ",".join(self.units or ()), "scheduler_class": self.scheduler_class or "",
                "first_logit": repr(self.first_logit), "clamp": repr(self.clamp)}

    def save(self, path: str | os.PathLike) -> Path:
        """Write Θ [steps, units] (float32) and the layout as safetensors, atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        logits = self.logits.detach().float().contiguous()
        atomic_save(path, lambda tmp: save_file({"logits": logits}, str(tmp), metadata=self._header()))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Router:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            h = f.metadata() or {}
            if h.get("format") != ROUTER_FORMAT:
                raise InputError(f"{path} is not a diffaccel router (format {h.get('format')!r})")
            logits = f.get_tensor("logits")
        router = cls(int(h["num_steps"]), int(h["num_units"]), model_class=h.get("model_class") or None,
                     num_blocks=int(h["num_blocks"]) if h.get("num_blocks") else None,
                     units=tuple(h["units"].split(",")) if h.get("units") else None,
                     scheduler_class=h.get("scheduler_class") or None, first_logit=float(h["first_logit"]),
                     clamp=float(h["clamp"]))
        with torch.no_grad():
            for s, p in enumerate(router.rows, start=1):
                p.copy_(logits[s])
        return router


# ----------------------------------------------------------------------------------------------------------------------
# hooks (spec §3.3, §3.4, §3.8)


GateFn = Callable[[int], "torch.Tensor | None"]


@dataclass
class CachePlanCounters:
    """Per-generation counts: real executions and reuses of every unit, transformer calls and steps."""

    steps: int = 0
    calls: int = 0
    runs: list[int] = field(default_factory=list)
    reuses: list[int] = field(default_factory=list)


class _HCState:
    """State shared by closure between one transformer's HarmoniCa hooks.

    mode: "plan" (binary plan, inference), "soft" (training forward: y = r f + (1 - r) c, write if r > τ),
    "soft_readonly" (blend but never write), "teacher" (plain f, no cache access), "teacher_write" (plain f,
    written to the cache). In the soft modes `gates(step)` returns r for that row, or None for "compute" (y = f).
    """

    def __init__(self, num_units: int, plan: CachePlan | None, pipe: Any | None, force: bool,
                 timesteps_callback: Callable[[], Any] | None) -> None:
        self.num_units = num_units
        self.plan = plan
        self.rows = plan.mask.tolist() if plan is not None else None
        self.mode = "plan" if plan is not None else "teacher"
        self.gates: GateFn | None = None
        self.threshold = DEFAULT_THRESHOLD
        self.pipe_ref = weakref.ref(pipe) if pipe is not None else None
        self.force = force
        self.cache: dict[tuple[int, int], torch.Tensor] = {}
        self.active = False
        self.single_slot = False  # training: teacher and student calls at one step share slot 0
        self.slot = 0
        self.step_key: tuple[int, int] | None = None
        self.counters = self._fresh_counters()
        self.tracker = StepTracker(on_new_generation=self._new_generation, timesteps_callback=timesteps_callback)

    def _fresh_counters(self) -> CachePlanCounters:
        return CachePlanCounters(runs=[0] * self.num_units, reuses=[0] * self.num_units)

    def clear(self) -> None:
        self.cache.clear()
        self.active = False
        self.step_key = None
        self.tracker.reset()

    def reorder_rows(self, rows: torch.Tensor) -> None:
        """Particles were resampled: every cached unit output follows its row."""
        self.cache = {key: take_rows(value, rows) for key, value in self.cache.items()}

    def _new_generation(self) -> None:
        self.cache.clear()
        self.step_key = None
        self.counters = self._fresh_counters()
        if self.plan is None or self.mode != "plan":
            return
        n = self.tracker.num_steps
        if n is not None and n != self.plan.num_steps and not self.force:
            raise InputError(f"the scheduler runs {n} steps but the cache plan was made for {self.plan.num_steps} "
                             "steps; set num_inference_steps to the plan's step count or use a plan for this count")
        pipe = self.pipe_ref() if self.pipe_ref is not None else None
        scheduler = getattr(pipe, "scheduler", None)
        if scheduler is not None and self.plan.scheduler_class and not self.force \
                and sched_name(scheduler) != self.plan.scheduler_class:
            raise InputError(f"the pipeline's scheduler is {sched_name(scheduler)} but the cache plan was made "
                             f"for {self.plan.scheduler_class}")


class _StepHook(StatefulHook):
    """The step hook on the transformer: step tracking and the active flag the unit hooks read."""

    def __init__(self, state: _HCState, timestep_position: int) -> None:
        super().__init__()
        self.state = state
        self.timestep_position = timestep_position

    def reset_state(self, module: nn.Module) -> nn.Module:
        self.state.clear()
        return module

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        st = self.state
        hidden = get_argument(args, kwargs, "hidden_states", 0)
        timestep = get_argument(args, kwargs, "timestep", self.timestep_position)
        if timestep is None:
            raise TypeError("HarmoniCa caching needs the transformer's `timestep` argument")
        tracker = st.tracker
        tracker.observe(timestep, input_signature(hidden))
        key = (tracker.generations, tracker.step)
        if key != st.step_key:
            st.step_key, st.slot = key, 0
            st.counters.steps += 1
        elif not st.single_slot:
            st.slot += 1
        st.counters.calls += 1
        if st.mode == "plan" and st.plan is not None and tracker.step >= st.plan.num_steps:
            if not st.force:
                raise InputError(f"step {tracker.step} of this generation is past the cache plan's "
                                 f"{st.plan.num_steps} steps; run {st.plan.num_steps} steps or use a matching plan")
        st.active = True
        try:
            return self.fn_ref.original_forward(*args, **kwargs)
        finally:
            st.active = False


class _UnitHook(StatefulHook):
    """The unit hook on one unit module: compute-and-store, reuse, or the soft training blend (spec §3.3-3.4)."""

    def __init__(self, state: _HCState, index: int) -> None:
        super().__init__()
        self.state = state
        self.index = index

    def reset_state(self, module: nn.Module) -> nn.Module:
        self.state.clear()
        return module

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        st = self.state
        forward = self.fn_ref.original_forward
        if not st.active or st.mode == "teacher":
            return forward(*args, **kwargs)
        u, step = self.index, st.tracker.step
        key = (u, st.slot)
        cached = st.cache.get(key)
        if st.mode == "plan":
            rows = st.rows
            compute = cached is None or step >= len(rows) or rows[step][u]
            if not compute:
                st.counters.reuses[u] += 1
                return cached  # gated out of place by the block, so handing out the stored tensor is safe
            out = forward(*args, **kwargs)
            st.cache[key] = out.detach()
            st.counters.runs[u] += 1
            return out
        out = forward(*args, **kwargs)
        st.counters.runs[u] += 1
        if st.mode == "teacher_write":
            st.cache[key] = out.detach()
            return out
        gates = st.gates(step) if st.gates is not None else None
        if gates is None or cached is None:
            y, write = out, True
        else:
            r = gates[u]
            y = r * out + (1 - r) * cached  # spec §3.4: y = r f + (1 - r) c
            write = bool(r.detach() > st.threshold)
        if st.mode == "soft" and write:
            st.cache[key] = y.detach()
        return y


# ----------------------------------------------------------------------------------------------------------------------
# public API


def _timestep_position(transformer: nn.Module) -> int:
    names = list(inspect.signature(type(transformer).forward).parameters)[1:]  # drop self
    return names.index("timestep") if "timestep" in names else 1


def check_plan(plan: CachePlan, model: Any) -> None:
    """Raise ValueError when `plan` does not fit the transformer (class, block count, unit count) or, given a
    pipeline, its scheduler class. Messages name both sides."""
    transformer = find_denoiser(model)
    cls = type(transformer).__name__
    units = default_units(transformer)
    blocks = len(transformer.transformer_blocks)
    if plan.model_class is not None and plan.model_class != cls:
        raise InputError(f"the cache plan was made for {plan.model_class} but the model is {cls}")
    if plan.units is not None and tuple(plan.units) != units:
        raise InputError(f"the cache plan's units are {plan.units} but {cls} uses {units}")
    if plan.num_blocks is not None and plan.num_blocks != blocks:
        raise InputError(f"the cache plan was made for {plan.num_blocks} transformer blocks but the model has {blocks}")
    if plan.num_units != blocks * len(units):
        raise InputError(f"the cache plan has {plan.num_units} unit columns but the model has {blocks * len(units)} "
                         f"units ({blocks} blocks x {units})")
    scheduler = getattr(model, "scheduler", None)
    if scheduler is not None and plan.scheduler_class and sched_name(scheduler) != plan.scheduler_class:
        raise InputError(f"the pipeline's scheduler is {sched_name(scheduler)} but the cache plan was made for "
                         f"{plan.scheduler_class}")


def _attach(model: Any, plan: CachePlan | None, force: bool,
            timesteps_callback: Callable[[], Any] | None) -> _HCState:
    pipe = None if isinstance(model, nn.Module) else model
    transformer = find_denoiser(model)
    units = unit_modules(transformer)
    if has_hook(transformer, STEP_HOOK):
        raise InputError("a cache plan or router is already attached to this transformer; call remove_cache_plan "
                         "first")
    if timesteps_callback is None and pipe is not None:
        pipe_ref = weakref.ref(pipe)
        timesteps_callback = lambda: pipe_ref().scheduler.timesteps  # noqa: E731
    state = _HCState(len(units), plan, pipe, force, timesteps_callback)
    for i, (_, module) in enumerate(units):
        register_hook(module, _UnitHook(state, i), UNIT_HOOK)
    register_hook(transformer, _StepHook(state, _timestep_position(transformer)), STEP_HOOK)
    return state


def apply_cache_plan(model: Any, plan: CachePlan | str | os.PathLike, *, force: bool = False,
                     timesteps_callback: Callable[[], Any] | None = None) -> None:
    """Attach a cache plan to a DiT / PixArt transformer or to a pipeline's transformer.

    Then call the pipeline normally (or through `cached_call` for an explicit reset). `plan` may be a `CachePlan`,
    a file, or a shipped plan's name. Layout mismatches raise ValueError; so do, at the start of a generation, a
    scheduler step count or scheduler class other than the plan's (when the pipeline or `timesteps_callback` tells
    us), unless `force=True`.
    """
    if not isinstance(plan, CachePlan):
        plan = CachePlan.load(plan)
    if force:
        transformer = find_denoiser(model)
        n = len(unit_modules(transformer))
        if plan.num_units != n:
            raise InputError(f"the cache plan has {plan.num_units} unit columns but the model has {n} units")
    else:
        check_plan(plan, model)
    _attach(model, plan, force, timesteps_callback)


def attach_router(model: Any, router: Router | None = None, *, threshold: float = DEFAULT_THRESHOLD) -> _HCState:
    """Attach the training engine (soft forward, spec §3.4) and return its state, for `harmonica_train`.

    The state starts in "teacher" mode; set `state.mode` and `state.gates` per forward. Remove with
    `remove_cache_plan`."""
    transformer = find_denoiser(model)
    if router is not None and router.num_units != len(unit_modules(transformer)):
        raise InputError(f"the router has {router.num_units} units but the model has "
                         f"{len(unit_modules(transformer))}")
    state = _attach(transformer, None, True, None)
    state.threshold = threshold
    state.single_slot = True
    return state


def remove_cache_plan(model: Any) -> None:
    """Reset and remove every HarmoniCa hook; the transformer then behaves exactly as before."""
    remove_hooks(find_denoiser(model), list(HOOK_NAMES))


def _state(model: Any) -> _HCState:
    return hook_state(model, STEP_HOOK, "a cache plan")


def cache_plan_counters(model: Any) -> CachePlanCounters:
    """Unit executions and reuses of the current (or last) generation."""
    return _state(model).counters


def attached_plan(model: Any) -> CachePlan | None:
    """The plan attached to a model (None when none is, or a router is attached for training)."""
    hook = get_hook(find_denoiser(model), STEP_HOOK)
    return None if hook is None else hook.state.plan


# ----------------------------------------------------------------------------------------------------------------------
# cost model


def example_inputs(transformer: nn.Module, batch: int = 2, height: int | None = None) -> dict[str, Any]:
    """Random inputs of one transformer call (DiT: class labels; PixArt: a 4-token caption embedding)."""
    cfg = transformer.config
    side = height if height is not None else cfg.sample_size
    g = torch.Generator().manual_seed(0)
    device, dtype = transformer.device, transformer.dtype
    x = torch.randn(batch, cfg.in_channels, side, side, generator=g).to(device, dtype)
    t = torch.full((batch,), 500, device=device)
    name = type(transformer).__name__
    if name == "DiTTransformer2DModel":
        return {"hidden_states": x, "timestep": t, "class_labels": torch.zeros(batch, dtype=torch.long, device=device)}
    if name == "PixArtTransformer2DModel":
        ehs = torch.randn(batch, 4, cfg.caption_channels, generator=g).to(device, dtype)
        return {"hidden_states": x, "timestep": t, "encoder_hidden_states": ehs,
                "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    raise TypeError(f"no example inputs for {name}")


@torch.no_grad()
def unit_flops(transformer: nn.Module, **inputs: Any) -> tuple[int, list[int]]:
    """FLOPs of one transformer call and of each unit within it (torch `FlopCounterMode`: matmuls, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    inputs = inputs or example_inputs(transformer)
    with FlopCounterMode(display=False) as counter:
        transformer(**inputs)
    counts = counter.get_flop_counts()
    prefix = type(transformer).__name__
    per_unit = [int(sum(counts.get(f"{prefix}.{name}", {}).values())) for name, _ in unit_modules(transformer)]
    return int(counter.get_total_flops()), per_unit


def plan_flops_ratio(plan: CachePlan, total: int, per_unit: Sequence[int]) -> float:
    """Theoretical speed-up N * F / Σ_s (F - Σ_{u reused at s} F_u) of a plan given `unit_flops`' numbers."""
    if len(per_unit) != plan.num_units:
        raise InputError(f"{len(per_unit)} unit FLOP counts for a plan with {plan.num_units} units")
    saved = (~plan.mask).double() @ torch.tensor(per_unit, dtype=torch.float64)
    cost = plan.num_steps * total - float(saved.sum())
    return math.inf if cost <= 0 else plan.num_steps * total / cost
