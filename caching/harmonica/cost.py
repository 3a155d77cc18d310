"""HarmoniCa cost model: per-unit FLOPs of a transformer call and the FLOPs ratio of a plan."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ...core.errors import InputError
from .plan import CachePlan, unit_modules

# ----------------------------------------------------------------------------------------------------------------------
# cost model


def example_inputs(transformer: nn.Module, batch: int = 2, height: int | None = None) -> dict[str, Any]:
    """Random inputs of one transformer call (DiT: class labels; PixArt: a 4-token caption embedding)."""
    cfg = transformer.config
    side = height if height is not None else cfg.sample_size
    g = torch.Generator().manual_seed(0)
    device, dtype = transformer.device, transformer.dtype
    x = torch.randn(batch, cfg.in_channels, side, side, generator=g).to(device, dtype)
    t = torch.full((batch,), 500, device=device)
    name = type(transformer).__name__
    if name == "DiTTransformer2DModel":
        return {"hidden_states": x, "timestep": t, "class_labels": torch.zeros(batch, dtype=torch.long, device=device)}
    if name == "PixArtTransformer2DModel":
        ehs = torch.randn(batch, 4, cfg.caption_channels, generator=g).to(device, dtype)
        return {"hidden_states": x, "timestep": t, "encoder_hidden_states": ehs,
                "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    raise TypeError(f"no example inputs for {name}")


@torch.no_grad()
def unit_flops(transformer: nn.Module, **inputs: Any) -> tuple[int, list[int]]:
    """FLOPs of one transformer call and of each unit within it (`core.flops.flop_counter`: matmuls, attention
    including the CPU attention kernel torch's counter has no formula for)."""
    from ...core.flops import flop_counter

    inputs = inputs or example_inputs(transformer)
    with flop_counter() as counter:
        transformer(**inputs)
    counts = counter.get_flop_counts()
    prefix = type(transformer).__name__
    per_unit = [int(sum(counts.get(f"{prefix}.{name}", {}).values())) for name, _ in unit_modules(transformer)]
    return int(counter.get_total_flops()), per_unit


def plan_flops_ratio(plan: CachePlan, total: int, per_unit: Sequence[int]) -> float:
    """Theoretical speed-up N * F / Σ_s (F - Σ_{u reused at s} F_u) of a plan given `unit_flops`' numbers."""
    if len(per_unit) != plan.num_units:
        raise InputError(f"{len(per_unit)} unit FLOP counts for a plan with {plan.num_units} units")
    saved = (~plan.mask).double() @ torch.tensor(per_unit, dtype=torch.float64)
    cost = plan.num_steps * total - float(saved.sum())
    return math.inf if cost <= 0 else plan.num_steps * total / cost
