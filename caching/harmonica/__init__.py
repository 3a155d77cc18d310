"""HarmoniCa learned unit caching for diffusers DiT / PixArt transformers, as `diffusers.hooks`.

Huang et al., "HarmoniCa: Harmonizing Training and Inference for Better Feature Caching in Diffusion Transformer
Acceleration", ICML 2025 (arXiv 2410.01723). Split by responsibility:

* `plan` — the unit layout, `CachePlan` (binary [steps, units], 1 = compute, row 0 always computes; the
  cache-usage ratio is the share of zeros), plan files, the shipped plans, FORA (Selvaraju et al. 2024) and random
  baselines;
* `router` — `Router`: learnable logits Θ [steps, units], ``P[s, u] = 1[sigmoid(Θ[s, u]) > τ]`` with τ = 0.1
  (paper §4.1 / released defaults), trained by `caching.harmonica_train` (Step-wise Denoising Training +
  Image-Error-Proxy-guided objective);
* `engine` — the hooks that follow a plan, and the soft forward of router training (`CacheMode`);
* `cost` — per-unit FLOPs and a plan's FLOPs ratio.
"""

from .cost import example_inputs, plan_flops_ratio, unit_flops
from .engine import (
    CacheMode,
    CachePlanCounters,
    GateFn,
    apply_cache_plan,
    attach_router,
    attached_plan,
    cache_plan_counters,
    check_plan,
    remove_cache_plan,
)
from .plan import (
    DEFAULT_THRESHOLD,
    DEFAULT_UNITS,
    HOOK_NAMES,
    OUTPUT_HOOK,
    PLAN_FORMAT,
    PLANS_DIR,
    ROUTER_FORMAT,
    STEP_HOOK,
    UNIT_HOOK,
    CachePlan,
    default_units,
    fora_plan,
    random_plan,
    resample_plan,
    shipped_plans,
    unit_modules,
)
from .router import Router

__all__ = [
    "DEFAULT_THRESHOLD",
    "DEFAULT_UNITS",
    "HOOK_NAMES",
    "OUTPUT_HOOK",
    "PLANS_DIR",
    "PLAN_FORMAT",
    "ROUTER_FORMAT",
    "STEP_HOOK",
    "UNIT_HOOK",
    "CacheMode",
    "CachePlan",
    "CachePlanCounters",
    "GateFn",
    "Router",
    "apply_cache_plan",
    "attach_router",
    "attached_plan",
    "cache_plan_counters",
    "check_plan",
    "default_units",
    "example_inputs",
    "fora_plan",
    "plan_flops_ratio",
    "random_plan",
    "remove_cache_plan",
    "resample_plan",
    "shipped_plans",
    "unit_flops",
    "unit_modules",
]
