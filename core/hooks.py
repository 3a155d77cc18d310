"""The hook machinery every diffaccel method builds on (`diffusers.hooks`), kept here once.

Feature caches (encoder propagation, HarmoniCa), patch parallelism and the protocol's call hooks use:

* `StepTracker` — the execution-order step index `s` read from the denoiser's own `timestep` argument, with
  new-generation detection (a rise in timestep, or a change of input shape / dtype / device) as a safety net;
* `StatefulHook` — a `ModelHook` base for our stateful hooks (reset between generations), with a per-call
  extension point (`prepare_call`) that `caching.cached_call` uses;
* `register_hook` / `remove_hooks` — symmetric registration under stable `diffaccel.<method>.<role>` names, and
  removal that leaves no registry or instance `forward` behind on modules where nothing else is hooked;
* `reset_caches`, `cache_session` — explicit per-generation reset;
* small pytree helpers for batch-aligned tensors: `tree_map`, `tree_leaves`, `tile_batch`, `split_batch`.

Nothing here assigns to `module.forward` itself or patches classes: `HookRegistry` does the wrapping.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook

from .errors import InputError
from .families import find_denoiser

TimestepsCallback = Callable[[], Sequence[float] | torch.Tensor]


# ----------------------------------------------------------------------------------------------------------------------
# pytree helpers


def tree_map(fn: Callable[[torch.Tensor], Any], obj: Any) -> Any:
    """Apply `fn` to every tensor inside nested tuples, lists, dicts and diffusers `BaseOutput`s; keep the layout."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if dataclasses.is_dataclass(obj) and isinstance(obj, dict):  # diffusers BaseOutput (an OrderedDict dataclass)
        return type(obj)(**{k: tree_map(fn, v) for k, v in obj.items()})
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(tree_map(fn, v) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(tree_map(fn, v) for v in obj)
    if isinstance(obj, dict):
        return type(obj)((k, tree_map(fn, v)) for k, v in obj.items())
    return obj


def tree_leaves(obj: Any) -> list[Any]:
    """Every leaf (tensor or other value) of a nested structure, in a stable order."""
    if isinstance(obj, dict):
        return [leaf for k in obj for leaf in [k, *tree_leaves(obj[k])]]
    if isinstance(obj, (tuple, list)):
        return [leaf for v in obj for leaf in tree_leaves(v)]
    return [obj]


def tile_batch(obj: Any, batch: int, times: int) -> Any:
    """Repeat every batch-aligned tensor (leading dim == `batch`) `times` times along dim 0, step-major ."""

    def tile(x: torch.Tensor) -> torch.Tensor:
        if x.ndim > 0 and x.shape[0] == batch:
            return x.repeat(times, *([1] * (x.ndim - 1)))
        return x

    return tree_map(tile, obj)


def split_batch(obj: Any, batch: int, times: int) -> list[Any]:
    """Inverse of `tile_batch` on an output: `times` structures, chunk `j` holding rows `[j*batch, (j+1)*batch)`."""

    def chunk(j: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def take(x: torch.Tensor) -> torch.Tensor:
            if x.ndim > 0 and x.shape[0] == batch * times:
                return x[j * batch:(j + 1) * batch]
            return x

        return take

    return [tree_map(chunk(j), obj) for j in range(times)]


def take_rows(obj: Any, rows: torch.Tensor) -> Any:
    """Reindex every batch-aligned tensor by `rows` (length n): a leading dim of m*n (e.g. a CFG-doubled batch,
    stacked as m blocks of n) takes `rows` within each block; other tensors are kept."""
    n = len(rows)

    def take(x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 0 or x.shape[0] % n:
            return x
        idx = rows.to(x.device)
        idx = torch.cat([idx + j * n for j in range(x.shape[0] // n)])
        return x[idx]

    return tree_map(take, obj)


def same_values(a: Sequence[Any], b: Sequence[Any]) -> bool:
    """True when two leaf lists hold the same conditioning: tensors identical objects or equal in shape and value."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
                return False
            if x is y:
                continue
            if x.shape != y.shape or x.dtype != y.dtype or x.device != y.device or not torch.equal(x, y):
                return False
        else:
            try:
                if not bool(x == y):
                    return False
            except Exception:  # values without a usable == (e.g. arrays): treat as different
                return False
    return True


def get_argument(args: tuple, kwargs: dict, name: str, position: int) -> Any:
    """A forward argument given by keyword or by position."""
    if name in kwargs:
        return kwargs[name]
    if len(args) > position:
        return args[position]
    return None


def set_argument(args: tuple, kwargs: dict, name: str, position: int, value: Any) -> tuple[tuple, dict]:
    """Replace a forward argument wherever it was given (keyword, else position)."""
    if name in kwargs or len(args) <= position:
        return args, {**kwargs, name: value}
    return args[:position] + (value,) + args[position + 1:], kwargs


def first_timestep(timestep: Any) -> float:
    """The timestep of a denoiser call as a Python float (first element of a tensor or sequence)."""
    if isinstance(timestep, torch.Tensor):
        if timestep.numel() == 0:
            raise InputError("empty timestep tensor")
        return float(timestep.reshape(-1)[0].item())
    if isinstance(timestep, (list, tuple)):
        return float(timestep[0])
    return float(timestep)


def dedupe_consecutive(values: Sequence[float]) -> list[float]:
    """Drop consecutive repeats (second-order schedulers list each intermediate timestep twice)."""
    out: list[float] = []
    for v in values:
        if not out or v != out[-1]:
            out.append(v)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# step tracking


@dataclasses.dataclass
class StepTracker:
    """Execution-order step index from the denoiser's timesteps; shared by closure between a method's hooks.

    `observe(t, signature)` is called by every hooked model that receives a timestep (UNet, ControlNet). The first
    module to see a new timestep advances the step; later calls at the same timestep are the same step. A rise in
    timestep, a different input signature, or a pending `reset()` starts a new generation (step 0) and calls
    `on_new_generation`. `trajectory` is the list of this generation's timesteps in execution order when a
    `timesteps_callback` is given (from the observed first timestep onwards, so img2img starts at step 0).
    """

    on_new_generation: Callable[[], None] | None = None
    timesteps_callback: TimestepsCallback | None = None
    step: int = -1
    timestep: float | None = None
    signature: tuple | None = None
    trajectory: list[float] | None = None
    generations: int = 0
    _pending_reset: bool = True

    def reset(self) -> None:
        """Forget the current generation; the next observed call starts a new one."""
        self.step = -1
        self.timestep = None
        self.signature = None
        self.trajectory = None
        self._pending_reset = True

    @property
    def num_steps(self) -> int | None:
        return None if self.trajectory is None else len(self.trajectory)

    def observe(self, timestep: Any, signature: tuple | None = None) -> bool:
        """Update from one model call; returns True when this call starts a new step (incl. a new generation)."""
        t_now = first_timestep(timestep)
        mismatch = signature is not None and self.signature is not None and signature != self.signature
        if self._pending_reset or self.timestep is None or t_now > self.timestep or mismatch:
            self._start_generation(t_now)
            if signature is not None:
                self.signature = signature
            return True
        if signature is not None and self.signature is None:
            self.signature = signature
        if t_now == self.timestep:
            return False
        self.step += 1
        self.timestep = t_now
        return True

    def future_timesteps(self) -> list[float] | None:
        """Timesteps of steps `step+1, step+2, ...` of this generation, if known."""
        if self.trajectory is None:
            return None
        return self.trajectory[self.step + 1:]

    def _start_generation(self, t_now: float) -> None:
        self.reset()
        self._pending_reset = False
        self.step = 0
        self.timestep = t_now
        self.generations += 1
        if self.timesteps_callback is not None:
            ts = self.timesteps_callback()
            values = [float(v) for v in (ts.tolist() if isinstance(ts, torch.Tensor) else ts)]
            values = dedupe_consecutive(values)
            if t_now in values:
                self.trajectory = values[values.index(t_now):]
        if self.on_new_generation is not None:
            try:
                self.on_new_generation()
            except Exception:
                self._pending_reset = True  # a refused generation must not be continued by the next call
                raise


def input_signature(sample: Any) -> tuple | None:
    """What a cache depends on besides the step: batch size, spatial shape, dtype and device of the input."""
    if not isinstance(sample, torch.Tensor):
        return None
    return (tuple(sample.shape), sample.dtype, sample.device)


# ----------------------------------------------------------------------------------------------------------------------
# hooks: base class, registration, removal, reset


class StatefulHook(ModelHook):
    """Base class of diffaccel's hooks: stateful, with an optional per-pipeline-call extension point."""

    _is_stateful = True

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:  # noqa: D102 (diffusers contract)
        return module

    def prepare_call(self, pipe: Any, call_kwargs: dict[str, Any]) -> dict[str, Any]:
        """Adjust a pipeline call's kwargs before `cached_call` runs it (default: unchanged)."""
        return call_kwargs


class SharedStateHook(StatefulHook):
    """A hook that is one of several on a model sharing one state object (its `clear()` resets a generation):
    resetting any of them clears the shared state."""

    def __init__(self, state: Any) -> None:
        super().__init__()
        self.state = state

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.state.clear()
        return module


def has_hook(module: torch.nn.Module, name: str) -> bool:
    registry = getattr(module, "_diffusers_hook", None)
    return registry is not None and registry.get_hook(name) is not None


def get_hook(module: torch.nn.Module, name: str) -> ModelHook | None:
    registry = getattr(module, "_diffusers_hook", None)
    return None if registry is None else registry.get_hook(name)


def hook_state(model_or_pipe: Any, name: str, what: str) -> Any:
    """The shared state of the hook `name` on a model's (or pipeline's) denoiser; `ValueError` naming `what` when
    it is not attached (an `InputError`)."""
    from .errors import InputError

    hook = get_hook(find_denoiser(model_or_pipe), name)
    if hook is None:
        raise InputError(f"{what} is not applied to this model (nothing attached)")
    return hook.state


def register_hook(module: torch.nn.Module, hook: ModelHook, name: str) -> None:
    """Register `hook` as the outermost hook on `module` under `name` (registered after any existing hooks)."""
    registry = HookRegistry.check_if_exists_or_initialize(module)
    registry.register_hook(hook, name)
    registry.invalidate_child_registries_cache()


def _cleanup_module(module: torch.nn.Module) -> None:
    """Drop an empty registry and the instance-level `forward` that `HookRegistry` left behind (R2)."""
    registry = module.__dict__.get("_diffusers_hook")
    if registry is None or registry.hooks:
        return
    fwd = module.__dict__.get("forward")
    if fwd is not None and getattr(fwd, "__func__", None) is type(module).forward and fwd.__self__ is module:
        del module.forward
    del module._diffusers_hook


def remove_hooks(module: torch.nn.Module, names: Sequence[str]) -> None:
    """Reset, then remove every hook called one of `names` on `module` and all its descendants."""
    reset_caches(module)
    for _, sub in module.named_modules():
        registry = sub.__dict__.get("_diffusers_hook")
        if registry is None:
            continue
        for name in names:
            registry.remove_hook(name, recurse=False)
        _cleanup_module(sub)
    root = module.__dict__.get("_diffusers_hook")
    if root is not None:
        root.invalidate_child_registries_cache()


def reorder_rows(model_or_pipe: Any, rows: torch.Tensor) -> None:
    """After particles were resampled (FK steering): every hook state with per-row caches (`reorder_rows(rows)`)
    moves its rows with the particles, so particle i continues with the cache of its ancestor `rows[i]`."""
    seen: set[int] = set()
    for _, sub in find_denoiser(model_or_pipe).named_modules():
        registry = sub.__dict__.get("_diffusers_hook")
        for hook in ([] if registry is None else registry.hooks.values()):
            state = getattr(hook, "state", None)
            if state is not None and id(state) not in seen and hasattr(state, "reorder_rows"):
                seen.add(id(state))
                state.reorder_rows(rows)


def iter_stateful_hooks(module: torch.nn.Module) -> Iterator[StatefulHook]:
    """Every `StatefulHook` on the module itself (outermost first)."""
    registry = module.__dict__.get("_diffusers_hook")
    if registry is None:
        return
    for name in reversed(registry._hook_order):
        hook = registry.hooks[name]
        if isinstance(hook, StatefulHook):
            yield hook


def _pipeline_modules(model_or_pipe: Any) -> list[torch.nn.Module]:
    if isinstance(model_or_pipe, torch.nn.Module):
        return [model_or_pipe]
    components = getattr(model_or_pipe, "components", None) or {}
    modules = [m for m in components.values() if isinstance(m, torch.nn.Module)]
    return modules or [find_denoiser(model_or_pipe)]


def reset_caches(model_or_pipe: Any) -> None:
    """Clear every cached tensor and counter of stateful hooks on a model (or every model of a pipeline) ."""
    for module in _pipeline_modules(model_or_pipe):
        for _, sub in module.named_modules():
            registry = sub.__dict__.get("_diffusers_hook")
            if registry is not None:
                registry.reset_stateful_hooks(recurse=False)


@contextlib.contextmanager
def cache_session(model_or_pipe: Any) -> Iterator[None]:
    """``with cache_session(pipe): pipe(...)`` — reset caching state before and after (also on errors)."""
    reset_caches(model_or_pipe)
    try:
        yield
    finally:
        reset_caches(model_or_pipe)
