"""Methods that change the denoiser or how it is run: `PatchParallel` and `OneStep`.

* `PatchParallel` splits every denoiser call over the ranks of the default process group (DistriFusion, Li et al.
  CVPR 2024; PCPP; `parallel/`). Collective: apply the same recipe on every rank. With no process group it changes
  nothing (one device is the exact path).
* `OneStep` swaps in a distilled one-step student's denoiser and scheduler (InstaFlow, Liu et al. ICLR 2024,
  2-rectified flow + distillation; `distill/`), keeping the teacher pipeline's text encoders, VAE and call
  signature: on Stable Diffusion the student's velocity UNet and Euler scheduler (a `RectifiedFlowPipeline`), on
  Flux the student's transformer (a `FluxPipeline` run with one step). The student runs without classifier-free
  guidance (its teacher's guidance is distilled in): when the pipeline batches a CFG call, only the conditional rows
  are evaluated and handed back for both halves; when it makes a separate unconditional call (Flux's true CFG), that
  call returns the same step's conditional output. Either way ``uncond + w·(cond − uncond)`` is exactly the
  conditional output and the result equals the student's own pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from diffusers.hooks.hooks import BaseState, StateManager

from ..core.families import PipelineFamily
from ..core.hooks import StatefulHook, get_argument, register_hook, remove_hooks, set_argument
from .base import ApplyContext, CompositionError, Method, Stage

_PARALLEL_KEYS = {"warmup": "warmup_steps", "gn": "gn_mode", "pcpp": "pcpp_fraction", "cfg": "cfg_parallel",
                  "halo": "halo_transport", "timeout": "timeout_s"}


@dataclass(frozen=True)
class PatchParallel(Method, name="patch-parallel", aliases=("pp",), slot="parallel", stage=Stage.PARALLEL):
    """Patch parallelism: `mode` "sync" (exact), "displaced" (DistriFusion) or "pcpp"; the other fields are
    `parallel.PatchParallelConfig`'s."""

    mode: str = "displaced"
    warmup_steps: int = 4
    gn_mode: str = "corrected"
    pcpp_fraction: float = 0.3
    cfg_parallel: bool = False
    halo_transport: str = "p2p"
    timeout_s: float = 300.0

    def config(self) -> Any:
        from ..parallel import PatchParallelConfig

        return PatchParallelConfig(**{f.name: getattr(self, f.name) for f in fields(self)})

    def __post_init__(self) -> None:
        self.config()  # validates

    def args(self) -> list[str]:
        default = PatchParallel()
        out = [self.mode]
        for short, key in _PARALLEL_KEYS.items():
            if getattr(self, key) != getattr(default, key):
                value = getattr(self, key)
                out.append(short if value is True else f"{short}={value:g}" if isinstance(value, float)
                           else f"{short}={value}")
        return out

    @classmethod
    def from_args(cls, name: str, at: int | None, args: list[str]) -> PatchParallel:
        kw: dict[str, Any] = {}
        types = {f.name: f.type for f in fields(cls)}
        for a in args:
            key, eq, value = a.partition("=")
            if not eq and a in _PARALLEL_KEYS and types[_PARALLEL_KEYS[a]] == "bool":
                kw[_PARALLEL_KEYS[a]] = True
            elif not eq:
                kw["mode"] = a
            elif key in _PARALLEL_KEYS:
                field = _PARALLEL_KEYS[key]
                kind = types[field]
                kw[field] = int(value) if kind == "int" else float(value) if kind == "float" else \
                    value in ("1", "true", "on") if kind == "bool" else value
            else:
                raise ValueError(f"{name}: unknown argument {key!r}; expected a mode and {', '.join(_PARALLEL_KEYS)}")
        return cls(**kw)

    def conflicts(self, other: Method) -> str | None:
        if other.name == "fbc":
            return ("fbc decides from each rank's own band of the first block's residual, so the ranks can disagree: "
                    "one would skip the blocks whose exchange the other waits in (use a step-scheduled cache: fora, "
                    "harmonica, taylorseer, magcache)")
        if self.mode == "sync":
            return None  # exact: every layer sees fresh activations, whatever else skips or reorders them
        if other.slot == "cache":
            return (f"{self.mode} patches reuse each layer's activations from the previous call; a cache that skips "
                    "layers would leave them from an older step (use patch-parallel:sync with a cache)")
        if other.name == "fk":
            return (f"{self.mode} patches keep per-row activations from the previous call; FK resampling reorders "
                    "the rows (use patch-parallel:sync with FK)")
        return None

    def check(self, pipe: Any, family: PipelineFamily, recipe: Sequence[Method]) -> None:
        """The denoiser must be one patch parallelism has rules for (every layer type known), and cfg_parallel
        needs a pipeline that batches guidance; checked without a process group, before anything changes."""
        from ..parallel import PatchParallelError
        from ..parallel.parallelize import check_support

        try:
            check_support(pipe, self.config())
        except PatchParallelError as exc:
            raise CompositionError(f"{self}: {exc}") from exc

    def apply(self, pipe: Any, ctx: ApplyContext) -> None:
        from ..parallel import parallelize

        handle = parallelize(pipe, self.config())
        ctx.on_remove(handle.remove)
        ctx.notes.append(f"{self}: {handle.comm_report().get('world_size', 1)} rank(s)")


