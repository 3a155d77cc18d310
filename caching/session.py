"""`cached_call` / `CachedPipeline`: run a pipeline call inside a cache session with the hooks' call set-up.

Kept for scripts written before `diffaccel.accelerate`: after `accelerate(pipe, ...)` a plain ``pipe(...)`` call
already resets caches per generation and injects prior noise, so neither helper is needed there.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from ..core.hooks import cache_session, find_denoiser, iter_stateful_hooks


def cached_call(pipe: Any, **call_kwargs: Any) -> Any:
    """Run ``pipe(**call_kwargs)`` inside `cache_session`, letting the denoiser's toolkit hooks adjust the call
    (e.g. encoder propagation's prior noise injection, which needs the initial latents and a step-end callback)."""
    denoiser = find_denoiser(pipe)
    with cache_session(pipe):
        for hook in iter_stateful_hooks(denoiser):
            call_kwargs = hook.prepare_call(pipe, dict(call_kwargs))
        return pipe(**call_kwargs)


class CachedPipeline:
    """A pipeline whose every call runs through `cached_call` (reset around it, toolkit hooks' call set-up).

    It keeps the wrapped pipeline's call signature for introspection and forwards attribute access, so harnesses
    that call ``pipe(prompts, generator=..., ...)`` (e.g. `diffaccel.evals.evaluate`) get cached calls unchanged.
    """

    def __init__(self, pipe: Any) -> None:
        self.pipeline = pipe
        signature = inspect.signature(pipe.__call__)

        def call(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind_partial(*args, **kwargs).arguments
            extra = {}
            for name, param in signature.parameters.items():
                if param.kind is inspect.Parameter.VAR_KEYWORD and name in bound:
                    extra = bound.pop(name)
            return cached_call(self.pipeline, **bound, **extra)

        functools.update_wrapper(call, pipe.__call__)
        self.__call__ = call  # instance attribute: what `inspect.signature(obj.__call__)` reads

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__dict__["__call__"](*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if "pipeline" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["pipeline"], name)
