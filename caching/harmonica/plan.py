"""HarmoniCa cache plans: the unit layout of a transformer, `CachePlan` (binary [steps, units], 1 = compute), plan
files, the shipped plans, and the FORA / random baselines.

Huang et al., ICML 2025 (arXiv 2410.01723), §3: a *unit* is one branch of a transformer block whose output can be
reused across steps (u = 2b for `attn1` of block b, u = 2b + 1 for its `ff`; PixArt adds `attn2`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...core.errors import InputError
from ...core.families import find_denoiser
from ...core.files import atomic_save, shipped_or_path
from ...core.schedulers import class_name as sched_name
from ..masks import StepUnitMask

STEP_HOOK = "diffaccel.harmonica.step"
UNIT_HOOK = "diffaccel.harmonica.unit"
OUTPUT_HOOK = "diffaccel.harmonica.output"  # a Flux single-stream block's `proj_out` (see `engine._OutputHook`)
HOOK_NAMES = (STEP_HOOK, UNIT_HOOK, OUTPUT_HOOK)
PLAN_FORMAT = "diffaccel.cache_plan.v1"
ROUTER_FORMAT = "diffaccel.router.v1"
DEFAULT_THRESHOLD = 0.1  # τ of the released HarmoniCa / Learning-to-Cache DiT code
PLANS_DIR = Path(__file__).resolve().parents[1] / "plans"

# Unit layout per transformer class (HarmoniCa caches the attention and MLP outputs of each block).
# PixArt's set is our choice: HarmoniCa's PixArt code is unreleased.
# MMDiT (our choice, as FORA's and HarmoniCa's DiT units): SD3's joint blocks cache the joint attention (one call
# giving the image and the text stream) and the two MLP branches; Flux adds its single-stream blocks ("single."),
# whose units are the attention and the MLP input projection (the fused output projection reuses its stored output
# when both do: `engine._OutputHook`).
DEFAULT_UNITS: dict[str, tuple[str, ...]] = {
    "DiTTransformer2DModel": ("attn1", "ff"),
    "PixArtTransformer2DModel": ("attn1", "attn2", "ff"),
    "SD3Transformer2DModel": ("attn", "ff", "ff_context"),
    "FluxTransformer2DModel": ("attn", "ff", "ff_context", "single.attn", "single.proj_mlp"),
}
SINGLE = "single."  # unit prefix: a module of `single_transformer_blocks`
#: units a block may lack: the last joint block of SD3 / Flux has no context MLP (`context_pre_only`)
OPTIONAL_UNITS = ("ff_context",)
#: classes whose blocks do not all hold the same units (the plan's width is counted from the model instead)
MIXED_BLOCKS = ("SD3Transformer2DModel", "FluxTransformer2DModel")


# ----------------------------------------------------------------------------------------------------------------------
# unit layout


def default_units(transformer: nn.Module) -> tuple[str, ...]:
    """The cache units per block of a supported transformer class."""
    name = type(transformer).__name__
    if name not in DEFAULT_UNITS:
        raise TypeError(f"HarmoniCa caching supports {', '.join(DEFAULT_UNITS)}, got {name}")
    return DEFAULT_UNITS[name]


def unit_modules(transformer: nn.Module, units: Sequence[str] | None = None) -> list[tuple[str, nn.Module]]:
    """`[(qualified name, module)]` in unit order: block by block (`transformer_blocks`, then Flux's
    `single_transformer_blocks`), each block's units in `units` order (u = len(units) * b + j for DiT/PixArt).
    An optional unit a block lacks (SD3/Flux's last joint block has no `ff_context`) is left out."""
    units = tuple(units) if units is not None else default_units(transformer)
    out = []
    for attr, names in (("transformer_blocks", [u for u in units if not u.startswith(SINGLE)]),
                        ("single_transformer_blocks", [u[len(SINGLE):] for u in units if u.startswith(SINGLE)])):
        if not names:
            continue
        for b, block in enumerate(getattr(transformer, attr)):
            if getattr(block, "_chunk_size", None) is not None:
                raise InputError(f"{attr}.{b} uses feed-forward chunking (chunk size {block._chunk_size}), "
                                 "which calls `ff` once per chunk; disable it before attaching a cache plan")
            for name in names:
                module = getattr(block, name, None)
                if module is None and name in OPTIONAL_UNITS:
                    continue
                if not isinstance(module, nn.Module):
                    have = [n for n, m in block.named_children() if isinstance(m, nn.Module)]
                    raise InputError(f"{attr}.{b} has no unit {name!r}; its modules are {have}")
                out.append((f"{attr}.{b}.{name}", module))
    return out


def num_blocks(transformer: nn.Module) -> int:
    """Transformer blocks holding cache units (Flux: double- plus single-stream blocks)."""
    return len(transformer.transformer_blocks) + len(getattr(transformer, "single_transformer_blocks", ()))


# ----------------------------------------------------------------------------------------------------------------------
# plans


@dataclass
class CachePlan(StepUnitMask):
    """Binary cache plan P [steps, units] (True = compute, False = reuse) plus the setting it is valid for.

    model_class / num_blocks / units describe the unit layout (None = a generic plan, checked only by its unit
    count); scheduler_class the scheduler it was made for (None = any); metadata free-form strings (training
    command, guidance, threshold, ...).

    forecast: what a reused (step, unit) pair hands out. 0: the unit's last computed output (FORA, HarmoniCa);
    1: the first-order forecast from its last two computed outputs, c1 + (c1 - c0) (s - s1) / (s1 - s0) (the
    order-1 Taylor expansion with finite differences of TaylorSeer, Liu et al. 2025, Eq. 6), the last output
    while only one exists; 2: TaylorSeer's order-2 expansion from its last three computed outputs (the second
    derivative estimated as diffusers' TaylorSeer does, over the latest spacing), the order-1 forecast while only
    two exist. (The exact quadratic through the three outputs extrapolated worse on digits-dit at 2.6x: 37.99 dB,
    against 39.19 for this form and 38.62 for order 1; the Taylor form's smaller second-order term does better.)
    """

    mask: torch.Tensor
    model_class: str | None = None
    num_blocks: int | None = None
    units: tuple[str, ...] | None = None
    scheduler_class: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    forecast: int = 0

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
        if self.num_blocks is not None and self.units is not None and self.model_class not in MIXED_BLOCKS \
                and self.num_blocks * len(self.units) != self.mask.shape[1]:
            raise InputError(f"plan has {self.mask.shape[1]} unit columns but its layout is {self.num_blocks} blocks "
                             f"x {len(self.units)} units {self.units} = {self.num_blocks * len(self.units)}")
        self.metadata = {str(k): str(v) for k, v in self.metadata.items()}
        if self.forecast not in (0, 1, 2):
            raise InputError(f"forecast is the order of the reuse forecast, 0, 1 or 2, got {self.forecast!r}")

    @property
    def skipped_units(self) -> int:
        """Number of (step, unit) pairs that reuse their cache."""
        return int((~self.mask).sum())

    @property
    def usage_ratio(self) -> float:
        """Cache-usage ratio (CUR, HarmoniCa's cache-usage ratio): reused (step, unit) pairs over all steps x units."""
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
                "computed_units_per_step": self.mask.sum(dim=1).tolist(), "forecast": self.forecast,
                "metadata": dict(self.metadata)}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the plan as safetensors (a uint8 `mask` tensor; layout and metadata in the header), atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        header = {"format": PLAN_FORMAT, "model_class": self.model_class or "",
                  "num_blocks": str(self.num_blocks or ""), "units": ",".join(self.units or ()),
                  "scheduler_class": self.scheduler_class or "", "forecast": str(self.forecast),
                  "metadata": json.dumps(self.metadata, sort_keys=True)}
        atomic_save(path, lambda tmp: save_file({"mask": self.mask.to(torch.uint8)}, str(tmp), metadata=header))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> CachePlan:
        """Read a plan written by `save` (or a shipped plan's name, see `shipped_plans`)."""
        from safetensors import safe_open

        path = shipped_or_path(path, shipped_plans(), "cache plan")
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
                   metadata=json.loads(header.get("metadata") or "{}"), forecast=int(header.get("forecast") or 0))


