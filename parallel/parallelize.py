"""`parallelize(pipe, config)` / `unparallelize(pipe)`: patch parallelism on a stock diffusers pipeline.

The denoiser (`pipe.unet` or `pipe.transformer`) gets diffusers hooks (`HookRegistry`) on its convs, GroupNorms,
patch embedding and top level, and a band-parallel attention processor on each self-attention; all of it is
removed again by `handle.remove()`. The pipeline object itself is not touched: the top-level hook notices each new
generation (`denoiser.DenoiserHook`), drains the previous one's transfers and resets the per-call state.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from diffusers.hooks import HookRegistry
from torch import nn

from ..core import families
from .comm import ByteMeter, Communicator
from .config import PatchParallelConfig, PatchParallelError
from .denoiser import HOOK_NAME, DenoiserHook, FamilyAdapter
from .dit import DiTAdapter, PixArtAdapter
from .mmdit import FluxAdapter, SD3Adapter
from .state import PatchState
from .unet import UNetAdapter

ADAPTERS: dict[str, type[FamilyAdapter]] = {
    "UNet2DConditionModel": UNetAdapter,
    "DiTTransformer2DModel": DiTAdapter,
    "PixArtTransformer2DModel": PixArtAdapter,
    "SD3Transformer2DModel": SD3Adapter,
    "FluxTransformer2DModel": FluxAdapter,
}
_ATTR = "_diffaccel_patch_parallel"


def find_denoiser(obj: Any) -> nn.Module:
    """The model to split (the family layer's denoiser), as a `PatchParallelError` when there is none."""
    try:
        return families.find_denoiser(obj)
    except TypeError as exc:
        raise PatchParallelError(str(exc)) from exc


def adapter_for(model: nn.Module) -> FamilyAdapter:
    cls = type(model).__name__
    if cls not in ADAPTERS:
        raise PatchParallelError(f"unsupported model {cls}; patch parallelism supports {', '.join(ADAPTERS)}")
    return ADAPTERS[cls]()


def check_support(pipe_or_model: Any, config: PatchParallelConfig) -> FamilyAdapter:
    """The adapter for the pipeline's denoiser, or `PatchParallelError` saying why it cannot be split (an unknown
    model class or layer, or cfg_parallel on a pipeline that does not batch guidance). Needs no process group."""
    model = find_denoiser(pipe_or_model)
    adapter = adapter_for(model)
    adapter.check_model(model)
    if config.cfg_parallel and not adapter.cfg_batched:
        raise PatchParallelError(f"cfg_parallel splits a [uncond; cond] batch, but {type(model).__name__}'s "
                                 "pipeline runs its guidance branches as separate calls")
    return adapter


def _weights_probe(model: nn.Module) -> float:
    """A cheap fingerprint of the weights (first elements of every tensor) to detect different models per rank."""
    with torch.no_grad():
        return float(sum(p.detach().reshape(-1)[:4096].double().sum().item() for p in model.parameters()))


class PatchParallelHandle:
    """What `parallelize` returns: per-call state, the byte meter, `comm_report()` and `remove()`."""

    def __init__(self, model: nn.Module, config: PatchParallelConfig, state: PatchState | None,
                 pipe: Any = None) -> None:
        self.model, self.config, self.state, self.pipe = model, config, state, pipe
        self.hooked: list[nn.Module] = []
        self.processors: list[tuple[nn.Module, Any]] = []

    @property
    def enabled(self) -> bool:
        return self.state is not None

    @property
    def comm(self) -> Communicator | None:
        return self.state.comm if self.state else None

    @property
    def meter(self) -> ByteMeter:
        return self.state.meter if self.state else ByteMeter(False)

    def reset(self) -> None:
        """Start a new generation: forget stale buffers and the call counter (pipelines do this themselves)."""
        if self.state:
            self.state.reset()

    def comm_report(self, all_ranks: bool = False) -> dict[str, Any]:
        """Bytes per call, per kind, split into sync and displaced calls; `all_ranks=True`
        is collective and adds every rank's summary."""
        if not self.state:
            return {"world_size": 1, "note": "single process: nothing communicated"}
        comm = self.state.comm
        rep: dict[str, Any] = {"rank": comm.rank, "world_size": comm.world, "ranks_per_branch": comm.n,
                               "branches": comm.branches, "mode": self.config.mode,
                               "warmup_steps": self.config.warmup_steps, "calls": self.state.call_index + 1,
                               "stale_buffer_bytes": self.state.buffer_bytes(), **self.meter.summary()}
        if all_ranks:
            rep["per_rank"] = comm.all_gather_object(self.meter.summary(), "comm_report")
        return rep

    # ------------------------------------------------------------------ installation
    def _add_hook(self, module: nn.Module, hook) -> None:
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, HOOK_NAME)
        self.hooked.append(module)

    def _add_processor(self, attn: nn.Module, processor) -> None:
        self.processors.append((attn, attn.processor))
        attn.set_processor(processor)

    def remove(self) -> None:
        """Undo everything `parallelize` did (hooks, processors, pipeline class); safe to call twice.

        In-flight transfers are awaited first: the process groups are shared with later handles, and a message
        left behind would be matched by the next handle's transfer with the same tag."""
        if self.state:
            try:
                self.state.drain()
            except Exception:  # a broken group (dead peer) has nothing left to drain
                self.state.pending.clear()
        for m in reversed(self.hooked):
            m._diffusers_hook.remove_hook(HOOK_NAME, recurse=False)
        self.hooked.clear()
        for attn, proc in reversed(self.processors):
            attn.set_processor(proc)
        self.processors.clear()
        if getattr(self.model, _ATTR, None) is self:
            del self.model.__dict__[_ATTR]


