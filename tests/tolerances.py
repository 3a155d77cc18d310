"""Float tolerances derived from the dtype and the size of the computation, never hand-picked.

Two computations of the same value that group their sums differently (another batch size, thread count, SIMD
width or CPU model changes how matmuls and convolutions are blocked) round differently. A sum of n terms of size
`magnitude` carries a rounding error of about ``eps * sqrt(n) * magnitude`` (rounding errors behave like a random
walk; Higham & Mary, "A new approach to probabilistic rounding error analysis", SIAM J. Sci. Comput. 2019), and a
chain of such reductions adds their errors. `safety` covers the tail of that distribution and the factor 2
between two independently rounded results. Real defects (a wrong pixel, a skipped step, a wrong coefficient) are
orders of magnitude larger than these bounds, so the tests stay able to fail.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def eps(dtype: torch.dtype = torch.float32) -> float:
    """Machine epsilon of `dtype` (float32: 1.19e-7, float64: 2.2e-16)."""
    return torch.finfo(dtype).eps


def roundoff_atol(dtype: torch.dtype, reductions: int | Sequence[int], magnitude: float = 1.0,
                  safety: float = 4.0) -> float:
    """Absolute tolerance between two orderings of one computation: ``safety * eps * magnitude * Σ sqrt(n_i)``.

    `reductions` lists the length of each sum on the path from inputs to the compared value (a conv layer
    contributes ``in_channels * kernel_area``, a linear layer its input width, a recurrence of T factors T).
    """
    lengths = [reductions] if isinstance(reductions, int) else list(reductions)
    if not lengths or min(lengths) < 1:
        raise ValueError(f"reductions must be positive lengths, got {reductions}")
    return safety * eps(dtype) * magnitude * sum(math.sqrt(n) for n in lengths)


def uint8_atol(float_atol: float, value_range: float = 1.0) -> int:
    """Levels two uint8 quantisations of float images may differ by when the floats differ by `float_atol`.

    Round-off smaller than one level can still move a value across a rounding boundary: one level, plus the
    levels the float difference itself spans.
    """
    return 1 + math.floor(float_atol / value_range * 255)


def reductions_of(module: torch.nn.Module) -> list[int]:
    """The reduction length of every linear, convolution and normalisation layer in `module`, in order.

    This over-counts parallel branches (they are summed as if chained), which only loosens the bound a little.
    """
    out: list[int] = []
    for m in module.modules():
        if isinstance(m, torch.nn.Linear):
            out.append(m.in_features)
        elif isinstance(m, torch.nn.modules.conv._ConvNd):
            out.append(m.in_channels // m.groups * math.prod(m.kernel_size))
        elif isinstance(m, torch.nn.LayerNorm):
            out.append(math.prod(m.normalized_shape))
        elif isinstance(m, torch.nn.GroupNorm):
            out.append(m.num_channels // m.num_groups)
    return out or [1]


def network_atol(module: torch.nn.Module, magnitude: float = 1.0, calls: int = 1,
                 dtype: torch.dtype = torch.float32, safety: float = 4.0) -> float:
    """Tolerance between two batchings of `calls` chained evaluations of `module` (a sampling loop of `calls`
    denoiser steps carries each step's round-off into the next: the errors add)."""
    return calls * roundoff_atol(dtype, reductions_of(module), magnitude, safety)
