"""Feature caching for diffusers denoisers, as `diffusers.hooks` on the stock models (caching/README.md).

* Encoder propagation (Li et al., "Faster Diffusion", NeurIPS 2024) for UNet2DModel / UNet2DConditionModel:
  `apply_encoder_propagation(unet_or_pipe, EncoderPropagationConfig(...))`, `remove_encoder_propagation(...)`.
* Branch reuse (diffaccel) for UNets: binary [steps x units] plans reusing skip branches at any depth, with
  DeepCache's rule and encoder propagation as special cases: `apply_branch_reuse(unet_or_pipe, plan)`.
* HarmoniCa (Huang et al., ICML 2025) for DiTTransformer2DModel / PixArtTransformer2DModel: binary `CachePlan`s
  (learned by a `Router`, or FORA / random baselines) applied with `apply_cache_plan(transformer_or_pipe, plan)`,
  `remove_cache_plan(...)`; routers are trained by `caching.harmonica_train` / `diffaccel cache train-router`.
* Shared machinery (step tracking, per-generation reset, batch helpers): `core.hooks`;
  `cache_session(pipe)` / `cached_call(pipe, **kwargs)` reset caches around a call.
"""

from ..core.hooks import StatefulHook, StepTracker, cache_session, reset_caches
from .branch_reuse import (
    BranchReusePlan,
    apply_branch_reuse,
    branch_plan,
    branch_reuse_counters,
    deepcache_plan,
    encoder_propagation_plan,
    no_reuse_plan,
    remove_branch_reuse,
    shipped_unet_plans,
)
from .diffusers_caches import apply_diffusers_cache, remove_diffusers_cache
from .encoder_propagation import (
    CONTROLNET_HOOK,
    DENOISER_HOOK,
    ENCODER_HOOK,
    EncoderPropagationConfig,
    EncoderPropagationCounters,
    NoiseInjection,
    PriorNoiseInjection,
    apply_encoder_propagation,
    encoder_propagation_counters,
    last_noise_injection,
    remove_encoder_propagation,
    sample_initial_noise,
)
from .harmonica import (
    CachePlan,
    CachePlanCounters,
    Router,
    apply_cache_plan,
    cache_plan_counters,
    fora_plan,
    random_plan,
    remove_cache_plan,
    shipped_plans,
)
from .key_steps import (
    SD50_KEY_STEPS,
    KeyStepSchedule,
    explicit,
    flops_ratio_limit,
    get_schedule,
    measure_encoder_drift,
    schedule_from_drift,
    sd50,
    sd50_scaled,
    uniform,
)
from .session import CachedPipeline, cached_call

__all__ = [
    "apply_diffusers_cache",
    "remove_diffusers_cache",
    "BranchReusePlan",
    "apply_branch_reuse",
    "branch_plan",
    "branch_reuse_counters",
    "deepcache_plan",
    "encoder_propagation_plan",
    "no_reuse_plan",
    "remove_branch_reuse",
    "shipped_unet_plans",
    "CachePlan",
    "CachePlanCounters",
    "Router",
    "apply_cache_plan",
    "cache_plan_counters",
    "fora_plan",
    "random_plan",
    "remove_cache_plan",
    "shipped_plans",
    "CONTROLNET_HOOK",
    "CachedPipeline",
    "DENOISER_HOOK",
    "ENCODER_HOOK",
    "SD50_KEY_STEPS",
    "EncoderPropagationConfig",
    "EncoderPropagationCounters",
    "KeyStepSchedule",
    "NoiseInjection",
    "PriorNoiseInjection",
    "StepTracker",
    "StatefulHook",
    "apply_encoder_propagation",
    "cache_session",
    "cached_call",
    "encoder_propagation_counters",
    "explicit",
    "flops_ratio_limit",
    "get_schedule",
    "last_noise_injection",
    "measure_encoder_drift",
    "remove_encoder_propagation",
    "reset_caches",
    "sample_initial_noise",
    "schedule_from_drift",
    "sd50",
    "sd50_scaled",
    "uniform",
]
