"""Entry and exit of a parallelised denoiser: call counting, input checks, CFG batch split, output gather.

Shared by the model-family adapters (`unet.py`, `dit.py`); each family says how its input becomes a band and
where its output is gathered.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from diffusers.hooks import ModelHook
from torch import nn

from ..core.hooks import StepTracker, get_argument, input_signature
from .config import PatchParallelError
from .state import PatchState

HOOK_NAME = "diffaccel_patch_parallel"


class FamilyAdapter:
    """What differs between model families. Subclasses: `UNetAdapter`, `DiTAdapter`, `PixArtAdapter`."""

    sample_arg = "sample"
    timestep_pos = 1  # position of `timestep` among the forward's positional arguments
    gathers_inside = False  # True when a layer hook (not the exit) assembles the full output
    cfg_batched = True  # the pipeline batches classifier-free guidance as [uncond; cond] (cfg_parallel applies)
    out_dim = 2  # the output's band dimension (rows of a 4-D latent; 1 for a token sequence)
    refused_kwargs: tuple[str, ...] = ("down_block_additional_residuals", "mid_block_additional_residual",
                                       "down_intrablock_additional_residuals")  # ControlNet / adapter residuals

    def check_model(self, model: nn.Module) -> None:
        raise NotImplementedError

    def grid(self, sample: torch.Tensor, args: tuple, kwargs: dict) -> tuple[int, int]:
        """(rows, columns) of the full image that the bands split: the 4-D latent's height and width by default."""
        if sample.ndim != 4:
            raise PatchParallelError(f"expected a 4-D latent as `{self.sample_arg}`, got shape {tuple(sample.shape)}")
        return sample.shape[2], sample.shape[3]

    def enter_arguments(self, args: tuple, kwargs: dict, state: PatchState) -> tuple[tuple, dict]:
        """Other forward arguments that follow the band (Flux's image position ids); unchanged by default."""
        return args, kwargs

    def check_latent(self, model: nn.Module, n: int, height: int, width: int) -> None:
        raise NotImplementedError

    def install(self, model: nn.Module, state: PatchState, add_hook, add_processor) -> None:
        raise NotImplementedError

    def enter(self, sample: torch.Tensor, state: PatchState) -> torch.Tensor:
        """The tensor the wrapped model receives in place of the (branch-local) full sample."""
        return sample


