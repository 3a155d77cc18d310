"""The acceleration protocol: `Method` configs, `accelerate(pipe, *methods)` and the handle that undoes it.

Every acceleration is a small frozen config (a `Method`). `accelerate` checks the combination up front (one method
per slot, each method's declared conflicts, then each method's own check against the pipeline), applies the
methods in `Stage` order and returns an `AccelerationHandle`:

* after `accelerate`, a plain ``pipe(...)`` runs the accelerated pipeline: schedulers are swapped or wrapped, caches
  and patch parallelism are hooks on the denoiser, and a `CallEvents` scheduler proxy resets every stateful hook at
  the start of each generation (`set_timesteps`) and runs step-end work such as prior noise injection;
* methods that change what a call *returns* (FK steering, best-of-N) run through ``handle(...)``, which equals
  ``pipe(...)`` for every other recipe;
* ``handle.remove()`` (or leaving ``with accelerate(...)``) undoes every change in reverse order: the original
  scheduler object, denoiser and hook registries come back, so the pipeline equals a freshly loaded one.
"""

from __future__ import annotations

import enum
import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..core.families import PipelineFamily, family_for


class CompositionError(ValueError):
    """A recipe that cannot be applied to this pipeline; the message names the method(s) and the reason."""


class Stage(enum.IntEnum):
    """Application order. Later stages see the pipeline as earlier stages left it."""

    MODEL = 0  # replace the denoiser (one-step student)
    SCHEDULER = 1  # swap the scheduler (samplers)
    SCHEDULER_WRAP = 2  # wrap the scheduler (Time-Shift)
    CACHE = 3  # hooks inside the denoiser (encoder propagation, HarmoniCa, FORA)
    PARALLEL = 4  # hooks around the denoiser's layers (patch parallelism)
    CALL = 5  # what a call does with the pipeline (FK steering, best-of-N)