def parallelize(pipe_or_model: Any, config: PatchParallelConfig | None = None) -> PatchParallelHandle:
    """Split every call of the pipeline's denoiser over the ranks of the default process group.

    Collective: call it on every rank with the same model and config. With no process group (or world size 1)
    nothing is wrapped and the pipeline is unchanged. Raises `PatchParallelError` on every rank alike for
    unsupported models, an odd world with cfg_parallel, or configurations / weights that differ between ranks.
    """
    config = config or PatchParallelConfig()
    model = find_denoiser(pipe_or_model)
    pipe = None if isinstance(pipe_or_model, nn.Module) else pipe_or_model
    if getattr(model, _ATTR, None) is not None:
        raise PatchParallelError("this model is already parallelised; call unparallelize first")
    adapter = adapter_for(model)
    problem = None
    try:
        check_support(model, config)
    except PatchParallelError as exc:
        problem = str(exc)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        if problem:
            raise PatchParallelError(problem)
        return PatchParallelHandle(model, config, None, pipe)
    world = dist.get_world_size()
    branches = 2 if config.cfg_parallel else 1
    if world % branches:
        raise PatchParallelError(f"cfg_parallel needs an even world size (two branches); got {world}")
    n = world // branches
    comm = Communicator(n, branches, config.timeout_s, ByteMeter(config.count_bytes))
    mine = {"config": config.fingerprint(), "model": type(model).__name__, "weights": _weights_probe(model),
            "problem": problem}
    everyone = comm.all_gather_object(mine, "configuration check")
    problems = [f"rank {i}: {d['problem']}" for i, d in enumerate(everyone) if d["problem"]]
    if problems:
        raise PatchParallelError("; ".join(problems))
    for key in ("model", "config", "weights"):
        bad = [i for i, d in enumerate(everyone) if d[key] != everyone[0][key]]
        if bad:
            a, b = everyone[0][key], everyone[bad[0]][key]
            if key == "config":
                a, b = ({f: d[f] for f in a if a[f] != b.get(f)} for d in (a, b))
            raise PatchParallelError(f"rank {comm.rank}: the {key} of rank(s) {bad} differs from rank 0's "
                                     f"(rank {bad[0]}: {b}; rank 0: {a})")
    state = PatchState(config, comm, n)
    handle = PatchParallelHandle(model, config, state, pipe)
    if n > 1:
        adapter.install(model, state, handle._add_hook, handle._add_processor)
    handle._add_hook(model, DenoiserHook(state, adapter, pipe))
    model.__dict__[_ATTR] = handle
    return handle


def parallel_handle(pipe_or_model: Any) -> PatchParallelHandle | None:
    """The handle of the patch parallelism on a pipeline or model (e.g. applied through the protocol), or None."""
    return getattr(find_denoiser(pipe_or_model), _ATTR, None)


def unparallelize(pipe_or_model: Any) -> None:
    """Remove patch parallelism from a pipeline or model (no-op if it was not parallelised)."""
    handle = parallel_handle(pipe_or_model)
    if handle is not None:
        handle.remove()
