"""Time-Shift sampler (Li et al., "Alleviating Exposure Bias in Diffusion Models through Sampling with Shifted Time
Steps", ICLR 2024) as a wrapper around any VP diffusers scheduler.

Selection rule (paper Alg. 3 / Thm. 3.1): for each sample, take the time in a window whose marginal
noise variance `1 - A[τ]` is closest to the sample's own variance. Default "target" mode (the committed
TS-DPM `PNMSolver` code behind the paper's Table 1): from the second transition on, while the nominal target time
exceeds `cutoff`, the transition lands on level `A[s]` instead of `A[j]`, with `s` chosen from the variance of the
incoming state in a window centred on the nominal target `j`. The model is always called at nominal times, so it
works inside stock pipelines; history is unchanged.

How the target is moved:

* `PseudoNumericalScheduler` base: natively (its transfers use `A[s]`, PRK stage targets included) — equals
  TS-DPM for DDIM, S-PNDM and the PLMS part of F-PNDM. F-PNDM's shifted PRK warm-up transitions keep the stage
  *model times* nominal (a pipeline feeds precomputed times); TS-DPM moves them to `(t+s)/2` and `s`.
* diffusers DDIM / DDPM / DPM-Solver(++) multistep / UniPC / DEIS: the base step's output `x_j` is moved along the
  DDIM ray through `(x_i, x_j)` (the unique eps, x0 pair consistent with both points) to level `A[s]`. Exact for
  DDIM; for DPM-Solver++ it equals a step to `s` with the same data estimate. For DDPM the injected noise rides
  along the ray. UniPC's corrector recomputes the state from the previous sample at the next step, so there the
  shift mostly acts on the model input of the next call.

`window=0` (or `cutoff >= num_train_timesteps - 1`) is an exact no-op.

Flow-matching bases (`FlowMatchEulerDiscreteScheduler`, `PseudoNumericalScheduler` in flow mode, DPM-Solver++ and
UniPC with ``use_flow_sigmas``): the same rule restated on σ (samplers/README.md): the window holds the training
levels `σ_τ = τ / T` within `h` training steps of the nominal target, each sample takes the one whose noise
variance `σ_τ²` is closest to its own variance, and the step lands there along the flow's straight ray
(`flow.select_shift_flow`). `cutoff` stays in training steps (`T σ`).
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin, SchedulerOutput

from ..core.errors import InputError
from ..core.schedulers import TIME_SHIFT_BASES
from .flow import is_flow_scheduler, select_shift_flow
from .loop import sample
from .pndm import PseudoNumericalScheduler
from .transfer import transfer, transfer_coefficients

#: base classes the wrapper understands (single-evaluation VP schedulers, plus our PNDM family): the capability
#: table's Time-Shift column
SUPPORTED_BASES = TIME_SHIFT_BASES
_SIGMA_BASES = ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler")


def select_shift(
    sample: torch.Tensor,
    center: int,
    window: int,
    alphas_cumprod: torch.Tensor,
    halfwidth_rule: str = "floor_half",
) -> torch.Tensor:
    """Per-sample shifted time (paper Alg. 3): argmin over τ in the window of `(var(x_b) - (1 - A[τ]))^2`.

    `var` is the unbiased variance of all entries of each sample, in float32; the window is
    `[max(0, c - h), min(T - 1, c + h)]` with `h = window // 2` (``floor_half``) or `window` (``full``, the DEIS
    wrapper); ties go to the smallest τ. Returns an int64 tensor of shape (B,) on CPU.
    """
    h = window // 2 if halfwidth_rule == "floor_half" else window
    big_t = len(alphas_cumprod)
    lo, hi = max(0, center - h), min(big_t - 1, center + h)
    cand = torch.arange(lo, hi + 1, dtype=torch.int64)
    var = sample.detach().to(torch.float32).flatten(1).var(dim=1).cpu().to(torch.float64)
    levels = 1 - alphas_cumprod.detach().cpu().to(torch.float64)[cand]
    # torch.argmin returns the first minimal index, i.e. the smallest τ on ties
    return cand[((var[:, None] - levels[None, :]) ** 2).argmin(dim=1)]


def _levels_by_time(base: SchedulerMixin) -> torch.Tensor:
    """``alphas_cumprod`` indexed by the model time a step lands on: a PNDM base with ``alpha_index_shift = 1``
    (the original PNDM code) sits at level ``A[τ + 1]`` for time τ, so its table starts one later and
    the last reachable time is ``T − 2``."""
    acp = base.alphas_cumprod
    if isinstance(base, PseudoNumericalScheduler):
        return acp[int(base.config.alpha_index_shift):]
    return acp


def _resolve_class(name: str) -> type:
    if name == "PseudoNumericalScheduler":
        return PseudoNumericalScheduler
    if name not in SUPPORTED_BASES:
        raise InputError(
            f"TimeShiftScheduler cannot wrap {name!r}; supported base schedulers: {', '.join(SUPPORTED_BASES)}"
        )
    return getattr(importlib.import_module("diffusers"), name)


def _infer_class_name(cfg: dict[str, Any]) -> str:
    """The supported scheduler whose constructor arguments all appear in the config (configs built in code carry
    no `_class_name`; a config also keeps foreign keys it was converted from, so match by inclusion and prefer the
    class with the most arguments)."""
    keys = {k for k in cfg if not k.startswith("_")}
    params = {n: set(inspect.signature(_resolve_class(n).__init__).parameters) - {"self"} for n in SUPPORTED_BASES}
    hits = sorted((n for n in SUPPORTED_BASES if params[n] <= keys), key=lambda n: -len(params[n]))
    if not hits or (len(hits) > 1 and len(params[hits[0]]) == len(params[hits[1]])):
        raise InputError(
            "cannot tell which scheduler this config belongs to; pass base_class=<one of "
            f"{', '.join(SUPPORTED_BASES)}> or use TimeShiftScheduler.wrap(scheduler, ...)"
        )
    return hits[0]


def _json_clean(cfg: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in cfg.items():
        if k.startswith("_"):
            continue
        if isinstance(v, np.ndarray | torch.Tensor):
            v = v.tolist()
        elif isinstance(v, tuple):
            v = list(v)
        out[k] = v
    return out


class TimeShiftScheduler(SchedulerMixin, ConfigMixin):
    """Wrap a scheduler with the Time-Shift sampler. Swap into a pipeline with
    ``pipe.scheduler = TimeShiftScheduler.from_config(pipe.scheduler.config, window=30, cutoff=300)`` (keeps the
    pipeline's scheduler as base) or ``TimeShiftScheduler.wrap(PseudoNumericalScheduler(...), window=...)``.

    Args:
        base_class: class name of the wrapped scheduler (see `SUPPORTED_BASES`).
        base_config: its config (saved with `save_pretrained`, so a round trip rebuilds the same base).
        window: window size `w`; 0 disables shifting (exact no-op).
        cutoff: shift only transitions whose nominal target time is strictly above this time.
        halfwidth_rule: ``floor_half`` (h = w // 2, Table-1 code) or ``full`` (h = w, DEIS wrapper).
        variance_source: ``sample`` (the incoming state, Table-1 code) or ``model_output`` (the official
            DPM-Solver wrapper measures the variance of the model output).
        num_train_timesteps: copied from the base scheduler (a different value is an error); kept in this
            config so code that reads `scheduler.config.num_train_timesteps` sees the training schedule's T.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]

    @register_to_config
    def __init__(
        self,
        base_class: str = "DDIMScheduler",
        base_config: dict[str, Any] | None = None,
        window: int = 0,
        cutoff: int = 1000,
        halfwidth_rule: str = "floor_half",
        variance_source: str = "sample",
        num_train_timesteps: int | None = None,
    ):
        if window < 0:
            raise InputError(f"window must be >= 0, got {window}")
        if halfwidth_rule not in ("floor_half", "full"):
            raise InputError(f"halfwidth_rule must be 'floor_half' or 'full', got {halfwidth_rule!r}")
        if variance_source not in ("sample", "model_output"):
            raise InputError(f"variance_source must be 'sample' or 'model_output', got {variance_source!r}")
        base_cls = _resolve_class(base_class)
        self.base = base_cls.from_config(dict(base_config or {}))
        self._check_base(self.base)
        # Mirror the base's T in our own config: pipelines and hooks read `scheduler.config.num_train_timesteps`.
        base_t = int(self.base.config.num_train_timesteps)
        if num_train_timesteps is not None and int(num_train_timesteps) != base_t:
            raise InputError(f"num_train_timesteps={num_train_timesteps} disagrees with the base scheduler's "
                             f"{base_t}; leave it unset (it is copied from the base)")
        for name, v in (("window", window), ("cutoff", cutoff)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise InputError(f"{name} must be an integer (a number of training time steps), got {v!r}")
        if window > base_t:  # a search window wider than the whole schedule can land anywhere: not a time shift
            raise InputError(f"window must be in [0, num_train_timesteps = {base_t}], got {window}")
        if not 0 <= cutoff <= base_t:
            raise InputError(f"cutoff must be in [0, num_train_timesteps = {base_t}] (shift only while the target "
                             f"time is above it; >= {base_t - 1} turns Time-Shift off), got {cutoff}")
        self.register_to_config(num_train_timesteps=base_t)
        self._k = 0  # transitions completed (generic bases: one step() call each)
        self.last_shift: torch.Tensor | None = None  # per-sample target times chosen at the latest step

    @staticmethod
    def _check_base(base: SchedulerMixin) -> None:
        name = type(base).__name__
        if name not in SUPPORTED_BASES:
            raise InputError(f"TimeShiftScheduler cannot wrap {name}; supported: {', '.join(SUPPORTED_BASES)}")
        if is_flow_scheduler(base):
            if name not in ("FlowMatchEulerDiscreteScheduler", "PseudoNumericalScheduler", *_SIGMA_BASES[:2]):
                raise InputError(f"TimeShiftScheduler has no flow-matching rule for {name}")
            if base.config.get("stochastic_sampling", False):
                raise InputError("TimeShiftScheduler needs a deterministic flow sampler (stochastic_sampling=False)")
            return
        pred = base.config.get("prediction_type", "epsilon")
        if pred not in ("epsilon", "v_prediction"):
            raise InputError(f"TimeShiftScheduler needs an epsilon or v_prediction base, got prediction_type={pred!r}")

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs: bool = False, **kwargs):
        """From a TimeShiftScheduler config, or from any supported scheduler's config (that scheduler becomes the
        base; pass ``base_class=`` to pick another base and ``base_kwargs={...}`` to override its config)."""
        cfg = dict(config or {})
        if cfg.get("_class_name") == cls.__name__ or "base_config" in cfg:
            return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)
        name = kwargs.pop("base_class", None) or cfg.get("_class_name") or _infer_class_name(cfg)
        base_cls = _resolve_class(name)
        base = base_cls.from_config(config, **kwargs.pop("base_kwargs", {}))
        obj = cls.wrap(base, **kwargs)
        return (obj, {}) if return_unused_kwargs else obj

    @classmethod
    def wrap(cls, base: SchedulerMixin, **ts_kwargs) -> TimeShiftScheduler:
        """Wrap a scheduler: a fresh base is built from `base`'s config (constructor keys only; runtime state such
        as an earlier `set_timesteps` is not carried over)."""
        name = type(base).__name__
        params = set(inspect.signature(_resolve_class(name).__init__).parameters)
        config = {k: v for k, v in _json_clean(dict(base.config)).items() if k in params}
        return cls(base_class=name, base_config=config, **ts_kwargs)

    # ------------------------------------------------------------------ delegation

    def __getattr__(self, name: str) -> Any:
        base = self.__dict__.get("base")
        if base is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(base, name)

    @property
    def timesteps(self) -> torch.Tensor:
        return self.base.timesteps

    @property
    def init_noise_sigma(self) -> float:
        return self.base.init_noise_sigma

    @property
    def order(self) -> int:
        return self.base.order

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      timesteps: list | None = None, sigmas: list | None = None, mu: float | None = None,
                      **kwargs) -> None:
        """The base's `set_timesteps`; `sigmas` and `mu` (flow pipelines pass them) go through when given."""
        extra = {k: v for k, v in dict(timesteps=timesteps, sigmas=sigmas, mu=mu).items() if v is not None}
        self.base.set_timesteps(num_inference_steps, device, **extra, **kwargs)
        self._k = 0
        self.last_shift = None

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        return self.base.scale_model_input(sample, timestep)

    def add_noise(self, original_samples, noise, timesteps):
        return self.base.add_noise(original_samples, noise, timesteps)

    def __len__(self) -> int:
        return len(self.base)

    # ------------------------------------------------------------------ stepping

    def _active(self) -> bool:
        big_t = self.base.config.num_train_timesteps
        return self.config.window > 0 and self.config.cutoff < big_t - 1

    @property
    def is_flow(self) -> bool:
        return is_flow_scheduler(self.base)

    def _select(self, sample: torch.Tensor, model_output: torch.Tensor, center: int | float) -> torch.Tensor:
        """Shifted targets: training times (VP) or sigmas (flow; `center` is then a sigma)."""
        src = model_output if self.config.variance_source == "model_output" else sample
        if self.is_flow:
            return select_shift_flow(src, center, self.config.window, self.base.config.num_train_timesteps,
                                     self.config.halfwidth_rule)
        return select_shift(src, center, self.config.window, _levels_by_time(self.base), self.config.halfwidth_rule)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
        eta: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        **kwargs,
    ) -> SchedulerOutput | tuple:
        """Base step with the target level moved to the variance-matched time (see module docstring).
        `eta`, `generator` and other kwargs are forwarded when the base's `step` accepts them."""
        if eta is not None:
            kwargs["eta"] = eta
        if generator is not None:
            kwargs["generator"] = generator
        params = inspect.signature(self.base.step).parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            kwargs = {k: v for k, v in kwargs.items() if k in params}
        if isinstance(self.base, PseudoNumericalScheduler):
            return self._step_pndm(model_output, timestep, sample, return_dict, kwargs)
        return self._step_generic(model_output, timestep, sample, return_dict, kwargs)

    def _step_pndm(self, model_output, timestep, sample, return_dict, kwargs):
        base: PseudoNumericalScheduler = self.base
        if self._active() and base.num_inference_steps is not None and base._counter < len(base._plan):
            k, stage, _, tgt = base.next_evaluation()
            if stage == 0:
                shift = None
                tgt_time = tgt * base.config.num_train_timesteps if base.is_flow else tgt
                if k >= 1 and tgt_time > self.config.cutoff:  # never the first transition; cutoff strict, nominal
                    shift = self._select(sample, model_output, tgt)
                base.set_target_times(shift)
                self.last_shift = shift
        return base.step(model_output, timestep, sample, return_dict=return_dict, **kwargs)

    def _levels(self, timestep: int) -> tuple[float, float, int]:
        """(A at the source, A at the nominal target, nominal target time) of the generic base's next step."""
        base = self.base
        name = type(base).__name__
        if name in _SIGMA_BASES:
            k = self._k
            s_i, s_j = float(base.sigmas[k]), float(base.sigmas[k + 1])
            tgt = int(base.timesteps[k + 1]) if k + 1 < len(base.timesteps) else -1
            return 1 / (1 + s_i**2), 1 / (1 + s_j**2), tgt
        acp = base.alphas_cumprod
        if name == "DDPMScheduler":
            tgt = int(base.previous_timestep(timestep))
            final = 1.0
        else:  # DDIM: diffusers steps to t - T // N
            tgt = timestep - base.config.num_train_timesteps // base.num_inference_steps
            final = float(base.final_alpha_cumprod)
        return float(acp[timestep]), (float(acp[tgt]) if tgt >= 0 else final), tgt

    def _step_generic(self, model_output, timestep, sample, return_dict, kwargs):
        if self.is_flow:
            return self._step_flow(model_output, timestep, sample, return_dict, kwargs)
        t = int(timestep)
        shift = None
        if self._active() and self._k >= 1:
            a_i, a_j, tgt = self._levels(t)
            if tgt > self.config.cutoff:
                shift = self._select(sample, model_output, tgt)
        out = self.base.step(model_output, timestep, sample, return_dict=True, **kwargs)
        prev = out.prev_sample
        if shift is not None:
            moved = shift != tgt
            if bool(moved.any()) and a_i != a_j:
                prev = self._along_ray(sample, prev, a_i, a_j, shift, moved)
        return self._finish(out, prev, shift, return_dict)

    def _step_flow(self, model_output, timestep, sample, return_dict, kwargs):
        """Generic flow base: the base step lands on σ_j; move it along the straight ray through (x_i, x_j) to the
        shifted σ_s: x_s = x_i + (σ_s - σ_i) / (σ_j - σ_i) (x_j - x_i) (the flow map with the step's own velocity)."""
        base = self.base
        s_i, s_j = float(base.sigmas[self._k]), float(base.sigmas[self._k + 1])
        shift = None
        if self._active() and self._k >= 1 and s_j * base.config.num_train_timesteps > self.config.cutoff:
            shift = self._select(sample, model_output, s_j)
        out = base.step(model_output, timestep, sample, return_dict=True, **kwargs)
        prev = out.prev_sample
        if shift is not None and s_i != s_j:
            dt = torch.float64 if sample.dtype == torch.float64 else torch.float32
            ratio = ((shift - s_i) / (s_j - s_i)).reshape(-1, *([1] * (sample.ndim - 1)))
            x_i = sample.to(dt)
            prev = (x_i + ratio.to(sample.device, dt) * (prev.to(dt) - x_i)).to(prev.dtype)
        return self._finish(out, prev, shift, return_dict)

    def _finish(self, out: Any, prev: torch.Tensor, shift: torch.Tensor | None, return_dict: bool) -> Any:
        """Record the step's shift, advance the step index and return the (moved) sample in the base's output."""
        self.last_shift = shift
        self._k += 1
        if not return_dict:
            return (prev,)
        out.prev_sample = prev
        return out

    def _along_ray(self, x_i, x_j, a_i: float, a_j: float, shift: torch.Tensor, moved: torch.Tensor):
        """Move `x_j` (level a_j) to level A[shift] along the DDIM ray through (x_i, x_j): solve
        x_j = φ(x_i, e; a_i -> a_j) for e, then return φ(x_i, e; a_i -> A[shift]) (PNDM Eq. 11)."""
        a_i64, a_j64 = torch.tensor(a_i, dtype=torch.float64), torch.tensor(a_j, dtype=torch.float64)
        c_x, c_e = transfer_coefficients(a_i64, a_j64)
        dt = torch.float64 if x_i.dtype == torch.float64 else torch.float32
        e_eff = (float(c_x) * x_i.to(dt) - x_j.to(dt)) / float(c_e)
        a_s = self.base.alphas_cumprod.to(torch.float64)[shift]
        x_s = transfer(x_i.to(dt), e_eff, a_i64, a_s)
        mask = moved.to(x_j.device).reshape(-1, *([1] * (x_j.ndim - 1)))
        return torch.where(mask, x_s.to(x_j.dtype), x_j)


