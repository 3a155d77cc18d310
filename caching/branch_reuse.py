"""Branch reuse: per-step, per-depth reuse of a UNet's skip branches, given as a binary plan (diffaccel's method).

A UNet2DConditionModel is a ladder of skip branches. Branch r (r = 0 .. R-1, shallow to deep) is the r-th tensor of
`down_block_res_samples`: made by an encoder layer (r = 0: `conv_in`; then each down block's resnet(+attention)
layers and its downsampler, in order) and consumed by one decoder layer (an up block's resnet(+attention), counted
from the output side; the upsampler rides with the last layer of its block). With the mid block this gives
2R + 1 **units** in execution order::

    enc_0 (conv_in), enc_1, ..., enc_{R-1}, mid, dec_{R-1}, ..., dec_1, dec_0

A `BranchReusePlan` is a boolean mask [steps x units] (True = compute the unit at that step, False = hand out the
output it produced at the last step it was computed). Row 0 always computes. Two published methods are special
cases, and no-reuse is the all-True plan (bit-exact with the plain UNet):

* **DeepCache** (Ma et al., CVPR 2024, Alg. 1; `deepcache_plan`): every `interval`-th step is full; in between, the
  shallow path up to skip branch b is recomputed and everything deeper is reused (the package's `(block, layer)`
  rule, applied to this UNet's own layer coordinates, so it matches `DeepCacheSDHelper` on any layout);
* **encoder propagation** (Li et al., "Faster Diffusion", NeurIPS 2024, §3.2; `encoder_propagation_plan`): at
  non-key steps the whole encoder (conv_in, down blocks, mid) is reused and the decoder recomputed.

`branch_plan(mask [steps x R])` gives the depth-cut reading: branch r recomputed at step s means both of its ends
(enc_r, dec_r) are, the mid block with the deepest branch. Plans are searched for a target compute ratio by
`search_plan` (measured paired fidelity on calibration seeds; see `diffaccel cache calibrate`).

Everything is `diffusers.hooks` (`HookRegistry`); no forward is assigned by hand. The cache decision for a step is
made once per UNet call in the top-level hook, outside any compiled block.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.families import find_denoiser
from ..core.files import shipped_or_path
from ..core.hooks import (
    SharedStateHook,
    StatefulHook,
    StepTracker,
    TimestepsCallback,
    get_argument,
    has_hook,
    input_signature,
    register_hook,
    remove_hooks,
)
from .masks import StepUnitMask

STEP_HOOK = "diffaccel.branch_reuse.step"
UNIT_HOOK = "diffaccel.branch_reuse.unit"
HOOK_NAMES = (STEP_HOOK, UNIT_HOOK)
PLANS_DIR = Path(__file__).resolve().parent / "plans" / "branch_reuse"


# ----------------------------------------------------------------------------------------------------------------------
# the unit layout of a UNet


@dataclass(frozen=True)
class Unit:
    """One reusable piece: its name, side ("enc" / "mid" / "dec"), branch index and the modules it consists of.

    `coord` is DeepCache's coordinate of the piece: (block, layer) counted from the input side for the encoder
    and from the output side for the decoder."""

    name: str
    side: str
    branch: int
    modules: tuple[nn.Module, ...] = field(compare=False, repr=False)
    coord: tuple[int, int] = (0, 0)


def unet_units(unet: nn.Module) -> list[Unit]:
    """The 2R + 1 units of a UNet2DConditionModel / UNet2DModel, in execution order (module docstring)."""
    for attr in ("conv_in", "down_blocks", "mid_block", "up_blocks"):
        if getattr(unet, attr, None) is None:
            raise TypeError(f"branch reuse needs a diffusers UNet (conv_in, down_blocks, mid_block, up_blocks); "
                            f"{type(unet).__name__} has no {attr}")
    enc: list[Unit] = [Unit("enc_0.conv_in", "enc", 0, (unet.conv_in,), (-1, 0))]
    for i, block in enumerate(unet.down_blocks):
        attns = list(getattr(block, "attentions", None) or [])
        for j, resnet in enumerate(block.resnets):
            mods = (resnet, attns[j]) if j < len(attns) else (resnet,)
            enc.append(Unit(f"enc_{len(enc)}.down{i}.layer{j}", "enc", len(enc), mods, (i, j)))
        for sampler in getattr(block, "downsamplers", None) or []:
            enc.append(Unit(f"enc_{len(enc)}.down{i}.downsampler", "enc", len(enc), (sampler,),
                            (i, len(block.resnets))))
    consumers: list[Unit] = []
    n_up = len(unet.up_blocks)
    for k, block in enumerate(unet.up_blocks):
        attns = list(getattr(block, "attentions", None) or [])
        samplers = list(getattr(block, "upsamplers", None) or [])
        n = len(block.resnets)
        for j, resnet in enumerate(block.resnets):
            mods = (resnet, attns[j]) if j < len(attns) else (resnet,)
            if j == n - 1:
                mods = mods + tuple(samplers)
            consumers.append(Unit(f"up{k}.layer{j}", "dec", -1, mods, (n_up - k - 1, n - j - 1)))
    r_total = len(enc)
    if len(consumers) != r_total:
        raise TypeError(f"{type(unet).__name__}: {r_total} skip branches but {len(consumers)} decoder layers; "
                        "branch reuse needs one decoder layer per skip branch")
    dec = [Unit(f"dec_{r_total - 1 - q}.{u.name}", "dec", r_total - 1 - q, u.modules, u.coord)
           for q, u in enumerate(consumers)]
    mid = Unit("mid", "mid", r_total, (unet.mid_block,), (0, 0))
    return [*enc, mid, *dec]


def num_branches(unet: nn.Module) -> int:
    return (len(unet_units(unet)) - 1) // 2


# ----------------------------------------------------------------------------------------------------------------------
# plans


@dataclass
class BranchReusePlan(StepUnitMask):
    """Binary plan [steps x units] (True = compute) for one UNet layout; `metadata` holds free-form strings."""

    mask: torch.Tensor
    unit_names: tuple[str, ...] | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        mask = torch.as_tensor(self.mask)
        if mask.ndim != 2 or mask.shape[0] < 1 or mask.shape[1] < 3 or mask.shape[1] % 2 == 0:
            raise ValueError(f"a branch reuse plan is a [steps x (2R + 1)] mask, got shape {tuple(mask.shape)}")
        if mask.dtype != torch.bool:
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError("a branch reuse plan must be binary (0/1 or bool)")
            mask = mask.bool()
        if not bool(mask[0].all()):
            raise ValueError("row 0 of a branch reuse plan must compute every unit (nothing is cached yet)")
        self.mask = mask.cpu().contiguous()
        if self.unit_names is not None:
            self.unit_names = tuple(self.unit_names)
            if len(self.unit_names) != self.num_units:
                raise ValueError(f"{len(self.unit_names)} unit names for a plan with {self.num_units} units")

    @property
    def num_branches(self) -> int:
        return (self.num_units - 1) // 2

    @property
    def reuse_fraction(self) -> float:
        """Share of (step, unit) pairs reused (not a compute ratio: units differ in cost; see `plan_flops_ratio`)."""
        return float((~self.mask).double().mean())

    def save(self, path: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {**self.metadata, "format": "diffaccel-branch-reuse-plan/1"}
        if self.unit_names is not None:
            meta["unit_names"] = ",".join(self.unit_names)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({"mask": self.mask.to(torch.uint8)}, str(tmp), metadata=meta)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> BranchReusePlan:
        from safetensors import safe_open

        path = shipped_or_path(path, shipped_unet_plans(), "branch reuse plan")
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            if meta.get("format") != "diffaccel-branch-reuse-plan/1":
                raise ValueError(f"{path} is not a diffaccel branch reuse plan (format {meta.get('format')!r})")
            mask = f.get_tensor("mask").bool()
        names = meta.pop("unit_names", None)
        meta.pop("format", None)
        return cls(mask, tuple(names.split(",")) if names else None, meta)


def shipped_unet_plans() -> dict[str, Path]:
    """Branch reuse plans shipped with diffaccel (`caching/plans/branch_reuse/`): `{name: path}`."""
    return {p.stem: p for p in sorted(PLANS_DIR.glob("*.safetensors"))}


def no_reuse_plan(num_steps: int, unet: nn.Module) -> BranchReusePlan:
    units = unet_units(unet)
    return BranchReusePlan(torch.ones(num_steps, len(units), dtype=torch.bool), tuple(u.name for u in units),
                           {"kind": "no-reuse"})


def _check_steps(num_steps: int) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")


def deepcache_row(unet: nn.Module, branch: int) -> torch.Tensor:
    """DeepCache's reuse-step row for `cache_branch_id=branch` (Ma et al. 2024; the `deepcache` package's rule:
    block = branch // 3, layer = branch % 3; encoder pieces from (block, layer) on and the decoder pieces beyond
    it are reused, as is the mid block)."""
    if isinstance(branch, bool) or not isinstance(branch, int) or branch < 0:
        raise ValueError(f"DeepCache branch must be an int >= 0, got {branch!r}")
    cb, cl = branch // 3, branch % 3
    row = []
    for u in unet_units(unet):
        i, j = u.coord
        if u.side == "mid":
            row.append(False)
        elif u.side == "enc":
            row.append(u.branch == 0 or i < cb or (i == cb and j < cl))
        else:
            row.append(i < cb or (i == cb and j <= cl))
    return torch.tensor(row)


def deepcache_plan(num_steps: int, unet: nn.Module, interval: int, branch: int = 0) -> BranchReusePlan:
    """DeepCache's uniform schedule: step s is full when s % interval == 0, else `deepcache_row(branch)`."""
    _check_steps(num_steps)
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ValueError(f"DeepCache interval must be an int >= 1, got {interval!r}")
    units = unet_units(unet)
    reuse = deepcache_row(unet, branch)
    mask = torch.stack([torch.ones(len(units), dtype=torch.bool) if s % interval == 0 else reuse
                        for s in range(num_steps)])
    return BranchReusePlan(mask, tuple(u.name for u in units),
                           {"kind": "deepcache", "interval": str(interval), "branch": str(branch)})