ONE_STEP_HOOK = "diffaccel.one_step.conditional_rows"
#: pipeline family -> the family of the students that replace its denoiser
STUDENT_FAMILIES = {"sd": "rf", "flux": "flux"}


class _ConditionalRowsHook(StatefulHook):
    """On the student UNet: in a CFG-batched call ([unconditional; conditional] rows) run only the conditional
    half and return it for both halves (the student is distilled without guidance)."""

    def __init__(self, pipe: Any) -> None:
        super().__init__()
        self.pipe = pipe

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        forward = self.fn_ref.original_forward
        if not getattr(self.pipe, "do_classifier_free_guidance", False):
            return forward(*args, **kwargs)
        sample = get_argument(args, kwargs, "sample", 0)
        embeds = get_argument(args, kwargs, "encoder_hidden_states", 2)
        half = sample.shape[0] // 2
        args, kwargs = set_argument(args, kwargs, "sample", 0, sample[half:])
        if embeds is not None:
            args, kwargs = set_argument(args, kwargs, "encoder_hidden_states", 2, embeds[half:])
        out = forward(*args, **kwargs)
        if isinstance(out, tuple):
            return (torch.cat([out[0], out[0]]), *out[1:])
        out.sample = torch.cat([out.sample, out.sample])
        return out


class _NoState(BaseState):
    def reset(self) -> None:
        return None


class _ConditionalCallHook(StatefulHook):
    """On a flow student: the pipeline's unconditional call of a step (diffusers' "uncond" cache context, which
    FluxPipeline's true CFG opens) returns that step's conditional output instead of running the student."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = StateManager(_NoState)  # diffusers sets the pipeline's cache context on it
        self.cond_output: Any = None

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        try:
            name = self.calls.context.name
        except ValueError:  # no cache context: a plain call
            name = None
        if name == "uncond" and self.cond_output is not None:
            return self.cond_output
        out = self.fn_ref.original_forward(*args, **kwargs)
        self.cond_output = out if name == "cond" else None
        return out

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.cond_output = None
        return module


def _same_module(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Same class, same config (apart from where it was loaded from) and identical weights."""
    if type(a) is not type(b):
        return False
    ca, cb = ({} if m.config is None else m.config.to_dict() if hasattr(m.config, "to_dict") else dict(m.config)
              for m in (a, b))
    for c in (ca, cb):
        c.pop("_name_or_path", None)
    if ca != cb:
        return False
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k].to(sa[k].device)) for k in sa)