@torch.no_grad()
def sample_time_shift_paper(
    model,
    x: torch.Tensor,
    scheduler: PseudoNumericalScheduler,
    num_inference_steps: int,
    window: int,
    cutoff: int,
    *,
    coeffs: str = "shifted",
    halfwidth_rule: str = "floor_half",
    callback=None,
) -> torch.Tensor:
    """TS-DDIM with the paper's *model-time* shift (Li et al. 2024, Algorithm 3), on `loop.sample`.

    A stock pipeline cannot do this: the model must be called at a per-sample time `t_s`, so `model(x, t)` here
    receives an int64 tensor of shape (B,). Per transition with nominal source `t` and target `t'`:
    `e = model(x, t_in)` with `t_in = t_s` if set else `t`; `x' = φ(x, e; A[t_in] -> A[t'])` (``coeffs="shifted"``)
    or `A[t] -> A[t']` (``"nominal"``, as the official DEIS wrapper); then, if `t > cutoff`, `t_s` is chosen from
    `var(x')` in a window centred on `t'` (our reading of Alg. 3 for strided grids: the produced state's own
    nominal time), otherwise cleared. The first transition always uses the nominal time. `callback` gets a dict
    with `k`, `x`, `t_in` after every transition.
    """
    if scheduler.is_flow:
        raise InputError("sample_time_shift_paper is Algorithm 3 on a variance-preserving schedule (it feeds the "
                         "model shifted integer times and alphas_cumprod levels); this scheduler is in flow-matching "
                         "mode: wrap it in TimeShiftScheduler instead (target shift, restated on sigma)")
    if scheduler.method != "ddim":
        raise InputError("sample_time_shift_paper implements Algorithm 3 for DDIM; build the scheduler with "
                         "method='ddim'")
    if coeffs not in ("shifted", "nominal"):
        raise InputError(f"coeffs must be 'shifted' or 'nominal', got {coeffs!r}")
    scheduler.set_timesteps(num_inference_steps, device=x.device)
    stepper = _ModelTimeShiftStep(scheduler, x.shape[0], window, cutoff, coeffs, halfwidth_rule)

    def report(info: dict[str, Any]) -> None:
        callback({"k": info["i"], "x": info["x"], "t_in": stepper.used_t_in})

    return sample(lambda x, t: model(x, stepper.t_in.to(x.device)), x, scheduler.grid,
                  callback=None if callback is None else report, scheduler=stepper)