def encoder_propagation_plan(num_steps: int, unet: nn.Module, key_steps: Sequence[int] | str) -> BranchReusePlan:
    """Faster Diffusion's encoder propagation: at non-key steps reuse conv_in, the down blocks and the mid block;
    recompute the decoder. `key_steps`: execution-order step indices (0 is always key) or a schedule name of
    `caching.key_steps` (e.g. "sd50", "uniform-2")."""
    _check_steps(num_steps)
    if isinstance(key_steps, str):
        from .key_steps import get_schedule

        key_steps = get_schedule(key_steps).key_steps(num_steps)
    keys = {int(k) for k in key_steps} | {0}
    if any(k < 0 or k >= num_steps for k in keys):
        raise ValueError(f"key steps must lie in [0, {num_steps}), got {sorted(keys)}")
    units = unet_units(unet)
    reuse = torch.tensor([u.side == "dec" for u in units])
    mask = torch.stack([torch.ones(len(units), dtype=torch.bool) if s in keys else reuse for s in range(num_steps)])
    return BranchReusePlan(mask, tuple(u.name for u in units),
                           {"kind": "encoder-propagation", "key_steps": ",".join(map(str, sorted(keys)))})


def branch_plan(mask: torch.Tensor, unet: nn.Module, metadata: dict[str, str] | None = None) -> BranchReusePlan:
    """A [steps x R] branch mask (True = recompute branch r: its encoder and decoder layer) as a unit plan; the mid
    block is computed with the deepest branch."""
    mask = torch.as_tensor(mask).bool()
    units = unet_units(unet)
    r_total = (len(units) - 1) // 2
    if mask.ndim != 2 or mask.shape[1] != r_total:
        raise ValueError(f"a branch mask for this UNet is [steps x {r_total}], got {tuple(mask.shape)}")
    cols = [mask[:, u.branch] if u.side != "mid" else mask[:, r_total - 1] for u in units]
    return BranchReusePlan(torch.stack(cols, dim=1), tuple(u.name for u in units), dict(metadata or {}))