def split_cfg(obj: Any, full_batch: int, branch: int) -> Any:
    """Keep branch `branch` (0 = first half = unconditional) of every tensor whose leading dim is the CFG batch."""
    if torch.is_tensor(obj):
        if obj.ndim > 0 and obj.shape[0] == full_batch:
            half = full_batch // 2
            return obj[branch * half:(branch + 1) * half]
        return obj
    if isinstance(obj, dict):
        return {k: split_cfg(v, full_batch, branch) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(split_cfg(v, full_batch, branch) for v in obj)
    return obj


def gather_bands(state: PatchState, band: torch.Tensor, dim: int, layer: str = "output") -> torch.Tensor:
    """All-gather the bands (along `dim`) of the patch group, or of the whole world with cfg_parallel, and
    reassemble [branch 0 bands; branch 1 bands] along the batch dimension."""
    comm = state.comm
    cfg = comm.branches > 1
    parts = comm.all_gather(band, layer=layer, kind="output", group="world" if cfg else "patch").wait()
    branches = [torch.cat(parts[b * state.n:(b + 1) * state.n], dim=dim) for b in range(comm.branches)]
    return torch.cat(branches, dim=0)


class DenoiserHook(ModelHook):
    """Top-level hook on the denoiser: notices a new generation, counts calls, validates, splits CFG halves, enters
    and exits the bands.

    A generation starts when the step tracker sees the timestep rise (or the input shape change, or a reset from
    `reset_stateful_hooks`, which `diffaccel.accelerate` runs at every ``set_timesteps``): in-flight transfers of
    the previous generation are drained and the stale buffers and call counter forgotten. A failing call drops
    its in-flight transfers (a dead peer has nothing left to send) and the next call starts afresh.
    """

    _is_stateful = True

    def __init__(self, state: PatchState, adapter: FamilyAdapter, pipe: Any = None) -> None:
        super().__init__()
        self.state, self.adapter = state, adapter
        self.tracker = StepTracker()
        self.pipe_ref = weakref.ref(pipe) if pipe is not None else None

    def reset_state(self, module: nn.Module) -> nn.Module:
        self.tracker.reset()
        return module

    def _new_generation(self) -> None:
        pipe = self.pipe_ref() if self.pipe_ref is not None else None
        if self.state.comm.branches > 1 and getattr(pipe, "do_classifier_free_guidance", True) is False:
            raise PatchParallelError("cfg_parallel needs classifier-free guidance (guidance_scale > 1)")
        self.state.reset()

    def new_forward(self, module: nn.Module, *args, **kwargs):
        try:
            return self._forward(module, args, kwargs)
        except BaseException:
            self.state.pending.clear()
            self.tracker.reset()
            raise

    def _forward(self, module: nn.Module, args: tuple, kwargs: dict):
        st, ad = self.state, self.adapter
        name = ad.sample_arg
        sample = args[0] if args else kwargs.get(name)
        if not torch.is_tensor(sample):
            raise PatchParallelError(f"expected a tensor as `{name}`, got {type(sample).__name__}")
        timestep = get_argument(args, kwargs, "timestep", ad.timestep_pos)
        if timestep is not None:
            generations = self.tracker.generations
            self.tracker.observe(timestep, input_signature(sample))
            if self.tracker.generations != generations:
                self._new_generation()
        for key in ad.refused_kwargs:
            if kwargs.get(key) is not None:
                raise PatchParallelError(f"`{key}` (ControlNet / adapters) is not supported by patch parallelism")
        st.begin_call()
        comm = st.comm
        grid = ad.grid(sample, args, kwargs)
        if st.call_index == 0:
            ad.check_latent(module, st.n, *grid)
            if st.config.check_inputs:
                self._check_same_input(sample)
        if comm.branches > 1:
            full = sample.shape[0]
            if full % 2:
                raise PatchParallelError(f"cfg_parallel needs the CFG batch [uncond; cond] (even size); got {full}")
            args = split_cfg(args, full, comm.branch)
            kwargs = split_cfg(kwargs, full, comm.branch)
            sample = args[0] if args else kwargs[name]
        st.full_hw = grid
        band = ad.enter(sample, st)
        args, kwargs = ad.enter_arguments(args, kwargs, st)
        if args:
            args = (band, *args[1:])
        else:
            kwargs[name] = band
        out = self.fn_ref.original_forward(*args, **kwargs)
        if ad.gathers_inside and st.n > 1:  # layer hooks are only installed with more than one band
            return out
        y = out[0] if isinstance(out, tuple) else out.sample
        full = gather_bands(st, y, dim=ad.out_dim)
        if isinstance(out, tuple):
            return (full, *out[1:])
        return type(out)(sample=full)

    def _check_same_input(self, sample: torch.Tensor) -> None:
        """Every rank must start from the same latent (same seed and generator device); refuse otherwise."""
        comm = self.state.comm
        x = sample.detach().double()
        probe = torch.stack([x.sum(), x.abs().sum(), (x * torch.arange(x.numel(), dtype=x.dtype,
                                                                       device=x.device).view_as(x)).sum()])
        got = comm.all_gather(probe, layer="input_check", kind="other", group="world").wait()
        bad = [i for i, g in enumerate(got) if not torch.equal(g, got[0])]
        if bad:
            raise PatchParallelError(f"rank {comm.rank}: the input latent of rank(s) {bad} differs from rank 0's; "
                                     "use the same seed and generator device on every rank")
