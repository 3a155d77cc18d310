"""diffusers' own caches on every diffusers transformer, including those whose pipelines set no cache context.

diffusers ships FirstBlockCache (after ParaAttention's first-block cache / TeaCache's residual test), TaylorSeer
(Liu et al. 2025, *From Reusing to Forecasting*), MagCache (Ma et al. 2025, magnitude-ratio skipping), Pyramid
Attention Broadcast and FasterCache as hooks that read a *cache context* (`CacheMixin.cache_context`), which the
pipelines of the newer models (Flux, SD3, ...) open around every denoiser call. `DiTPipeline` and
`PixArtAlphaPipeline` open none and their transformers have no `enable_cache`, so those caches cannot be used on
them as shipped (`ValueError: No cache context is set`).

`apply_diffusers_cache(pipe, config)` makes them usable everywhere: on a `CacheMixin` model it is
`enable_cache(config)`; on any other transformer it applies the same diffusers hook function to the model and adds
one outer hook that opens the cache context ``"cond"`` around each denoiser call (one batched call per step: the
classifier-free guidance rows travel together, as in DiT's and PixArt's pipelines). A new generation is noticed
from the timestep (`core.hooks.StepTracker`) and resets the diffusers hooks' state, so consecutive ``pipe(...)``
calls are independent. `remove_diffusers_cache` restores the model.
"""

from __future__ import annotations

from typing import Any

import torch

from ..core.errors import InputError
from ..core.families import find_denoiser
from ..core.hooks import (
    StatefulHook,
    StepTracker,
    get_argument,
    get_hook,
    input_signature,
    register_hook,
    remove_hooks,
)

CONTEXT_HOOK = "diffaccel.diffusers_cache.context"


def _appliers() -> dict[type, Any]:
    from diffusers.hooks import (
        FasterCacheConfig,
        FirstBlockCacheConfig,
        MagCacheConfig,
        PyramidAttentionBroadcastConfig,
        TaylorSeerCacheConfig,
        apply_faster_cache,
        apply_first_block_cache,
        apply_mag_cache,
        apply_pyramid_attention_broadcast,
        apply_taylorseer_cache,
    )

    return {FirstBlockCacheConfig: apply_first_block_cache, TaylorSeerCacheConfig: apply_taylorseer_cache,
            MagCacheConfig: apply_mag_cache, PyramidAttentionBroadcastConfig: apply_pyramid_attention_broadcast,
            FasterCacheConfig: apply_faster_cache}


def _diffusers_hook_names() -> tuple[str, ...]:
    from diffusers.hooks.faster_cache import _FASTER_CACHE_BLOCK_HOOK, _FASTER_CACHE_DENOISER_HOOK
    from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK
    from diffusers.hooks.mag_cache import _MAG_CACHE_BLOCK_HOOK, _MAG_CACHE_LEADER_BLOCK_HOOK
    from diffusers.hooks.pyramid_attention_broadcast import _PYRAMID_ATTENTION_BROADCAST_HOOK
    from diffusers.hooks.taylorseer_cache import _TAYLORSEER_CACHE_HOOK

    return (_FASTER_CACHE_BLOCK_HOOK, _FASTER_CACHE_DENOISER_HOOK, _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK,
            _MAG_CACHE_BLOCK_HOOK, _MAG_CACHE_LEADER_BLOCK_HOOK, _PYRAMID_ATTENTION_BROADCAST_HOOK,
            _TAYLORSEER_CACHE_HOOK)


def _reset_diffusers_state(model: torch.nn.Module) -> None:
    from diffusers.hooks import HookRegistry

    HookRegistry.check_if_exists_or_initialize(model).reset_stateful_hooks(recurse=True)