def shipped_plans() -> dict[str, Path]:
    """Plans shipped with diffaccel: `{name: path}`, e.g. `"digits-dit-20-harmonica-b1"`."""
    return {p.stem: p for p in sorted(PLANS_DIR.glob("*.safetensors")) if not p.stem.endswith(".router")}


def _layout_of(model: Any | None, num_units: int) -> dict[str, Any]:
    if model is None:
        return {}
    transformer = find_denoiser(model)
    units = default_units(transformer)
    n = len(unit_modules(transformer))
    if n != num_units:
        raise InputError(f"num_units={num_units} but {type(transformer).__name__} has {n} cache units "
                         f"({num_blocks(transformer)} blocks, units {units})")
    scheduler = getattr(model, "scheduler", None)
    return {"model_class": type(transformer).__name__, "num_blocks": num_blocks(transformer),
            "units": units, "scheduler_class": None if scheduler is None else sched_name(scheduler)}


def fora_plan(num_steps: int, num_units: int, interval: int, *, model: Any | None = None,
              forecast: int = 0) -> CachePlan:
    """FORA (Selvaraju et al. 2024): every unit is computed at steps s with s % interval == 0 and reused otherwise.

    `model` (a transformer or pipeline) binds the plan to that layout and scheduler; without it the plan is generic.
    `forecast=1` (or 2) extrapolates the reused outputs (see `CachePlan`): FORA's schedule with TaylorSeer's rule.
    """
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise InputError(f"FORA interval must be an int >= 1, got {interval!r}")
    _check_size(num_steps, num_units)
    mask = (torch.arange(num_steps) % interval == 0)[:, None].expand(num_steps, num_units)
    return CachePlan(mask, **_layout_of(model, num_units), metadata={"kind": "fora", "interval": str(interval)},
                     forecast=forecast)


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
    if len(unit_modules(transformer)) != len(transformer.transformer_blocks) * len(units):
        raise InputError(f"resample_plan maps plans of uniform blocks (DiT, PixArt); {type(transformer).__name__} "
                         "has blocks with different unit sets")
    blocks_from = plan.num_units // len(units)
    blocks_to = len(transformer.transformer_blocks)
    cols = []
    for b in range(blocks_to):
        src = min(blocks_from - 1, int((b + 0.5) * blocks_from / blocks_to))
        cols += [src * len(units) + j for j in range(len(units))]
    return CachePlan(plan.mask[:, cols], type(transformer).__name__, blocks_to, units, plan.scheduler_class,
                     {**plan.metadata, "resampled_from_blocks": str(blocks_from)}, plan.forecast)
