"""Encoder propagation (EP) for diffusers UNets, as `diffusers.hooks` on the stock modules.

(Over 450 lines: the config, the three hooks that share one per-UNet state, parallel decoding and prior noise
injection are one method whose pieces only make sense together; key-step schedules live in `key_steps.py`.)

Li et al., "Faster Diffusion: Rethinking the Role of UNet Encoder in Diffusion Models", NeurIPS 2024. The UNet
encoder (`conv_in`, `down_blocks`, `mid_block`) runs only at key steps k; a non-key step s reuses the encoder
outputs of its last key step and runs only the decoder with the current conditioning (paper §3.3, "encoder
propagation"):

    eps_s = Dec(S_k, h_k; emb(t_s), c)          S_k: skip features, h_k: mid-block output at key step k

A non-key prediction never reads the current latent, so the non-key steps after a key step can be decoded in one
batch ("parallel decoding", paper §3.3 / Fig. 5) — here by looking ahead at the scheduler's timesteps and stashing
the predictions, with the pipeline loop and scheduler untouched. Prior noise injection (paper §3.4) adds
`alpha * z_T` to the latent before every step with `t_s < tau_frac * T` through `callback_on_step_end`.

Hooks (named `diffaccel.encoder_propagation.<role>`): the denoiser hook on the UNet (step tracking, key decision,
look-ahead), the encoder hook on each encoder module (run and store at key steps, return a copy of the stored output
otherwise), the ControlNet hook on each ControlNet (residuals computed at key steps only).
"""

from __future__ import annotations

import inspect
import math
import warnings
import weakref
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.errors import InputError
from ..core.hooks import (
    SharedStateHook,
    StepTracker,
    TimestepsCallback,
    find_denoiser,
    get_argument,
    get_hook,
    has_hook,
    hook_state,
    input_signature,
    register_hook,
    remove_hooks,
    same_values,
    split_batch,
    take_rows,
    tile_batch,
    tree_leaves,
    tree_map,
)
from .key_steps import KeyStepSchedule, get_schedule

DENOISER_HOOK = "diffaccel.encoder_propagation.denoiser"
ENCODER_HOOK = "diffaccel.encoder_propagation.encoder"
CONTROLNET_HOOK = "diffaccel.encoder_propagation.controlnet"
HOOK_NAMES = (DENOISER_HOOK, ENCODER_HOOK, CONTROLNET_HOOK)


@dataclass(frozen=True)
class NoiseInjection:
    """Prior noise injection (paper §3.4): `z <- z + alpha * z_T` before each step with `t_s < tau_frac * T`."""

    alpha: float = 0.003
    tau_frac: float = 0.5

    def __post_init__(self) -> None:
        if not math.isfinite(self.alpha) or self.alpha < 0:
            raise InputError(f"noise injection alpha must be a finite number >= 0, got {self.alpha}")
        if not 0.0 < self.tau_frac <= 1.0:
            raise InputError(f"noise injection tau_frac must be in (0, 1], got {self.tau_frac}")