class _ContextHook(StatefulHook):
    """Opens diffusers' cache context around each call of a transformer that has no `CacheMixin` (the outermost
    hook); resets the diffusers hooks' state when a new generation starts."""

    _is_stateful = False  # diffusers' context setter looks for StateManagers on stateful hooks only

    def __init__(self, name: str = "cond") -> None:
        super().__init__()
        self.name = name
        self.tracker = StepTracker()
        self.tracker.on_new_generation = None

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        timestep = get_argument(args, kwargs, "timestep", 1)
        sample = args[0] if args else next(iter(kwargs.values()), None)
        if timestep is not None and self.tracker.observe(timestep, input_signature(sample)) \
                and self.tracker.step == 0:
            _reset_diffusers_state(module)
        _set_cache_context(module, CacheContext(self.name))
        try:
            return self.fn_ref.original_forward(*args, **kwargs)
        finally:
            _set_cache_context(module, None)

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.tracker.reset()
        return module


def apply_diffusers_cache(pipe_or_model: Any, config: Any) -> None:
    """Attach one of diffusers' cache configs (`FirstBlockCacheConfig`, `TaylorSeerCacheConfig`, `MagCacheConfig`,
    `PyramidAttentionBroadcastConfig`, `FasterCacheConfig`) to a pipeline's denoiser, whatever its pipeline."""
    from diffusers.hooks import HookRegistry
    from diffusers.models.cache_utils import CacheMixin

    model = find_denoiser(pipe_or_model)
    appliers = _appliers()
    apply = appliers.get(type(config))
    if apply is None:
        raise InputError(f"unknown diffusers cache config {type(config).__name__}; expected one of "
                         f"{', '.join(c.__name__ for c in appliers)}")
    if isinstance(model, CacheMixin):
        model.enable_cache(config)
        return
    if get_hook(model, CONTEXT_HOOK) is not None:
        raise InputError(f"a diffusers cache is already applied to {type(model).__name__}; remove it first")
    blocks = getattr(model, "transformer_blocks", None)
    if not isinstance(blocks, torch.nn.ModuleList) or len(blocks) == 0:
        raise InputError(f"diffusers' caches hook transformer blocks; {type(model).__name__} has no "
                         "`transformer_blocks` (UNets: use encoder propagation or branch reuse)")
    apply(model, config)
    register_hook(model, _ContextHook(), CONTEXT_HOOK)
    HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()


def remove_diffusers_cache(pipe_or_model: Any) -> None:
    """Undo `apply_diffusers_cache`; the model's forward is its class's again."""
    from diffusers.models.cache_utils import CacheMixin

    model = find_denoiser(pipe_or_model)
    if isinstance(model, CacheMixin):
        if model.is_cache_enabled:
            model.disable_cache()
        return
    if get_hook(model, CONTEXT_HOOK) is None:
        raise InputError(f"no diffusers cache is applied to {type(model).__name__}")
    remove_hooks(model, (CONTEXT_HOOK, *_diffusers_hook_names()))


@torch.no_grad()
def calibrate_mag_ratios(pipe: Any, num_inference_steps: int, **call_kwargs: Any) -> list[float]:
    """MagCache's per-step magnitude ratios from one calibration generation (`MagCacheConfig(calibrate=True)`),
    as diffusers documents; `call_kwargs` are the pipeline call's (conditioning, guidance, generator: use seeds
    disjoint from the ones you evaluate on)."""
    import contextlib
    import io

    from diffusers import MagCacheConfig
    from diffusers.hooks.mag_cache import _MAG_CACHE_LEADER_BLOCK_HOOK

    model = find_denoiser(pipe)
    apply_diffusers_cache(pipe, MagCacheConfig(calibrate=True, num_inference_steps=num_inference_steps))
    try:
        hook = None
        for _, sub in model.named_modules():
            registry = sub.__dict__.get("_diffusers_hook")
            if registry is not None and registry.get_hook(_MAG_CACHE_LEADER_BLOCK_HOOK) is not None:
                hook = registry.get_hook(_MAG_CACHE_LEADER_BLOCK_HOOK)
                break
        ratios: list[float] = []
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            pipe(num_inference_steps=num_inference_steps, output_type="latent", **call_kwargs)
        text = printed.getvalue()
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("[") and line.endswith("]"):
                ratios = [float(v) for v in line.strip("[]").split(",") if v.strip()]
        if len(ratios) != num_inference_steps:
            raise InputError(f"MagCache calibration printed {len(ratios)} ratios for {num_inference_steps} steps "
                             f"(hook found: {hook is not None})")
        return ratios
    finally:
        remove_diffusers_cache(pipe)
