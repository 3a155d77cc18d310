"""HarmoniCa's router: learnable per-step, per-unit logits whose thresholded sigmoid is a `CachePlan` (paper §4.1);
trained by `caching.harmonica_train`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...core.errors import InputError
from ...core.families import find_denoiser
from ...core.files import atomic_save
from ...core.schedulers import class_name as sched_name
from .plan import DEFAULT_THRESHOLD, ROUTER_FORMAT, CachePlan, _check_size, default_units, num_blocks, unit_modules

# ----------------------------------------------------------------------------------------------------------------------
# router


class Router(nn.Module):
    """Learnable per-step, per-unit logits Θ [steps, units]; r = sigmoid(Θ) ≈ 1 computes, ≈ 0 reuses (HarmoniCa,
    after Learning-to-Cache, Ma et al. NeurIPS 2024).

    Row 0 is the constant `first_logit` (5.0, sigmoid ≈ 0.9933, as in the released code) and not trainable; rows
    1..N-1 are separate parameters initialised from N(0, init_std²) so that an optimiser skips rows without a
    gradient. `clamp_()` keeps Θ in [-clamp, clamp] after each update.
    """

    def __init__(self, num_steps: int, num_units: int, *, model_class: str | None = None,
                 num_blocks: int | None = None, units: Sequence[str] | None = None,
                 scheduler_class: str | None = None, init_std: float = 1.0, first_logit: float = 5.0,
                 clamp: float = 5.0, seed: int = 0) -> None:
        super().__init__()
        _check_size(num_steps, num_units)
        if num_steps < 2:
            raise InputError("a router needs at least 2 steps (row 0 always computes)")
        self.num_steps, self.num_units = num_steps, num_units
        self.model_class, self.num_blocks = model_class, num_blocks
        self.units = tuple(units) if units is not None else None
        self.scheduler_class = scheduler_class
        self.first_logit, self.clamp = float(first_logit), float(clamp)
        g = torch.Generator().manual_seed(seed)
        self.rows = nn.ParameterList(
            [nn.Parameter(torch.randn(num_units, generator=g) * init_std) for _ in range(num_steps - 1)])
        self.register_buffer("first", torch.full((num_units,), self.first_logit), persistent=False)

    @classmethod
    def for_model(cls, model: Any, num_steps: int, **kwargs: Any) -> Router:
        """A router shaped for a transformer (or a pipeline's transformer and scheduler)."""
        transformer = find_denoiser(model)
        units = default_units(transformer)
        scheduler = getattr(model, "scheduler", None)
        return cls(num_steps, len(unit_modules(transformer)),
                   model_class=type(transformer).__name__, num_blocks=num_blocks(transformer),
                   units=units, scheduler_class=None if scheduler is None else sched_name(scheduler), **kwargs)

    @property
    def logits(self) -> torch.Tensor:
        """Θ as one [steps, units] tensor (differentiable w.r.t. rows 1..N-1)."""
        return torch.cat([self.first[None], torch.stack(list(self.rows))])

    def row_scores(self, step: int) -> torch.Tensor:
        """sigmoid(Θ[step]) — differentiable for step >= 1."""
        return torch.sigmoid(self.first if step == 0 else self.rows[step - 1])

    def scores(self) -> torch.Tensor:
        return torch.sigmoid(self.logits)

    def forward(self) -> torch.Tensor:  # noqa: D102
        return self.scores()

    @torch.no_grad()
    def clamp_(self) -> None:
        for p in self.rows:
            p.clamp_(-self.clamp, self.clamp)

    def to_plan(self, threshold: float = DEFAULT_THRESHOLD) -> CachePlan:
        """Binary plan `P = sigmoid(Θ) > threshold`, row 0 forced to compute."""
        if not 0.0 < threshold < 1.0:
            raise InputError(f"threshold must be in (0, 1), got {threshold}")
        with torch.no_grad():
            mask = self.scores() > threshold
        mask[0] = True
        return CachePlan(mask, self.model_class, self.num_blocks, self.units, self.scheduler_class,
                         {"kind": "harmonica", "threshold": str(threshold)})

    @classmethod
    def from_released(cls, state_dict: dict[str, torch.Tensor], model: Any | None = None, **kwargs: Any) -> Router:
        """Import a router saved by the released HarmoniCa / Learning-to-Cache DiT code.

        Those store one `prob` logit vector (2 * depth entries) per step in a ModuleList indexed by the *respaced
        diffusion index*, the reverse of execution order: execution step s is stored router N - 1 - s. Keys are
        matched as `<...>.<i>.prob`. The imported row 0 is replaced by the fixed first row (it always computes).
        """
        import re

        rows: dict[int, torch.Tensor] = {}
        for key, value in state_dict.items():
            m = re.search(r"(?:^|\.)(\d+)\.prob$", key)
            if m:
                rows[int(m.group(1))] = torch.as_tensor(value).detach().float().reshape(-1)
        if not rows or sorted(rows) != list(range(len(rows))):
            raise InputError(f"expected router keys '<i>.prob' for i = 0..N-1, got {sorted(state_dict)[:6]}...")
        n = len(rows)
        units = {v.numel() for v in rows.values()}
        if len(units) != 1:
            raise InputError(f"released router rows have different lengths {sorted(units)}")
        router = cls.for_model(model, n, **kwargs) if model is not None else cls(n, units.pop(), **kwargs)
        if router.num_units != rows[0].numel():
            raise InputError(f"released router has {rows[0].numel()} units per step but the model has "
                             f"{router.num_units}")
        with torch.no_grad():
            for s in range(1, n):
                router.rows[s - 1].copy_(rows[n - 1 - s])
        return router

    def _header(self) -> dict[str, str]:
        return {"format": ROUTER_FORMAT, "num_steps": str(self.num_steps), "num_units": str(self.num_units),
                "model_class": self.model_class or "", "num_blocks": str(self.num_blocks or ""),
                "units": ",".join(self.units or ()), "scheduler_class": self.scheduler_class or "",
                "first_logit": repr(self.first_logit), "clamp": repr(self.clamp)}

    def save(self, path: str | os.PathLike) -> Path:
        """Write Θ [steps, units] (float32) and the layout as safetensors, atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        logits = self.logits.detach().float().contiguous()
        atomic_save(path, lambda tmp: save_file({"logits": logits}, str(tmp), metadata=self._header()))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Router:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            h = f.metadata() or {}
            if h.get("format") != ROUTER_FORMAT:
                raise InputError(f"{path} is not a diffaccel router (format {h.get('format')!r})")
            logits = f.get_tensor("logits")
        router = cls(int(h["num_steps"]), int(h["num_units"]), model_class=h.get("model_class") or None,
                     num_blocks=int(h["num_blocks"]) if h.get("num_blocks") else None,
                     units=tuple(h["units"].split(",")) if h.get("units") else None,
                     scheduler_class=h.get("scheduler_class") or None, first_logit=float(h["first_logit"]),
                     clamp=float(h["clamp"]))
        with torch.no_grad():
            for s, p in enumerate(router.rows, start=1):
                p.copy_(logits[s])
        return router
