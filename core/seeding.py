"""Seeding: one place that turns a seed into generators, so baseline and accelerated runs see the same noise."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch; optionally ask torch for deterministic kernels (CPU training)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def make_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch.Generator seeded with `seed`.

    Noise is drawn on the CPU by default (diffusers' `randn_tensor` moves it to the model's device), so a seed
    gives the same initial latents on CPU and CUDA.
    """
    return torch.Generator(device=device).manual_seed(int(seed))


def make_generators(seed: int, n: int, device: str | torch.device = "cpu") -> list[torch.Generator]:
    """One generator per image (seed, seed+1, ...): image i is the same whatever the batch size."""
    return [make_generator(seed + i, device) for i in range(n)]
