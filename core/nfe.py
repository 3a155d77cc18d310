"""NFE counting: how many times the denoiser of a pipeline actually ran.

A forward pre-hook on the denoising network (``unet``, ``transformer`` or ``prior``) counts calls and the batch
rows each call processed, so a scheduler cannot under-report its model evaluations. With classifier-free guidance
batched into one call (the diffusers default) one step is one call with a doubled batch: `calls` counts it once,
`rows` counts both halves.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .families import find_denoiser


@dataclass
class NFECounter:
    """Counts forward calls of one module while attached. Use `count_nfe(pipe)` as a context manager."""

    calls: int = 0
    rows: int = 0

    def _hook(self, module, args, kwargs) -> None:
        self.calls += 1
        x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        if isinstance(x, torch.Tensor) and x.ndim > 0:
            self.rows += int(x.shape[0])

    def reset(self) -> None:
        self.calls = 0
        self.rows = 0


@contextmanager
def count_nfe(pipe_or_model):
    """``with count_nfe(pipe) as nfe: pipe(...)`` then ``nfe.calls`` is the number of denoiser evaluations."""
    counter = NFECounter()
    handle = find_denoiser(pipe_or_model).register_forward_pre_hook(counter._hook, with_kwargs=True)
    try:
        yield counter
    finally:
        handle.remove()
