"""The one sampling loop every loop diffaccel owns runs on (k-diffusion style; Crowson's `k_diffusion/sampling.py`).

    x = sample(model, x, timesteps, extra_args, callback, disable, scheduler=scheduler)

`model(x, t, **extra_args)` returns what `scheduler.step` expects (the pipeline family's guided ε, see
`core.families`); each step is ``scheduler.step(model_output, t, x)``. After every step `callback` receives one
dict with the documented keys below and may return a replacement for ``x`` (FK steering resamples particles this
way). FK steering (`steering.fk.sample_fk`), noise search (`steering.noise_search`) and router training
(`caching.harmonica_train.generate`) and the Time-Shift paper loop (`samplers.time_shift.sample_time_shift_paper`,
whose step object also picks the per-sample model time of the next step) use it, as do the benchmarks' bare
denoiser loops (`benchmarks/caching_speed.py`, `benchmarks/harmonica.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

#: keys of the dict `callback` receives after every step
CALLBACK_KEYS = (
    "i",  # index of the step within `timesteps`
    "t",  # the step's timestep
    "sample",  # x before the step
    "model_output",  # what the model returned for (sample, t)
    "x",  # x after the step (the scheduler's prev_sample)
    "denoised",  # the scheduler's pred_original_sample (x̂0), or None when it gives none
)


def sample(model: Callable[..., torch.Tensor], x: torch.Tensor, timesteps: Sequence[Any] | torch.Tensor,
           extra_args: dict[str, Any] | None = None, callback: Callable[[dict[str, Any]], Any] | None = None,
           disable: bool = True, *, scheduler: Any, step_args: dict[str, Any] | None = None) -> torch.Tensor:
    """Run `scheduler` over `timesteps` from `x` (already scaled by ``init_noise_sigma``); returns the last x.

    `step_args` go to every ``scheduler.step`` (``eta``, ``generator``); `disable=False` shows a progress bar."""
    from tqdm.auto import tqdm

    extra_args, step_args = extra_args or {}, step_args or {}
    for i, t in enumerate(tqdm(timesteps, disable=disable)):
        model_output = model(x, t, **extra_args)
        out = scheduler.step(model_output, t, x, return_dict=True, **step_args)
        info = {"i": i, "t": t, "sample": x, "model_output": model_output, "x": out.prev_sample,
                "denoised": getattr(out, "pred_original_sample", None)}
        x = out.prev_sample
        if callback is not None:
            replaced = callback(info)
            if replaced is not None:
                x = replaced
    return x