@dataclass(frozen=True)
class Method:
    """Base of every acceleration config.

    Subclasses give `name` (the recipe keyword), `aliases`, `slot` (at most one method per slot in a recipe) and
    `stage` as class keywords (``class FORA(Method, name="fora", slot="cache", stage=Stage.CACHE)``), and implement
    `apply`, `args` (recipe arguments) and `from_args`. `conflicts` returns the reason two methods cannot be
    combined, or None.
    """

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    slot: ClassVar[str] = ""
    stage: ClassVar[Stage] = Stage.CALL
    #: needs the `CallEvents` scheduler proxy (per-generation reset, step-end work)
    uses_events: ClassVar[bool] = False

    def __init_subclass__(cls, name: str | None = None, aliases: tuple[str, ...] = (), slot: str | None = None,
                          stage: Stage | None = None, uses_events: bool | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for key, value in (("name", name), ("slot", slot), ("stage", stage), ("uses_events", uses_events)):
            if value is not None:
                setattr(cls, key, value)
        if aliases:
            cls.aliases = aliases

    @property
    def num_inference_steps(self) -> int | None:
        """The step count a call should use when the caller gives none (samplers set it)."""
        return None

    # ------------------------------------------------------------------ recipe form
    def args(self) -> list[str]:
        """Recipe arguments after the name (``name[@n]:arg:arg``); the inverse of `from_args`."""
        return []

    def at(self) -> int | None:
        """The ``@n`` part of the recipe form (samplers: NFE), or None."""
        return None

    @classmethod
    def from_args(cls, at: int | None, args: list[str]) -> Method:
        raise NotImplementedError

    def __str__(self) -> str:
        out = self.name + (f"@{self.at()}" if self.at() is not None else "")
        return out + "".join(f":{a}" for a in self.args())

    # ------------------------------------------------------------------ composition
    def conflicts(self, other: Method) -> str | None:
        """Why this method cannot run together with `other` (None: it can)."""
        return None

    def check(self, pipe: Any, family: PipelineFamily, recipe: Sequence[Method]) -> None:
        """Refuse (CompositionError) what this pipeline cannot run, before anything is changed."""

    def apply(self, pipe: Any, ctx: ApplyContext) -> None:
        """Change the pipeline; register every undo step with `ctx.on_remove`."""
        raise NotImplementedError

    # ------------------------------------------------------------------ call-level methods
    def run(self, handle: AccelerationHandle, *args: Any, **kwargs: Any) -> Any:
        """Generate with this method (call-level methods only)."""
        raise NotImplementedError


def parse_args(method: str, args: Sequence[str], keys: dict[str, tuple[str, Callable[[str], Any]]],
               positional: Sequence[tuple[str, Callable[[str], Any]]] = (),
               flags: dict[str, str] | None = None) -> dict[str, Any]:
    """Recipe arguments as keyword arguments: ``key=value`` by `keys` (recipe key -> (field, converter)), bare
    words in `flags` (word -> field set to True), other bare values to the `positional` fields in order."""
    out: dict[str, Any] = {}
    rest = list(positional)
    for a in args:
        key, eq, value = a.partition("=")
        try:
            if eq:
                if key not in keys:
                    raise ValueError(f"unknown argument {key!r}; expected {', '.join(keys) or 'none'}")
                field_name, convert = keys[key]
                out[field_name] = convert(value)
            elif flags and a in flags:
                out[flags[a]] = True
            elif rest:
                field_name, convert = rest.pop(0)
                out[field_name] = convert(a)
            else:
                raise ValueError(f"unexpected argument {a!r}")
        except ValueError as exc:
            raise ValueError(f"{method}: {exc}") from None
    return out


def optional_int(value: str) -> int | None:
    return None if value == "none" else int(value)


@dataclass
class ApplyContext:
    """What `accelerate` hands each method while applying: the family, the recipe, the call events and undo list."""

    family: PipelineFamily
    recipe: tuple[Method, ...]
    events: Any  # CallEvents, installed before the first method
    undo: list[Callable[[], None]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def on_remove(self, fn: Callable[[], None]) -> None:
        self.undo.append(fn)

    def find(self, kind: type) -> Any | None:
        return next((m for m in self.recipe if isinstance(m, kind)), None)


def _check_recipe(recipe: tuple[Method, ...]) -> None:
    slots: dict[str, Method] = {}
    for m in recipe:
        if not isinstance(m, Method):
            raise TypeError(f"accelerate() takes Method configs (Sampler, EncoderPropagation, ...), got {m!r}")
        if m.slot in slots:
            raise CompositionError(f"{slots[m.slot]} and {m} both fill the {m.slot!r} slot; a recipe takes one "
                                   f"{m.slot} method")
        slots[m.slot] = m
    for i, a in enumerate(recipe):
        for b in recipe[i + 1:]:
            reason = a.conflicts(b) or b.conflicts(a)
            if reason:
                raise CompositionError(f"{a} cannot be combined with {b}: {reason}")


def check(pipe: Any, *methods: Method) -> None:
    """Everything `accelerate` would refuse, without changing the pipeline."""
    recipe = tuple(sorted(methods, key=lambda m: m.stage))
    _check_recipe(recipe)
    family = family_for(pipe)
    for m in recipe:
        m.check(pipe, family, recipe)


class AccelerationHandle:
    """What `accelerate` returns: the recipe, ``handle(...)`` to generate, `remove()` to undo (idempotent)."""

    def __init__(self, pipe: Any, recipe: tuple[Method, ...], ctx: ApplyContext) -> None:
        self.pipe, self.recipe, self._ctx = pipe, recipe, ctx
        self.family: PipelineFamily = ctx.family
        self.events: Any = ctx.events  # the CallEvents proxy, or None when no method needs it
        self.notes: list[str] = ctx.notes  # what the methods reported while applying (e.g. cache-usage ratios)
        self.removed = False

    def __repr__(self) -> str:
        state = "removed" if self.removed else "active"
        return f"<AccelerationHandle {type(self.pipe).__name__} {' + '.join(map(str, self.recipe)) or '(plain)'} " \
               f"({state})>"

    def __str__(self) -> str:
        from .recipe import format_recipe

        return format_recipe(self.recipe)

    def call_method(self) -> Method | None:
        return next((m for m in self.recipe if m.stage == Stage.CALL), None)

    def default_steps(self) -> int | None:
        return next((m.num_inference_steps for m in self.recipe if m.num_inference_steps is not None), None)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Generate under the recipe. Without a call-level method this is ``pipe(...)``; the sampler's step count
        is used when `num_inference_steps` is not given."""
        if self.removed:
            raise RuntimeError("this acceleration was removed; call diffaccel.accelerate again")
        steps = self.default_steps()
        if steps is not None and "num_inference_steps" not in kwargs:
            kwargs["num_inference_steps"] = steps
        method = self.call_method()
        if method is not None:
            return method.run(self, *args, **kwargs)
        return self.pipe(*args, **kwargs)

    def as_pipeline(self) -> AcceleratedPipeline:
        """A stand-in for the pipeline whose calls run ``handle(...)``: same call signature, other attributes read
        from the pipeline (for harnesses that take a pipeline, e.g. `diffaccel.evals.evaluate`)."""
        return AcceleratedPipeline(self)

    def remove(self) -> None:
        """Undo every change in reverse order of application (safe to call twice)."""
        if self.removed:
            return
        errors = []
        while self._ctx.undo:
            fn = self._ctx.undo.pop()
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - keep undoing the rest, then report
                errors.append(exc)
        self.removed = True
        if errors:
            raise errors[0]

    def __enter__(self) -> AccelerationHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


class AcceleratedPipeline:
    """`handle.as_pipeline()`: calls go through the handle; the signature and other attributes are the pipeline's."""

    def __init__(self, handle: AccelerationHandle) -> None:
        self.handle = handle
        call = functools.wraps(handle.pipe.__call__)(lambda *a, **kw: handle(*a, **kw))
        self.__call__ = call  # what `inspect.signature(obj.__call__)` reads

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.handle(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if "handle" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["handle"].pipe, name)

    def __repr__(self) -> str:
        return f"AcceleratedPipeline({self.handle!r})"


def accelerate(pipe: Any, *methods: Method | str) -> AccelerationHandle:
    """Apply `methods` (configs, or recipe strings such as ``"s-pndm@10 + ep:uniform-3"``) to `pipe` in stage order.

    Refuses impossible combinations before changing anything (`CompositionError`, naming both methods and the
    reason). On a failure while applying, everything applied so far is undone.
    """
    from .events import CallEvents
    from .recipe import parse_recipe

    flat: list[Method] = []
    for m in methods:
        flat.extend(parse_recipe(m) if isinstance(m, str) else [m])
    recipe = tuple(sorted(flat, key=lambda m: m.stage))
    check(pipe, *recipe)
    family = family_for(pipe)
    ctx = ApplyContext(family, recipe, None)
    try:
        for m in recipe:
            if ctx.events is None and m.stage >= Stage.CACHE and any(x.uses_events for x in recipe):
                ctx.events = CallEvents.install(pipe, ctx)  # after the scheduler stages: it wraps their result
            m.apply(pipe, ctx)
    except BaseException:
        AccelerationHandle(pipe, recipe, ctx).remove()
        raise
    return AccelerationHandle(pipe, recipe, ctx)


def call_parameters(pipe: Any) -> set[str]:
    return set(inspect.signature(pipe.__call__).parameters)
