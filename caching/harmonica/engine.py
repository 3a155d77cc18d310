"""The HarmoniCa engine: hooks that compute, store and reuse unit outputs following a plan, and the soft forward
router training drives (`CacheMode`).

When unit u is reused at step s the block still computes its adaLN modulation for t_s and adds `gate(t_s) * c_u` to
the current residual stream (paper §3): reuse is neither skipping the block nor reusing its output. Hooks:
`diffaccel.harmonica.step` on the transformer (step tracking, plan row checks), `diffaccel.harmonica.unit` on every
unit module.
"""

from __future__ import annotations

import enum
import inspect
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...core.errors import InputError
from ...core.families import find_denoiser
from ...core.hooks import (
    SharedStateHook,
    StepTracker,
    get_argument,
    get_hook,
    has_hook,
    hook_state,
    input_signature,
    register_hook,
    remove_hooks,
    take_rows,
    tree_map,
)
from ...core.schedulers import class_name as sched_name
from .plan import (
    DEFAULT_THRESHOLD,
    HOOK_NAMES,
    OUTPUT_HOOK,
    SINGLE,
    STEP_HOOK,
    UNIT_HOOK,
    CachePlan,
    default_units,
    num_blocks,
    unit_modules,
)
from .router import Router


class CacheMode(str, enum.Enum):
    """What the unit hooks do in a forward (a `str` enum: compares equal to its value)."""

    PLAN = "plan"  # binary plan, inference
    SOFT = "soft"  # training forward: y = r f + (1 - r) c, written to the cache where r > τ
    SOFT_READONLY = "soft_readonly"  # blend, never write
    TEACHER = "teacher"  # plain f, no cache access
    TEACHER_WRITE = "teacher_write"  # plain f, written to the cache

# ----------------------------------------------------------------------------------------------------------------------
# hooks (HarmoniCa, Huang et al. ICML 2025: binary plan at inference, soft blend in training)


GateFn = Callable[[int], "torch.Tensor | None"]


@dataclass
class CachePlanCounters:
    """Per-generation counts: real executions and reuses of every unit, transformer calls and steps."""

    steps: int = 0
    calls: int = 0
    runs: list[int] = field(default_factory=list)
    reuses: list[int] = field(default_factory=list)
    output_reuses: int = 0  # Flux single-stream `proj_out` calls skipped (`_OutputHook`)


class _HCState:
    """State shared by closure between one transformer's HarmoniCa hooks.

    mode: a `CacheMode`, set by `harmonica_train` per forward during router training. In the soft modes
    `gates(step)` returns r for that row, or None for "compute" (y = f).
    """

    def __init__(self, num_units: int, plan: CachePlan | None, pipe: Any | None, force: bool,
                 timesteps_callback: Callable[[], Any] | None) -> None:
        self.num_units = num_units
        self.plan = plan
        self.rows = plan.mask.tolist() if plan is not None else None
        self.mode = CacheMode.PLAN if plan is not None else CacheMode.TEACHER
        self.gates: GateFn | None = None
        self.threshold = DEFAULT_THRESHOLD
        self.pipe_ref = weakref.ref(pipe) if pipe is not None else None
        self.force = force
        self.cache: dict[tuple[int, int], torch.Tensor] = {}
        self.forecast = plan.forecast if plan is not None else 0
        self.previous: dict[tuple[int, int], tuple[Any, int, int]] = {}  # forecast: the computation before
        self.older: dict[tuple[int, int], tuple[Any, int]] = {}  # forecast 2: the one before that
        self.computed_at: dict[tuple[int, int], int] = {}
        self.plain_reuse: set[tuple[int, int]] = set()  # (unit, slot) whose latest call handed out its cache as is
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}  # (single-stream block, slot): its proj_out output
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
        self.previous.clear()
        self.older.clear()
        self.computed_at.clear()
        self.plain_reuse.clear()
        self.outputs.clear()
        self.active = False
        self.step_key = None
        self.tracker.reset()

    def reorder_rows(self, rows: torch.Tensor) -> None:
        """Particles were resampled: every cached unit output follows its row."""
        self.cache = {key: take_rows(value, rows) for key, value in self.cache.items()}
        self.previous = {key: (take_rows(v, rows), s0, s1) for key, (v, s0, s1) in self.previous.items()}
        self.older = {key: (take_rows(v, rows), s0) for key, (v, s0) in self.older.items()}
        self.outputs = {key: take_rows(value, rows) for key, value in self.outputs.items()}

    def _new_generation(self) -> None:
        self.cache.clear()
        self.previous.clear()
        self.older.clear()
        self.computed_at.clear()
        self.plain_reuse.clear()
        self.outputs.clear()
        self.step_key = None
        self.counters = self._fresh_counters()
        if self.plan is None or self.mode != CacheMode.PLAN:
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