@dataclass(frozen=True)
class OneStep(Method, name="one-step", aliases=("onestep",), slot="model", stage=Stage.MODEL):
    """The distilled student `student` (a zoo entry or a saved `RectifiedFlowPipeline` folder) in place of the
    teacher's UNet and scheduler; one Euler step by default."""

    student: str = "digits-sd-onestep"

    @property
    def num_inference_steps(self) -> int | None:
        return 1

    def args(self) -> list[str]:
        return [self.student]

    @classmethod
    def from_args(cls, name: str, at: int | None, args: list[str]) -> OneStep:
        if at is not None or len(args) > 1:
            raise ValueError(f"{name} takes one student (a zoo entry or folder), e.g. one-step:digits-sd-onestep")
        return cls(*args)

    def conflicts(self, other: Method) -> str | None:
        if other.slot in ("sampler", "time-shift"):
            return "the student integrates its own single Euler step (its scheduler replaces the sampler)"
        if other.slot == "cache":
            return "a one-step generation calls the denoiser once: there is nothing to reuse"
        if other.name == "fk":
            return "FK resamples between steps; a one-step generation has no intermediate step (use best-of-n)"
        return None

    def check(self, pipe: Any, family: PipelineFamily, recipe: Sequence[Method]) -> None:
        from ..core.families import FAMILIES

        if family.name not in STUDENT_FAMILIES:
            raise CompositionError(f"{self} replaces the denoiser of a Stable Diffusion or Flux pipeline; "
                                   f"{type(pipe).__name__} is the {family.name!r} family")
        kind, wanted = self.student_class(), FAMILIES[STUDENT_FAMILIES[family.name]].pipeline_classes
        if kind is not None and kind not in wanted:
            raise CompositionError(f"{self}: the student is a {kind}; a {type(pipe).__name__} takes a "
                                   f"{' or '.join(wanted)} student of its own teacher")

    def student_class(self) -> str | None:
        """The student's pipeline class, read without loading it (zoo registry or model_index.json); None if
        unknown (then loading reports what is wrong)."""
        import json
        from pathlib import Path

        from ..zoo.registry import ENTRIES

        if self.student in ENTRIES:
            return ENTRIES[self.student].kind
        index = Path(self.student) / "model_index.json"
        try:
            return str(json.loads(index.read_text())["_class_name"])
        except (OSError, ValueError, KeyError):
            return None

    def load(self) -> Any:
        from ..distill.teachers import load_pipeline

        return load_pipeline(self.student)

    def apply(self, pipe: Any, ctx: ApplyContext) -> None:
        from ..core.families import family_for

        family = ctx.family
        student = self.load()
        theirs = family_for(student)
        if theirs.name != STUDENT_FAMILIES[family.name]:
            raise CompositionError(f"{self}: the student is a {type(student).__name__}; a {type(pipe).__name__} "
                                   f"takes a {STUDENT_FAMILIES[family.name]!r}-family student")
        attr = family.denoiser_attr
        for part, mine in pipe.components.items():
            if part == attr or not isinstance(mine, torch.nn.Module):
                continue
            other = getattr(student, part, None)
            if other is None or not _same_module(mine, other):
                raise CompositionError(f"{self}: the student's {part} differs from the pipeline's; a student "
                                       "shares its teacher's text encoders and VAE")
        denoiser, scheduler = getattr(pipe, attr), pipe.scheduler
        student_denoiser = theirs.denoiser.to(denoiser.device, denoiser.dtype)
        hook = _ConditionalRowsHook(pipe) if family.name == "sd" else _ConditionalCallHook()
        register_hook(student_denoiser, hook, ONE_STEP_HOOK)
        setattr(pipe, attr, student_denoiser)
        pipe.scheduler = type(student.scheduler).from_config(student.scheduler.config)

        def restore() -> None:
            remove_hooks(student_denoiser, [ONE_STEP_HOOK])
            setattr(pipe, attr, denoiser)
            pipe.scheduler = scheduler

        ctx.on_remove(restore)