@dataclass
class EncoderPropagationConfig:
    """Settings of encoder propagation.

    key_steps: schedule — a name (`sd50`, `sd50-scaled`, `uniform-<k>`, `all`, ...), an explicit list of
        execution-order steps starting at 0, a callable `(s, N) -> bool`, or a `KeyStepSchedule`.
    parallel: decode the non-key steps that follow a key step in one batch (needs the scheduler's timesteps:
        apply to a pipeline, or give `timesteps_callback`).
    max_parallel: most steps decoded in one batched call (1 = sequential).
    max_batch: most rows (steps x batch) in one batched call, for memory; None = no cap.
    timesteps_callback: returns the scheduler's timesteps (default when applied to a pipeline:
        `pipe.scheduler.timesteps`); also lets the hook validate key steps against the step count.
    noise_injection: `NoiseInjection(alpha, tau_frac)`, an `(alpha, tau_frac)` pair, or None. Applied by
        `cached_call(pipe, ...)` on pipelines with `callback_on_step_end` (Stable Diffusion family).
    cache_controlnet: compute ControlNet residuals at key steps only (the pipeline's ControlNet is found when
        applied to a pipeline).
    clone_on_reuse: store and hand out copies of cached tensors, so in-place adds by the UNet forward (T2I-Adapter)
        or by callers never corrupt the cache.
    step_counting: "timestep" (steps counted from the denoiser's timestep argument; the only mode).
    propagate_up_blocks: also reuse the outputs of the first j (deepest) up blocks at non-key steps — a diffaccel
        extension beyond the paper (0 = the paper's encoder propagation). Non-key predictions still never read the
        latent, so parallel decoding stays exact; it moves the FLOPs limit past the encoder's share.
    """

    key_steps: KeyStepSchedule | str | Sequence[int] | Callable[[int, int | None], bool] = "sd50"
    parallel: bool = False
    max_parallel: int = 16
    max_batch: int | None = None
    timesteps_callback: TimestepsCallback | None = None
    noise_injection: NoiseInjection | tuple[float, float] | None = field(default_factory=NoiseInjection)
    cache_controlnet: bool = True
    clone_on_reuse: bool = True
    step_counting: str = "timestep"
    propagate_up_blocks: int = 0

    def __post_init__(self) -> None:
        self.schedule: KeyStepSchedule = get_schedule(self.key_steps)
        if isinstance(self.noise_injection, tuple):
            self.noise_injection = NoiseInjection(*self.noise_injection)
        if self.noise_injection is not None and not isinstance(self.noise_injection, NoiseInjection):
            raise TypeError(f"noise_injection must be NoiseInjection, (alpha, tau_frac) or None, "
                            f"got {self.noise_injection!r}")
        if isinstance(self.max_parallel, bool) or not isinstance(self.max_parallel, int) or self.max_parallel < 1:
            raise InputError(f"max_parallel must be an int >= 1, got {self.max_parallel!r}")
        if self.max_batch is not None and (not isinstance(self.max_batch, int) or self.max_batch < 1):
            raise InputError(f"max_batch must be None or an int >= 1, got {self.max_batch!r}")
        if isinstance(self.propagate_up_blocks, bool) or not isinstance(self.propagate_up_blocks, int) \
                or self.propagate_up_blocks < 0:
            raise InputError(f"propagate_up_blocks must be an int >= 0, got {self.propagate_up_blocks!r}")
        if self.step_counting != "timestep":
            raise InputError(
                f"step_counting={self.step_counting!r} is not supported; only 'timestep' (second-order schedulers "
                "such as Heun repeat timesteps, which are then counted as one step)"
            )


@dataclass
class EncoderPropagationCounters:
    """What ran during the current (or last) generation; zeroed when a new generation starts.

    encoder_passes: UNet calls in which the encoder really ran; decoder_passes: real UNet forward executions
    (a batched parallel call counts once); decoded_steps: step predictions produced by those executions;
    module_runs: real executions per encoder module (`conv_in`, `down_blocks.0`, ..., `mid_block`).
    """

    steps: int = 0
    unet_calls: int = 0
    encoder_passes: int = 0
    decoder_passes: int = 0
    decoded_steps: int = 0
    parallel_batches: int = 0
    stash_hits: int = 0
    stash_fallbacks: int = 0
    controlnet_runs: int = 0
    key_steps: list[int] = field(default_factory=list)
    module_runs: Counter = field(default_factory=Counter)