class _StepHook(SharedStateHook):
    """The step hook on the transformer: step tracking and the active flag the unit hooks read."""

    state: _HCState

    def __init__(self, state: _HCState, timestep_position: int) -> None:
        super().__init__(state)
        self.timestep_position = timestep_position

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
        if st.mode == CacheMode.PLAN and st.plan is not None and tracker.step >= st.plan.num_steps:
            if not st.force:
                raise InputError(f"step {tracker.step} of this generation is past the cache plan's "
                                 f"{st.plan.num_steps} steps; run {st.plan.num_steps} steps or use a matching plan")
        st.active = True
        try:
            return self.fn_ref.original_forward(*args, **kwargs)
        finally:
            st.active = False


def _forecast(last: Any, before: Any, s_before: int, s_last: int, step: int) -> Any:
    """Order-1 forecast c1 + (c1 - c0) (s - s1) / (s1 - s0) of a unit's output, stream by stream."""
    w = (step - s_last) / (s_last - s_before)
    if isinstance(last, torch.Tensor):
        return last + (last - before) * w
    return type(last)(_forecast(a, b, s_before, s_last, step) if a is not None else None
                      for a, b in zip(last, before, strict=True))


def _forecast2(last: Any, before: Any, oldest: Any, s0: int, s1: int, s2: int, step: int) -> Any:
    """Order-2 forecast of a unit's output from its computations c0, c1, c2 at steps s0 < s1 < s2: TaylorSeer's
    truncated Taylor series (Liu et al. 2025, Eq. 6) at the latest computation, c2 + f1 k + f2 k^2 / 2 with k = s - s2,
    f1 = (c2 - c1) / (s2 - s1) and f2 = (f1 - (c1 - c0) / (s1 - s0)) / (s2 - s1), as diffusers' TaylorSeer
    estimates the derivatives (the second difference over the latest spacing); stream by stream."""
    if not isinstance(last, torch.Tensor):
        return type(last)(_forecast2(a, b, c, s0, s1, s2, step) if a is not None else None
                          for a, b, c in zip(last, before, oldest, strict=True))
    f2 = ((last - before) / (s2 - s1) - (before - oldest) / (s1 - s0)) / (s2 - s1)
    return _forecast(last, before, s1, s2, step) + f2 * ((step - s2) ** 2 / 2)


def _blend(r: torch.Tensor, out: Any, cached: Any) -> Any:
    """r f + (1 - r) c, stream by stream for units that return several tensors."""
    if isinstance(out, torch.Tensor):
        return r * out + (1 - r) * cached
    return type(out)(_blend(r, o, c) if o is not None else None for o, c in zip(out, cached, strict=True))


class _UnitHook(SharedStateHook):
    """The unit hook on one unit module: compute-and-store, reuse, or the soft training blend (HarmoniCa)."""

    state: _HCState

    def __init__(self, state: _HCState, index: int) -> None:
        super().__init__(state)
        self.index = index

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        st = self.state
        forward = self.fn_ref.original_forward
        if not st.active or st.mode == CacheMode.TEACHER:
            return forward(*args, **kwargs)
        u, step = self.index, st.tracker.step
        key = (u, st.slot)
        cached = st.cache.get(key)
        if st.mode == CacheMode.PLAN:
            rows = st.rows
            compute = cached is None or step >= len(rows) or rows[step][u]
            if not compute:
                st.counters.reuses[u] += 1
                if st.forecast and key in st.previous:
                    st.plain_reuse.discard(key)
                    before, s_before, s_last = st.previous[key]
                    if st.forecast >= 2 and key in st.older:
                        oldest, s_oldest = st.older[key]
                        return _forecast2(cached, before, oldest, s_oldest, s_before, s_last, step)
                    return _forecast(cached, before, s_before, s_last, step)
                st.plain_reuse.add(key)
                return cached  # gated out of place by the block, so handing out the stored tensor is safe
            st.plain_reuse.discard(key)
            out = forward(*args, **kwargs)
            if st.forecast:
                if st.forecast >= 2 and key in st.previous:  # (output, step) of the third latest computation
                    st.older[key] = st.previous[key][:2]
                if cached is not None:  # (output, step) of the two latest computations
                    st.previous[key] = (cached, st.computed_at[key], step)
                st.computed_at[key] = step
            st.cache[key] = tree_map(torch.Tensor.detach, out)  # MMDiT joint attention returns two streams
            st.counters.runs[u] += 1
            return out
        out = forward(*args, **kwargs)
        st.counters.runs[u] += 1
        if st.mode == CacheMode.TEACHER_WRITE:
            st.cache[key] = tree_map(torch.Tensor.detach, out)
            return out
        gates = st.gates(step) if st.gates is not None else None
        if gates is None or cached is None:
            y, write = out, True
        else:
            r = gates[u]
            y = _blend(r, out, cached)  # HarmoniCa training: y = r f + (1 - r) c
            write = bool(r.detach() > st.threshold)
        if st.mode == CacheMode.SOFT and write:
            st.cache[key] = tree_map(torch.Tensor.detach, y)
        return y


