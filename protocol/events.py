"""`CallEvents`: a transparent scheduler proxy that tells methods when a generation starts and when a step ends.

Every diffusers pipeline calls ``scheduler.set_timesteps`` once at the start of a generation and
``scheduler.step`` once per loop iteration, right before its own step-end callback. So, with no change to the
pipeline or its call:

* ``set_timesteps`` runs the *call-start* handlers first — resetting every stateful hook on the pipeline's modules
  (caches, patch parallelism), which `cached_call` used to do around each call;
* ``step`` remembers the first step's input sample (the initial latents, already scaled by
  ``init_noise_sigma``) and passes each step's ``prev_sample`` through the *step-end* handlers (prior noise
  injection), exactly where a ``callback_on_step_end`` would see it.

Attribute reads and writes go to the wrapped scheduler, and ``step`` keeps its signature (pipelines inspect it
for ``eta`` / ``generator``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from ..core.hooks import reset_caches

StepEnd = Callable[[torch.Tensor, Any, int], torch.Tensor]


class CallEvents:
    """Wraps `pipe.scheduler`; `install` puts it in place and registers its removal with the apply context."""

    def __init__(self, scheduler: Any, pipe: Any) -> None:
        d = self.__dict__
        d["wrapped_scheduler"] = scheduler
        d["call_start"] = [lambda: reset_caches(pipe)]
        d["step_end"] = []
        d["calls"] = 0
        d["step_index"] = 0
        d["first_sample"] = None

        def set_timesteps(*args: Any, **kwargs: Any) -> Any:
            d["calls"] += 1
            d["step_index"] = 0
            d["first_sample"] = None
            for fn in d["call_start"]:
                fn()
            return scheduler.set_timesteps(*args, **kwargs)

        def step(model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any,
                 return_dict: bool = True, **kwargs: Any) -> Any:
            if d["step_index"] == 0:
                d["first_sample"] = sample
            out = scheduler.step(model_output, timestep, sample, *args, return_dict=return_dict, **kwargs)
            if d["step_end"]:
                prev = out.prev_sample if return_dict else out[0]
                for fn in d["step_end"]:
                    prev = fn(prev, timestep, d["step_index"])
                if return_dict:
                    out.prev_sample = prev
                else:
                    out = (prev, *out[1:])
            d["step_index"] += 1
            return out

        set_timesteps.__signature__ = inspect.signature(scheduler.set_timesteps)
        step.__signature__ = inspect.signature(scheduler.step)
        d["set_timesteps"] = set_timesteps
        d["step"] = step

    @classmethod
    def install(cls, pipe: Any, ctx: Any) -> CallEvents:
        events = cls(pipe.scheduler, pipe)
        original = pipe.scheduler
        pipe.scheduler = events

        def restore() -> None:
            reset_caches(pipe)
            pipe.scheduler = original

        ctx.on_remove(restore)
        return events

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["wrapped_scheduler"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.__dict__["wrapped_scheduler"], name, value)

    def __len__(self) -> int:
        return len(self.__dict__["wrapped_scheduler"])

    def __repr__(self) -> str:
        return f"CallEvents({self.__dict__['wrapped_scheduler']!r})"