class _ModelTimeShiftStep:
    """Algorithm 3's transition as a `loop.sample` scheduler: the model was called at `t_in` (per sample), φ moves
    x from A[t_in] (or A[t]) to A[t']; then the next transition's `t_in` is chosen from the new state."""

    def __init__(self, scheduler: PseudoNumericalScheduler, batch: int, window: int, cutoff: int, coeffs: str,
                 halfwidth_rule: str) -> None:
        self.base, self.window, self.cutoff, self.coeffs, self.halfwidth_rule = (
            scheduler, window, cutoff, coeffs, halfwidth_rule)
        self.k = 0
        self.t_in = self.used_t_in = torch.full((batch,), int(scheduler.grid[0]), dtype=torch.int64)

    def step(self, e: torch.Tensor, t: Any, x: torch.Tensor, return_dict: bool = True) -> SchedulerOutput:
        base, t_in = self.base, self.t_in
        tgt = base._target(self.k)
        if base.config.prediction_type == "v_prediction":
            from .transfer import epsilon_from_v

            e = epsilon_from_v(e, x, base._level(t_in))
        a_src = base._level(t_in) if self.coeffs == "shifted" else base._level(int(t))
        x = transfer(x, e, a_src, base._level(tgt))
        self.used_t_in = t_in
        if self.window > 0 and int(t) > self.cutoff and tgt >= 0:
            self.t_in = select_shift(x, tgt, self.window, _levels_by_time(base), self.halfwidth_rule)
        else:
            self.t_in = torch.full((x.shape[0],), max(tgt, 0), dtype=torch.int64)
        self.k += 1
        return SchedulerOutput(prev_sample=x)