class _OutputHook(SharedStateHook):
    """On a Flux single-stream block's `proj_out` (diffaccel's addition to the FORA / HarmoniCa units): the block
    computes `proj_out(cat(attn, act(proj_mlp)))` with `attn` and `proj_mlp` its two units. When this call handed out
    both units' stored outputs unchanged (plan mode, no forecast), proj_out's input is the one of its own latest
    call in this slot (any recomputation of either unit made proj_out run again), so its stored output is returned:
    bit-identical to running it, and the block's largest matmul (39% of its FLOPs at FLUX.1-dev width) is skipped."""

    state: _HCState

    def __init__(self, state: _HCState, block: int, inputs: tuple[int, ...]) -> None:
        super().__init__(state)
        self.block, self.inputs = block, inputs

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        st = self.state
        forward = self.fn_ref.original_forward
        if not st.active or st.mode != CacheMode.PLAN:
            return forward(*args, **kwargs)
        key = (self.block, st.slot)
        stored = st.outputs.get(key)
        if stored is not None and all((u, st.slot) in st.plain_reuse for u in self.inputs):
            st.counters.output_reuses += 1
            return stored  # scaled out of place by the block's gate
        out = forward(*args, **kwargs)
        st.outputs[key] = out.detach()
        return out


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
    blocks = num_blocks(transformer)
    n_units = len(unit_modules(transformer))
    if plan.model_class is not None and plan.model_class != cls:
        raise InputError(f"the cache plan was made for {plan.model_class} but the model is {cls}")
    if plan.units is not None and tuple(plan.units) != units:
        raise InputError(f"the cache plan's units are {plan.units} but {cls} uses {units}")
    if plan.num_blocks is not None and plan.num_blocks != blocks:
        raise InputError(f"the cache plan was made for {plan.num_blocks} transformer blocks but the model has {blocks}")
    if plan.num_units != n_units:
        raise InputError(f"the cache plan has {plan.num_units} unit columns but the model has {n_units} "
                         f"units ({blocks} blocks, units {units})")
    scheduler = getattr(model, "scheduler", None)
    if scheduler is not None and plan.scheduler_class and sched_name(scheduler) != plan.scheduler_class:
        raise InputError(f"the pipeline's scheduler is {sched_name(scheduler)} but the cache plan was made for "
                         f"{plan.scheduler_class}")


def _single_stream_outputs(transformer: nn.Module, units: list[tuple[str, nn.Module]]
                           ) -> list[tuple[int, nn.Module, tuple[int, ...]]]:
    """`(block, proj_out, unit indices)` of every Flux single-stream block whose units are exactly the modules that
    feed its proj_out (`attn` and `proj_mlp`); other layouts get no output hook."""
    index = {name: i for i, (name, _) in enumerate(units)}
    out = []
    for b, block in enumerate(getattr(transformer, "single_transformer_blocks", ())):
        names = [f"single_transformer_blocks.{b}.{m[len(SINGLE):]}" for m in ("single.attn", "single.proj_mlp")]
        proj_out = getattr(block, "proj_out", None)
        if isinstance(proj_out, nn.Module) and all(n in index for n in names):
            out.append((b, proj_out, tuple(index[n] for n in names)))
    return out


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
    for block, proj_out, inputs in _single_stream_outputs(transformer, units):
        register_hook(proj_out, _OutputHook(state, block, inputs), OUTPUT_HOOK)
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
    """Attach the training engine (HarmoniCa's soft forward) and return its state, for `harmonica_train`.

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