def check_plan(plan: BranchReusePlan, unet: nn.Module) -> None:
    units = unet_units(unet)
    if plan.num_units != len(units):
        raise ValueError(f"the plan has {plan.num_units} units but {type(unet).__name__} has {len(units)} "
                         f"({(len(units) - 1) // 2} skip branches)")
    if plan.unit_names is not None and tuple(plan.unit_names) != tuple(u.name for u in units):
        raise ValueError("the plan was made for a UNet with a different layout (unit names differ)")


# ----------------------------------------------------------------------------------------------------------------------
# the engine


@dataclass
class BranchReuseCounters:
    """Per-generation counts: UNet calls, and for each unit how often it was computed and reused."""

    calls: int = 0
    computed: list[int] = field(default_factory=list)
    reused: list[int] = field(default_factory=list)


class _State:
    def __init__(self, plan: BranchReusePlan, units: list[Unit], timesteps_callback: TimestepsCallback | None,
                 strict_steps: bool) -> None:
        self.plan, self.units, self.strict_steps = plan, units, strict_steps
        self.tracker = StepTracker(on_new_generation=self._new_generation, timesteps_callback=timesteps_callback)
        self.row: list[bool] = [True] * len(units)
        self.cache: dict[tuple[int, int], Any] = {}
        self.slot = 0
        self.counters = BranchReuseCounters()
        self._new_generation(check=False)

    def _new_generation(self, check: bool = True) -> None:
        self.cache.clear()
        n = len(self.units)
        self.counters = BranchReuseCounters(0, [0] * n, [0] * n)
        steps = self.tracker.num_steps
        if check and self.strict_steps and steps is not None and steps != self.plan.num_steps:
            raise ValueError(f"the branch reuse plan has {self.plan.num_steps} steps but the scheduler runs {steps}; "
                             "make a plan for this step count (or apply with strict_steps=False)")

    def clear(self) -> None:
        self.tracker.reset()
        self.cache.clear()

    def begin_call(self, new_step: bool) -> None:
        """Pick this call's plan row; a second call at the same step (unbatched CFG) gets its own cache slot."""
        s = self.tracker.step
        self.slot = 0 if new_step else self.slot + 1
        self.row = self.plan.mask[s].tolist() if s < self.plan.num_steps else [True] * len(self.units)
        self.counters.calls += 1