class _EPState:
    """State shared by closure between one UNet's EP hooks; dropped as a whole at every reset."""

    def __init__(self, config: EncoderPropagationConfig, timesteps_callback: TimestepsCallback | None) -> None:
        self.config = config
        self.schedule = config.schedule
        self.tracker = StepTracker(on_new_generation=self._new_generation, timesteps_callback=timesteps_callback)
        self.cache: dict[tuple[str, int], Any] = {}
        self.stash: dict[int, dict[str, Any]] = {}
        self.sequential_slots: set[int] = set()
        self.mode: str | None = None  # "compute" | "reuse" | "replay" while a hooked UNet forward runs
        self.replay_times = 1
        self.slot = 0
        self.unet_step_key: tuple[int, int] | None = None
        self.counters = EncoderPropagationCounters()
        self.controlnets: list[torch.nn.Module] = []
        self.last_injection: PriorNoiseInjection | None = None

    def clear(self) -> None:
        self.cache.clear()
        self.stash.clear()
        self.sequential_slots.clear()
        self.mode = None
        self.unet_step_key = None
        self.tracker.reset()

    def reorder_rows(self, rows: torch.Tensor) -> None:
        """Particles were resampled: cached encoder outputs follow their rows; stashed look-ahead predictions,
        computed for the old rows, are dropped (the next non-key step decodes afresh)."""
        self.cache = {key: take_rows(value, rows) for key, value in self.cache.items()}
        self.stash.clear()
        if self.last_injection is not None:  # prior noise: each particle keeps its ancestor's z_T
            self.last_injection.noise = take_rows(self.last_injection.noise, rows)

    def _new_generation(self) -> None:
        self.cache.clear()
        self.stash.clear()
        self.sequential_slots.clear()
        self.unet_step_key = None
        self.counters = EncoderPropagationCounters()
        self.schedule.validate(self.tracker.num_steps)

    def is_key(self, step: int) -> bool:
        return self.schedule.is_key(step, self.tracker.num_steps)

    def run(self, forward: Callable[..., Any], mode: str, times: int, args: tuple, kwargs: dict) -> Any:
        self.mode, self.replay_times = mode, times
        try:
            out = forward(*args, **kwargs)
        finally:
            self.mode, self.replay_times = None, 1
        self.counters.decoder_passes += 1
        self.counters.decoded_steps += times
        if mode == "compute":
            self.counters.encoder_passes += 1
        return out

    def lookahead(self, step: int, batch: int) -> list[tuple[int, float]]:
        """This non-key step and the following non-key steps of its group, within the caps: [(s, t_s), ...]."""
        tracker = self.tracker
        cap = self.config.max_parallel
        if self.config.max_batch is not None:
            cap = min(cap, max(1, self.config.max_batch // batch))
        group = [(step, tracker.timestep)]
        for j, t in enumerate(tracker.future_timesteps() or []):
            s = step + 1 + j
            if len(group) >= cap or self.is_key(s):
                break
            group.append((s, t))
        return group


def _store(value: Any, clone: bool) -> Any:
    return tree_map(lambda x: x.detach().clone() if clone else x.detach(), value)


def _conditioning(args: tuple, kwargs: dict) -> list[Any]:
    """Leaves of every UNet argument except `sample` and `timestep` (what a stashed prediction depends on)."""
    rest = {k: v for k, v in kwargs.items() if k not in ("sample", "timestep")}
    positional = args[2:] if len(args) >= 2 else ()
    return tree_leaves((positional, sorted(rest.items(), key=lambda kv: kv[0])))


class _DenoiserHook(SharedStateHook):
    """The denoiser hook: step tracking, key-step decision, parallel look-ahead with a stash (paper §3.3)."""

    state: _EPState

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        st = self.state
        forward = self.fn_ref.original_forward
        sample = get_argument(args, kwargs, "sample", 0)
        timestep = get_argument(args, kwargs, "timestep", 1)
        if not isinstance(sample, torch.Tensor) or timestep is None:
            raise TypeError("encoder propagation needs the UNet's `sample` tensor and `timestep` arguments")
        tracker = st.tracker
        tracker.observe(timestep, input_signature(sample))
        step_key = (tracker.generations, tracker.step)
        if step_key != st.unet_step_key:
            st.unet_step_key, st.slot = step_key, 0
            st.counters.steps += 1
        else:
            st.slot += 1
        st.counters.unet_calls += 1
        step, slot, batch = tracker.step, st.slot, int(sample.shape[0])

        key = st.is_key(step) or ("conv_in", slot) not in st.cache
        if key:
            st.stash.pop(slot, None)
            st.sequential_slots.discard(slot)
            if slot == 0:
                st.counters.key_steps.append(step)
            return st.run(forward, "compute", 1, args, kwargs)
        if not st.config.parallel or tracker.trajectory is None or slot in st.sequential_slots:
            return st.run(forward, "reuse", 1, args, kwargs)

        cond = _conditioning(args, kwargs)
        stashed = self._take(slot, step, tracker.timestep, batch, cond)
        if stashed is not None:
            return stashed
        group = st.lookahead(step, batch)
        if len(group) == 1:
            return st.run(forward, "reuse", 1, args, kwargs)
        m = len(group)
        big_args, big_kwargs = tile_batch((args, kwargs), batch, m)
        ref = timestep if isinstance(timestep, torch.Tensor) else torch.tensor(timestep)
        steps_t = torch.tensor([t for _, t in group], dtype=torch.float64).to(ref.dtype)
        big_t = steps_t.to(sample.device).repeat_interleave(batch)
        if "timestep" in big_kwargs or len(big_args) < 2:
            big_kwargs = {**big_kwargs, "timestep": big_t}
        else:
            big_args = big_args[:1] + (big_t,) + big_args[2:]
        out = st.run(forward, "replay", m, big_args, big_kwargs)
        chunks = split_batch(out, batch, m)
        st.counters.parallel_batches += 1
        st.stash[slot] = {"cond": cond, "batch": batch,
                          "steps": {s: (t, chunk) for (s, t), chunk in zip(group[1:], chunks[1:], strict=True)}}
        return chunks[0]

    def _take(self, slot: int, step: int, t_now: float, batch: int, cond: list[Any]) -> Any:
        st = self.state
        entry = st.stash.get(slot)
        if entry is None or step not in entry["steps"]:
            return None
        t_stashed, out = entry["steps"].pop(step)
        if t_stashed != t_now or entry["batch"] != batch or not same_values(entry["cond"], cond):
            # the pipeline changed something the stash depends on: drop it, run the rest of the group sequentially
            st.stash.pop(slot, None)
            st.sequential_slots.add(slot)
            st.counters.stash_fallbacks += 1
            return None
        st.counters.stash_hits += 1
        return out

    def prepare_call(self, pipe: Any, call_kwargs: dict[str, Any]) -> dict[str, Any]:
        """Set up prior noise injection for one pipeline call (initial latents + `callback_on_step_end`)."""
        ni = self.state.config.noise_injection
        self.state.last_injection = None
        if ni is None or ni.alpha == 0:
            return call_kwargs
        params = inspect.signature(pipe.__call__).parameters
        if "callback_on_step_end" not in params or "latents" not in params:
            warnings.warn(
                f"{type(pipe).__name__} has no `callback_on_step_end`/`latents` arguments: prior noise injection is "
                "not applied (it is defined for the Stable Diffusion family)", stacklevel=3)
            return call_kwargs
        if call_kwargs.get("latents") is None:
            call_kwargs["latents"] = sample_initial_noise(pipe, call_kwargs)
        user = call_kwargs.get("callback_on_step_end")
        injection = PriorNoiseInjection(call_kwargs["latents"], ni.alpha, ni.tau_frac, user)
        inputs = list(call_kwargs.get("callback_on_step_end_tensor_inputs") or ["latents"])
        for name in ["latents", *getattr(user, "tensor_inputs", [])]:
            if name not in inputs:
                inputs.append(name)
        call_kwargs["callback_on_step_end"] = injection
        call_kwargs["callback_on_step_end_tensor_inputs"] = inputs
        self.state.last_injection = injection
        return call_kwargs


class _EncoderHook(SharedStateHook):
    """The encoder hook on `conv_in`, each down block and the mid block (and the first `propagate_up_blocks` up
    blocks): run + store at key steps, return a copy of the stored output at non-key steps, tiled in replay mode."""

    state: _EPState

    def __init__(self, state: _EPState, name: str) -> None:
        super().__init__(state)
        self.name = name

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        st = self.state
        if st.mode is None:  # called outside a hooked UNet forward
            return self.fn_ref.original_forward(*args, **kwargs)
        key = (self.name, st.slot)
        if st.mode == "compute":
            out = self.fn_ref.original_forward(*args, **kwargs)
            st.cache[key] = _store(out, st.config.clone_on_reuse)
            st.counters.module_runs[self.name] += 1
            return out
        cached = st.cache[key]
        if st.mode == "replay":
            times = st.replay_times
            return tree_map(lambda x: x.repeat(times, *([1] * (x.ndim - 1))) if x.ndim else x, cached)
        return tree_map(torch.clone, cached) if st.config.clone_on_reuse else cached


class _ControlNetHook(SharedStateHook):
    """The ControlNet hook: a ControlNet's residuals are computed at key steps and reused at the others."""

    state: _EPState

    def __init__(self, state: _EPState, name: str) -> None:
        super().__init__(state)
        self.name = name
        self._step_key: tuple[int, int] | None = None
        self._slot = 0

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self._step_key, self._slot = None, 0
        return super().reset_state(module)

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        st = self.state
        timestep = get_argument(args, kwargs, "timestep", 1)
        sample = get_argument(args, kwargs, "sample", 0)
        if timestep is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        st.tracker.observe(timestep)
        step_key = (st.tracker.generations, st.tracker.step)
        self._slot = 0 if step_key != self._step_key else self._slot + 1
        self._step_key = step_key
        # non-tensor arguments (conditioning_scale, guess_mode, ...) and the input shape must match the stored call
        extras = [x for x in tree_leaves(_conditioning(args, kwargs)) if not isinstance(x, torch.Tensor)]
        extras.append(input_signature(sample))
        key = ("controlnet:" + self.name, self._slot)
        stored = st.cache.get(key)
        if not st.is_key(st.tracker.step) and stored is not None and stored[0] == extras:
            return tree_map(torch.clone, stored[1]) if st.config.clone_on_reuse else stored[1]
        out = self.fn_ref.original_forward(*args, **kwargs)
        st.cache[key] = (extras, _store(out, st.config.clone_on_reuse))
        st.counters.controlnet_runs += 1
        return out


class PriorNoiseInjection:
    """Adds `alpha * z_T` to the latents before every step s with `t_s < tau_frac * T` (paper §3.4; cumulative;
    `z_T` = initial noise x `scheduler.init_noise_sigma`, or `noise` itself when `scaled`).

    Called as a `callback_on_step_end` (chaining a user callback first) or, by `diffaccel.accelerate`, as a
    step-end handler through `inject`."""

    def __init__(self, noise: torch.Tensor, alpha: float, tau_frac: float,
                 user_callback: Callable[..., dict[str, Any]] | None = None, *, scaled: bool = False) -> None:
        self.noise = noise
        self.alpha = alpha
        self.tau_frac = tau_frac
        self.user_callback = user_callback
        self.scaled = scaled
        self.injected_steps: list[int] = []
        self._cursor = 0

    def _next_timestep(self, timesteps: Sequence[float], t: float) -> float | None:
        for j in range(self._cursor, len(timesteps)):
            if timesteps[j] == t:
                self._cursor = j + 1
                return timesteps[j + 1] if j + 1 < len(timesteps) else None
        return None

    def inject(self, scheduler: Any, step: int, timestep: Any, latents: torch.Tensor) -> torch.Tensor:
        """The latents after step `step` (at `timestep`), with the injection the next step needs."""
        ts = scheduler.timesteps
        values = [float(v) for v in (ts.tolist() if isinstance(ts, torch.Tensor) else ts)]
        t_next = self._next_timestep(values, float(timestep))
        if t_next is not None and t_next < self.tau_frac * scheduler.config.num_train_timesteps:
            z_t = self.noise.to(device=latents.device, dtype=latents.dtype)
            if not self.scaled:
                z_t = z_t * scheduler.init_noise_sigma
            latents = latents + self.alpha * z_t
            self.injected_steps.append(step + 1)
        return latents

    def __call__(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        out = dict(callback_kwargs)
        if self.user_callback is not None:
            out.update(self.user_callback(pipe, step, timestep, callback_kwargs) or {})
        out["latents"] = self.inject(pipe.scheduler, step, timestep, out["latents"])
        return out


def sample_initial_noise(pipe: Any, call_kwargs: dict[str, Any]) -> torch.Tensor:
    """The initial noise a Stable Diffusion-family pipeline would draw for these call arguments (same shape, dtype,
    device and generator use as its `prepare_latents`), so the same generator gives the same noise."""
    from diffusers.utils.torch_utils import randn_tensor

    unet = pipe.unet
    scale = getattr(pipe, "vae_scale_factor", None)
    if scale is None:
        raise TypeError(f"{type(pipe).__name__} has no vae_scale_factor; pass `latents=` explicitly")
    prompt, embeds = call_kwargs.get("prompt"), call_kwargs.get("prompt_embeds")
    if isinstance(prompt, str):
        batch = 1
    elif prompt is not None:
        batch = len(prompt)
    elif embeds is not None:
        batch = int(embeds.shape[0])
    else:
        raise InputError("pass `prompt` or `prompt_embeds`")
    batch *= int(call_kwargs.get("num_images_per_prompt") or 1)
    size = unet.config.sample_size
    size = size if isinstance(size, (tuple, list)) else (size, size)
    height = call_kwargs.get("height") or size[0] * scale
    width = call_kwargs.get("width") or size[1] * scale
    text_encoder = getattr(pipe, "text_encoder", None)
    dtype = embeds.dtype if embeds is not None else (text_encoder.dtype if text_encoder is not None else unet.dtype)
    shape = (batch, unet.config.in_channels, int(height) // scale, int(width) // scale)
    return randn_tensor(shape, generator=call_kwargs.get("generator"), device=pipe._execution_device, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------------
# public API


def _check_unet(unet: torch.nn.Module) -> None:
    from diffusers import UNet2DConditionModel, UNet2DModel

    if not isinstance(unet, (UNet2DModel, UNet2DConditionModel)):
        raise TypeError(
            f"encoder propagation supports diffusers UNet2DModel and UNet2DConditionModel, got {type(unet).__name__}"
        )


def _controlnet_members(pipe: Any) -> list[torch.nn.Module]:
    net = getattr(pipe, "controlnet", None)
    if net is None:
        return []
    members = getattr(net, "nets", None)
    return list(members) if members is not None else [net]


def apply_encoder_propagation(model_or_pipe: Any, config: EncoderPropagationConfig | None = None) -> None:
    """Attach encoder propagation to a UNet (or to a pipeline's UNet and ControlNets).

    Given a pipeline, its scheduler provides the timesteps (for step-count checks and parallel decoding) unless
    `config.timesteps_callback` is set. Raises `TypeError` for unsupported models and `ValueError` when already
    applied or when parallel decoding has no way to read the timesteps.
    """
    config = config or EncoderPropagationConfig()
    pipe = None if isinstance(model_or_pipe, torch.nn.Module) else model_or_pipe
    unet = find_denoiser(model_or_pipe)
    _check_unet(unet)
    if has_hook(unet, DENOISER_HOOK):
        raise InputError("encoder propagation is already applied to this UNet; call remove_encoder_propagation first")
    callback = config.timesteps_callback
    if callback is None and pipe is not None:
        pipe_ref = weakref.ref(pipe)
        callback = lambda: pipe_ref().scheduler.timesteps  # noqa: E731
    if config.parallel and callback is None:
        raise InputError("parallel decoding needs the scheduler's timesteps: apply encoder propagation to the "
                         "pipeline, or set EncoderPropagationConfig(timesteps_callback=...)")
    state = _EPState(config, callback)
    encoder = [("conv_in", unet.conv_in)] + [(f"down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks)]
    if unet.mid_block is not None:
        encoder.append(("mid_block", unet.mid_block))
    if config.propagate_up_blocks >= len(unet.up_blocks):
        raise InputError(f"propagate_up_blocks={config.propagate_up_blocks} leaves no up block to run; this UNet has "
                         f"{len(unet.up_blocks)} up blocks")
    encoder += [(f"up_blocks.{i}", unet.up_blocks[i]) for i in range(config.propagate_up_blocks)]
    for name, module in encoder:
        register_hook(module, _EncoderHook(state, name), ENCODER_HOOK)
    if config.cache_controlnet and pipe is not None:
        for i, net in enumerate(_controlnet_members(pipe)):
            register_hook(net, _ControlNetHook(state, f"controlnet.{i}"), CONTROLNET_HOOK)
            state.controlnets.append(net)
    register_hook(unet, _DenoiserHook(state), DENOISER_HOOK)


def _state(model_or_pipe: Any) -> _EPState:
    return hook_state(model_or_pipe, DENOISER_HOOK, "encoder propagation")


def remove_encoder_propagation(model_or_pipe: Any) -> None:
    """Reset and remove every encoder-propagation hook; the model then behaves exactly as before."""
    unet = find_denoiser(model_or_pipe)
    hook = get_hook(unet, DENOISER_HOOK)
    controlnets = hook.state.controlnets if hook is not None else []
    for net in controlnets:
        remove_hooks(net, [CONTROLNET_HOOK])
    remove_hooks(unet, [DENOISER_HOOK, ENCODER_HOOK])


def encoder_propagation_counters(model_or_pipe: Any) -> EncoderPropagationCounters:
    """Counters of the current (or last) generation: encoder passes, decoder passes, key steps, ..."""
    return _state(model_or_pipe).counters


def last_noise_injection(model_or_pipe: Any) -> PriorNoiseInjection | None:
    """The injection callback `cached_call` set up for the last call (None when injection was off)."""
    return _state(model_or_pipe).last_injection