class _StepHook(SharedStateHook):
    """On the UNet: advances the step from its timestep and picks the plan row for this call."""

    state: _State

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        sample = get_argument(args, kwargs, "sample", 0)
        timestep = get_argument(args, kwargs, "timestep", 1)
        new_step = self.state.tracker.observe(timestep, input_signature(sample))
        self.state.begin_call(new_step)
        return self.fn_ref.original_forward(*args, **kwargs)


class _UnitHook(StatefulHook):
    """On each module of a unit: run it and remember the output, or hand out the remembered output."""

    def __init__(self, state: _State, unit: int, key: int) -> None:
        super().__init__()
        self.state, self.unit, self.key = state, unit, key

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        st = self.state
        key = (st.slot, self.key)
        if not st.row[self.unit] and key in st.cache:
            if module is st.units[self.unit].modules[0]:
                st.counters.reused[self.unit] += 1
            return st.cache[key]
        out = self.fn_ref.original_forward(*args, **kwargs)
        st.cache[key] = out
        if module is st.units[self.unit].modules[0]:
            st.counters.computed[self.unit] += 1
        return out


def apply_branch_reuse(model: Any, plan: BranchReusePlan | str | os.PathLike, *,
                       timesteps_callback: TimestepsCallback | None = None, strict_steps: bool = True) -> None:
    """Attach a branch reuse plan to a UNet (or a pipeline's UNet). Then call the pipeline as usual.

    `plan`: a `BranchReusePlan`, a plan file or a shipped plan's name. With a pipeline (or `timesteps_callback`),
    a scheduler step count other than the plan's raises ValueError at the start of a generation unless
    `strict_steps=False` (then steps beyond the plan compute everything)."""
    if not isinstance(plan, BranchReusePlan):
        plan = BranchReusePlan.load(plan)
    unet = find_denoiser(model)
    check_plan(plan, unet)
    if has_hook(unet, STEP_HOOK):
        raise ValueError("a branch reuse plan is already attached to this UNet; call remove_branch_reuse first")
    if timesteps_callback is None and not isinstance(model, nn.Module):
        import weakref

        pipe_ref = weakref.ref(model)
        timesteps_callback = lambda: pipe_ref().scheduler.timesteps  # noqa: E731
    units = unet_units(unet)
    state = _State(plan, units, timesteps_callback, strict_steps)
    key = 0
    for i, unit in enumerate(units):
        for module in unit.modules:
            register_hook(module, _UnitHook(state, i, key), UNIT_HOOK)
            key += 1
    register_hook(unet, _StepHook(state), STEP_HOOK)


def remove_branch_reuse(model: Any) -> None:
    """Reset and remove every branch reuse hook; the UNet then behaves exactly as before."""
    remove_hooks(find_denoiser(model), list(HOOK_NAMES))


def _state(model: Any) -> _State:
    from ..core.hooks import hook_state

    return hook_state(model, STEP_HOOK, "a branch reuse plan")


def branch_reuse_counters(model: Any) -> BranchReuseCounters:
    """Unit computations and reuses of the current (or last) generation."""
    return _state(model).counters
