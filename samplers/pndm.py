"""PNDM family as one drop-in diffusers scheduler (Liu et al., "Pseudo Numerical Methods for Diffusion Models on
Manifolds", ICLR 2022).

(Over 450 lines: one diffusers scheduler class holds the seven methods' plans, their VP and flow forms and the
Time-Shift target hook; the coefficient maths lives in `transfer.py` and `flow.py`.)

Every method is "gradient part + transfer part" (paper §3): a noise estimate `e'` built from model evaluations, then
the transfer map φ (Eq. 11, `transfer.transfer`) moves the state. `num_inference_steps` is the number of
**transitions** N; every model evaluation is its own entry of `timesteps`, so a stock pipeline calls the model
exactly `len(timesteps)` times:

============  ==========================================  ==================  ================
method        transitions                                 NFE = len(ts)       minimum N
============  ==========================================  ==================  ================
ddim          DDIM (Eq. 11 with e' = eps)                 N                   1
pie           pseudo improved Euler every step (Eq. 13)   2N                  1
prk           pseudo Runge-Kutta every step (Eq. 13)      4N                  1
s-pndm        PIE, then 2-step PLMS forever               N + 1               1
f-pndm/plms   3 x PRK, then 4-step PLMS (Alg. 2, Eq. 12)  N + 9               4
plms-ldm      PIE, AB2, AB3, then AB4 (latent-diffusion)  N + 1               1
fon           classical RK4 x 3, then AB4, linear transfer N + 9              4
============  ==========================================  ==================  ================

For ``v_prediction`` every model output is converted to eps at its own (x, t) before entering any combination
(history holds eps). diffusers' PNDM instead combines raw v's and converts once with the transition's source level
and start sample, so for ``plms-ldm``/``f-pndm`` with v-prediction the two differ (for ``ddim`` they agree).

Flow matching (``prediction_type="flow_prediction"``, or `from_config` of a FlowMatch scheduler): the same plans on
FlowMatchEulerDiscreteScheduler's sigma grid (same shift, dynamic shift and terminal options), with the gradient
part on the velocity and the transfer part the exact map of the flow interpolation, `x + (σ' - σ) v`
(`flow.flow_transfer`). That map is linear, so on a flow model the family reduces to classical methods in σ:
``ddim`` is FlowMatch-Euler, ``pie`` is Heun's method, ``prk`` is RK4 and ``f-pndm`` RK4 then 4-step
Adams-Bashforth (``fon`` is the same method there). PRK midpoints sit at `(σ + σ') / 2`.

The Adams-Bashforth weights assume equal spacing; like the original code, LDM and diffusers, they are applied
unchanged on non-uniform grids. With the default config, `plms-ldm` equals diffusers
`PNDMScheduler(skip_prk_steps=True)` and `f-pndm` equals diffusers' PRK mode (same `timesteps`, same outputs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin, SchedulerOutput

from ..core.errors import InputError
from .flow import flow_base_scheduler, flow_transfer, is_flow_config
from .transfer import FINAL, GRID_SPACINGS, epsilon_from_v, make_betas, make_grid, transfer, work_dtype

#: transition kinds per method: (kinds of transitions 1..len-1, kind of every later transition)
_METHODS: dict[str, tuple[tuple[str, ...], str]] = {
    "ddim": ((), "ab1"),
    "pie": ((), "pie"),
    "prk": ((), "prk"),
    "s-pndm": (("pie",), "ab2"),
    "f-pndm": (("prk", "prk", "prk"), "ab4"),
    "plms-ldm": (("pie", "ab2", "ab3"), "ab4"),
    "fon": (("rk4", "rk4", "rk4"), "ab4c"),
}
_ALIASES = {"plms": "f-pndm"}
METHODS: tuple[str, ...] = (*_METHODS, *_ALIASES)
#: fewest transitions each method accepts (F-PNDM/FON: 3 warm-up steps plus at least one multistep step,
#: the same limit as diffusers' PRK mode, which needs 4 grid points)
MIN_TRANSITIONS = {"ddim": 1, "pie": 1, "prk": 1, "s-pndm": 1, "f-pndm": 4, "plms-ldm": 1, "fon": 4}
_EVALS = {"ab1": 1, "ab2": 1, "ab3": 1, "ab4": 1, "ab4c": 1, "pie": 2, "prk": 4, "rk4": 4}
# Adams-Bashforth weights on [e_now, H[-1], H[-2], H[-3]] (PNDM Eq. 12 for order 4; LDM PLMS for 2, 3)
_AB = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def canonical_method(method: str) -> str:
    """`"f_pndm"`, `"F-PNDM"` and `"plms"` all name F-PNDM; unknown names raise `ValueError`."""
    if not isinstance(method, str):
        raise InputError(f"method must be a name (str), got {method!r}; choose one of {', '.join(METHODS)}")
    m = method.lower().replace("_", "-")
    m = _ALIASES.get(m, m)
    if m not in _METHODS:
        raise InputError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return m


def transition_kinds(method: str, num_transitions: int) -> list[str]:
    warm, rest = _METHODS[canonical_method(method)]
    return [warm[k] if k < len(warm) else rest for k in range(num_transitions)]


def nfe_for(method: str, num_transitions: int) -> int:
    """Model calls of `method` for `num_transitions` transitions (N transitions
    cost N model calls for PLMS, N+1 for S-PNDM, N+9 for F-PNDM: three 4-call PRK steps)."""
    return sum(_EVALS[k] for k in transition_kinds(method, num_transitions))


def transitions_for_nfe(method: str, nfe: int) -> int | None:
    """Largest N with `nfe_for(method, N) <= nfe` that the method accepts, or None if even its minimum costs more."""
    m = canonical_method(method)
    best = None
    for n in range(MIN_TRANSITIONS[m], nfe + 1):
        if nfe_for(m, n) > nfe:
            break
        best = n
    return best


@dataclass(frozen=True)
class _Eval:
    """One model evaluation: transition `k` of kind `kind`, stage `stage` within it, evaluated at grid time `at`."""

    k: int
    kind: str
    stage: int
    at: int


class PseudoNumericalScheduler(SchedulerMixin, ConfigMixin):
    """The PNDM family (DDIM, PIE, PRK, S-PNDM, F-PNDM, PLMS-LDM, FON) as a diffusers scheduler.

    Swap into any VP/epsilon or v-prediction pipeline with
    ``pipe.scheduler = PseudoNumericalScheduler.from_config(pipe.scheduler.config, method="f-pndm")``.

    Args:
        method: one of ``ddim``, ``pie``, ``prk``, ``s-pndm``, ``f-pndm`` (alias ``plms``), ``plms-ldm``, ``fon``;
            underscores are accepted (``f_pndm``). See the module docstring for NFE per method.
        timestep_spacing: ``leading`` (+ ``steps_offset``), ``trailing``, ``linspace`` (diffusers grids),
            ``pndm_uniform`` (original PNDM code: ``range(0, T, T // N)``, ``ceil(T / (T // N))`` transitions) or
            ``quad`` (DDIM quadratic grid). Each transition goes to the next grid point; the last one to the final
            level. (diffusers' PNDM/DDIM instead step to ``t - T // N``, which is the same point for ``leading``.)
        set_alpha_to_one: final level is 1 (clean) instead of ``alphas_cumprod[0]``.
        alpha_index_shift: 0 (diffusers, training-consistent) or 1 (reproduce luping-liu/PNDM: the model gets
            ``t`` but the coefficients use ``alphas_cumprod[t + 1]``, final level ``alphas_cumprod[0]``).
        prediction_type: ``epsilon`` or ``v_prediction`` (converted per evaluation to eps before any combination),
            or ``flow_prediction`` (flow matching, see the module docstring; set automatically by `from_config` of a
            FlowMatch scheduler's config).
        shift, use_dynamic_shifting, base_shift, max_shift, base_image_seq_len, max_image_seq_len, shift_terminal,
            time_shift_type: flow matching only; FlowMatchEulerDiscreteScheduler's options, same meaning (its
            `set_timesteps` builds the sigma grid, so both use the same sigmas).
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        method: str = "f-pndm",
        set_alpha_to_one: bool = False,
        prediction_type: Literal["epsilon", "v_prediction"] = "epsilon",
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        alpha_index_shift: int = 0,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float = 0.5,
        max_shift: float = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        shift_terminal: float | None = None,
        time_shift_type: str = "exponential",
    ):
        self._method = canonical_method(method)
        if prediction_type not in ("epsilon", "v_prediction", "flow_prediction"):
            raise InputError(
                f"prediction_type={prediction_type!r} is not supported by PseudoNumericalScheduler; "
                "it must be 'epsilon', 'v_prediction' or 'flow_prediction'"
            )
        self._flow = prediction_type == "flow_prediction"
        # flow matching: FlowMatchEulerDiscreteScheduler with our sigma options makes every sigma grid
        self._flow_grid = flow_base_scheduler(dict(self.config)) if self._flow else None
        if timestep_spacing not in GRID_SPACINGS:
            raise InputError(f"timestep_spacing={timestep_spacing!r} is not supported; choose one of {GRID_SPACINGS}")
        if alpha_index_shift not in (0, 1) or isinstance(alpha_index_shift, bool):
            raise InputError(f"alpha_index_shift must be 0 or 1, got {alpha_index_shift!r}")
        if isinstance(steps_offset, bool) or not isinstance(steps_offset, (int, np.integer)) or steps_offset < 0:
            raise InputError(f"steps_offset must be an integer >= 0, got {steps_offset!r}")
        self.betas = make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        # float64 copies used for every coefficient (values identical to the float32 arrays above)
        self._acp64 = self.alphas_cumprod.to(torch.float64)
        self._final64 = self.final_alpha_cumprod.to(torch.float64)
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps: torch.Tensor | None = None
        self.grid: np.ndarray | None = None  # transition start times; the final target is FINAL (-1)
        self._plan: list[_Eval] = []
        self._begin_index: int | None = None
        self._reset_state()

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs: bool = False, **kwargs):
        """As diffusers' `from_config`; a flow-matching config selects ``prediction_type="flow_prediction"``."""
        cfg = dict(config or {})
        if is_flow_config(cfg) and "prediction_type" not in kwargs:
            kwargs["prediction_type"] = "flow_prediction"
            if cfg.get("use_flow_sigmas") and "flow_shift" in cfg and "shift" not in kwargs:
                kwargs["shift"] = cfg["flow_shift"]  # DPM-Solver/UniPC in flow mode name the shift `flow_shift`
        return super().from_config(cfg, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @property
    def is_flow(self) -> bool:
        """True in flow-matching mode (grid times are sigmas, model outputs velocities)."""
        return self._flow

    # ------------------------------------------------------------------ grid and plan

    @property
    def method(self) -> str:
        return self._method

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at entry `begin_index` of `timesteps` (img2img). Only `ddim` can start mid-trajectory."""
        if begin_index != 0 and self._method != "ddim":
            raise InputError(
                f"method={self._method!r} keeps a warm-up/multistep history and cannot start at timesteps index "
                f"{begin_index}; use method='ddim' for img2img-style partial trajectories"
            )
        self._begin_index = begin_index
        self._counter = begin_index

    def _reset_state(self) -> None:
        self._counter = 0
        self._history: list[torch.Tensor] = []  # first evaluation (eps, or D for fon) of each transition
        self._x_start: torch.Tensor | None = None  # start point of a multi-evaluation transition
        self._stages: list[torch.Tensor] = []  # evaluations of the current transition
        self._target_times: torch.Tensor | None = None  # per-sample target times set by TimeShiftScheduler
        self._target_times_for: int | None = None  # the transition those target times belong to

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        mu: float | None = None,
    ) -> None:
        """Build the transition grid and `timesteps` (one int64 entry per model call); resets all history.

        `timesteps` (optional) gives the transition start times directly (strictly decreasing). Flow matching only:
        `sigmas` and `mu` as FlowMatchEulerDiscreteScheduler takes them (FluxPipeline and SD3 pass them).
        """
        if self._flow:
            self._set_flow_timesteps(num_inference_steps, device, timesteps, sigmas, mu)
            return
        if sigmas is not None or mu is not None:
            raise InputError("`sigmas` and `mu` are flow-matching arguments; this scheduler has a VP config "
                             f"(prediction_type={self.config.prediction_type!r})")
        cfg = self.config
        big_t = cfg.num_train_timesteps
        if timesteps is not None:
            grid = np.asarray(timesteps, dtype=np.int64)
            if grid.ndim != 1 or len(grid) == 0 or (len(grid) > 1 and not np.all(np.diff(grid) < 0)):
                raise InputError("custom `timesteps` must be a non-empty, strictly decreasing list of ints")
            if grid[-1] < 0:
                raise InputError("custom `timesteps` must be >= 0")
            num_inference_steps = len(grid)
        else:
            if num_inference_steps is None:
                raise InputError("pass `num_inference_steps` or `timesteps`")
            num_inference_steps = int(num_inference_steps)
            if not 1 <= num_inference_steps <= big_t:
                raise InputError(
                    f"num_inference_steps={num_inference_steps} must be between 1 and num_train_timesteps={big_t}"
                )
            grid = make_grid(cfg.timestep_spacing, num_inference_steps, big_t, cfg.steps_offset)
        limit = big_t - 1 - cfg.alpha_index_shift
        if grid[0] > limit:
            raise InputError(
                f"the grid starts at t={int(grid[0])} but with steps_offset={cfg.steps_offset} and "
                f"alpha_index_shift={cfg.alpha_index_shift} model times must be <= {limit} "
                f"(num_train_timesteps={big_t}); use fewer steps or a smaller offset"
            )
        self._build_plan(num_inference_steps, grid)
        ts = np.array([max(e.at, 0) for e in self._plan], dtype=np.int64)  # the final level is fed as t = 0
        self.timesteps = torch.from_numpy(ts).to(device)

    def _set_flow_timesteps(self, num_inference_steps, device, timesteps, sigmas, mu) -> None:
        fg = self._flow_grid
        fg.set_timesteps(num_inference_steps, device="cpu", sigmas=sigmas, mu=mu, timesteps=timesteps)
        self.sigmas = fg.sigmas.clone()  # float32, N + 1 entries ending at the terminal level (0)
        sig = self.sigmas.to(torch.float64).numpy()
        self._flow_final = float(sig[-1])
        self._build_plan(len(sig) - 1, sig[:-1])
        # model input t = T σ in float32, computed as FlowMatchEulerDiscreteScheduler computes its timesteps
        at = torch.tensor([e.at for e in self._plan], dtype=torch.float64).to(torch.float32)
        self.timesteps = (at * self.config.num_train_timesteps).to(device)

    def _build_plan(self, num_inference_steps: int, grid: np.ndarray) -> None:
        need = MIN_TRANSITIONS[self._method]
        if len(grid) < need:
            raise InputError(
                f"method={self._method!r} needs at least {need} transitions (num_inference_steps >= {need}); "
                f"got {len(grid)}"
            )
        self.num_inference_steps = num_inference_steps
        self.grid = grid
        self._plan = []
        # on a flow model FON's linear transfer is the flow map itself: FON and F-PNDM are the same method
        method = "f-pndm" if self._flow and self._method == "fon" else self._method
        for k, kind in enumerate(transition_kinds(method, len(grid))):
            src, tgt = self._source(k), self._target(k)
            mid = self._mid(src, tgt)
            points = {1: [src], 2: [src, tgt], 4: [src, mid, mid, tgt]}[_EVALS[kind]]
            self._plan += [_Eval(k, kind, s, p) for s, p in enumerate(points)]
        self._begin_index = None
        self._reset_state()

    def _source(self, k: int):
        return float(self.grid[k]) if self._flow else int(self.grid[k])

    def _target(self, k: int):
        if self._flow:
            return float(self.grid[k + 1]) if k + 1 < len(self.grid) else self._flow_final
        return int(self.grid[k + 1]) if k + 1 < len(self.grid) else FINAL

    def _mid(self, src, tgt):
        """PRK midpoint: (σ + σ') / 2 on a flow grid; diffusers' `lower + r // 2` on integer times (= (t + t') / 2
        for even strides). Works per sample on tensors."""
        return (src + tgt) / 2 if self._flow else tgt + (src - tgt) // 2

    def _move(self, x: torch.Tensor, e: torch.Tensor, a, a_next) -> torch.Tensor:
        """The transfer part: PNDM's φ (Eq. 11) between VP levels, or the flow map between sigmas."""
        return flow_transfer(x, e, a, a_next) if self._flow else transfer(x, e, a, a_next)

    def _level(self, t: torch.Tensor | int | float) -> torch.Tensor:
        """Noise level `alphas_cumprod[t + alpha_index_shift]`; indices below 0 give the final level.
        On a flow grid times are sigmas and the level is σ itself."""
        if self._flow:
            return torch.as_tensor(t, dtype=torch.float64)
        idx = torch.as_tensor(t, dtype=torch.int64) + self.config.alpha_index_shift
        safe = idx.clamp(min=0)
        return torch.where(idx >= 0, self._acp64[safe], self._final64)

    # ------------------------------------------------------------------ hooks for TimeShiftScheduler

    def next_evaluation(self) -> tuple[int, int, int | float, int | float]:
        """`(transition, stage, source_time, nominal_target_time)` of the next `step()` call (sigmas on a flow grid)."""
        e = self._plan[self._counter]
        return e.k, e.stage, self._source(e.k), self._target(e.k)

    def set_target_times(self, target_times: torch.Tensor | None) -> None:
        """Per-sample target times for the transition about to start (Time-Shift
        "target" mode, see `samplers.time_shift`)."""
        if self._method == "fon" and not self._flow and target_times is not None:
            raise InputError("method='fon' uses a linear transfer; Time-Shift target shifting is not defined for it")
        self._target_times = target_times
        self._target_times_for = self._plan[self._counter].k if self._counter < len(self._plan) else None

    # ------------------------------------------------------------------ stepping

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        return sample

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
        **kwargs,
    ) -> SchedulerOutput | tuple:
        """One model evaluation's worth of update. Extra pipeline kwargs (eta, generator, ...) are ignored:
        every PNDM-family method is deterministic."""
        if self.num_inference_steps is None:
            raise InputError("call `set_timesteps` before `step`")
        if self._counter >= len(self._plan):
            raise InputError(
                f"step() called {self._counter + 1} times but this trajectory has {len(self._plan)} model "
                "evaluations; call `set_timesteps` again to start a new one"
            )
        ev = self._plan[self._counter]
        expected = float(self.timesteps[self._counter])
        if abs(float(timestep) - expected) > (1e-3 if self._flow else 0.0):
            raise InputError(
                f"step() got timestep {float(timestep):g} but entry {self._counter} of `timesteps` is {expected:g}; "
                "multistep/multi-stage methods must be stepped through `timesteps` in order"
            )
        src, tgt = self._source(ev.k), self._target(ev.k)
        if self.config.prediction_type == "v_prediction":
            model_output = epsilon_from_v(model_output, sample, self._level(ev.at))
        if self._target_times is not None and self._target_times_for != ev.k:
            self._target_times = None  # a shift set for an earlier transition never leaks into this one
        a_src = self._level(src)
        if self._target_times is not None:
            tt = self._target_times.to(torch.float64 if self._flow else torch.int64).cpu()
            a_tgt, a_mid = self._level(tt), self._level(self._mid(src, tt))
        else:
            a_tgt, a_mid = self._level(tgt), self._level(self._mid(src, tgt))
        prev = self._dispatch(ev, model_output, sample, src, tgt, a_src, a_mid, a_tgt)
        self._counter += 1
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev)

    def _dispatch(self, ev, e, x, src, tgt, a_src, a_mid, a_tgt) -> torch.Tensor:
        kind, stage = ev.kind, ev.stage
        if kind.startswith("ab") and kind != "ab4c":
            # PLMS (PNDM Eq. 12) and its lower-order variants, then the transfer φ (Eq. 11)
            e_prime = self._adams_bashforth(e, int(kind[2]))
            self._push(e)
            return self._move(x, e_prime, a_src, a_tgt)
        if kind == "pie":
            # pseudo improved Euler (PNDM Eq. 13, 2nd order): predictor, then the mean slope from the start point
            if stage == 0:
                return self._first_stage(e, x, a_src, a_tgt)
            e_prime = (self._stages[0].to(work_dtype(x)) + e.to(work_dtype(x))) / 2
            return self._move(self._x_start, e_prime, a_src, a_tgt)
        if kind == "prk":
            # pseudo Runge-Kutta (PNDM Eq. 13): every stage is transferred from the start point x_t
            if stage == 0:
                return self._first_stage(e, x, a_src, a_mid)
            self._stages.append(e)
            if stage == 1:
                return self._move(self._x_start, e, a_src, a_mid)
            if stage == 2:
                return self._move(self._x_start, e, a_src, a_tgt)
            dt = work_dtype(x)
            e1, e2, e3, e4 = (s.to(dt) for s in self._stages)
            return self._move(self._x_start, (e1 + 2 * e2 + 2 * e3 + e4) / 6, a_src, a_tgt)
        return self._classical(ev, e, x, src, tgt, a_src)

    def _first_stage(self, e: torch.Tensor, x: torch.Tensor, a_src, a_to) -> torch.Tensor:
        """Stage 0 of a multi-stage step (PIE, PRK): remember the start point and its slope, transfer from it."""
        self._x_start = x
        self._stages = [e]
        self._push(e)
        return self._move(x, e, a_src, a_to)

    def _adams_bashforth(self, e: torch.Tensor, order: int) -> torch.Tensor:
        if order == 1:
            return e
        if len(self._history) < order - 1:
            raise RuntimeError(f"internal: AB{order} needs {order - 1} past evaluations")
        dt = work_dtype(e)
        w = _AB[order]
        out = w[0] * e.to(dt)
        for j in range(1, order):
            out = out + w[j] * self._history[-j].to(dt)
        return out

    def _push(self, e: torch.Tensor) -> None:
        self._history = [*self._history[-2:], e]

    def _classical(self, ev, e, x, src, tgt, a_src) -> torch.Tensor:
        """FON: classical RK4 then 4-step Adams-Bashforth with a *linear* transfer x + h * D (PNDM §4, "FON").

        The derivative is the one-training-step DDIM difference D = φ(x_t, e; t -> t-1) - x_t of the original
        code; in the RK stages only eps comes from the stage point, the linear part stays at x_t.
        """
        h = float(src - tgt)
        a_down = self._level(src - 1)
        if ev.kind == "ab4c":
            d = transfer(x, e, a_src, a_down) - x
            w = _AB[4]
            dt = work_dtype(x)
            slope = w[0] * d.to(dt) + sum(w[j] * self._history[-j].to(dt) for j in range(1, 4))
            self._push(d)
            return (x.to(dt) + h * slope).to(x.dtype)
        if ev.stage == 0:
            self._x_start = x
        x0 = self._x_start
        d = transfer(x0, e, a_src, a_down) - x0
        if ev.stage == 0:
            self._stages = [d]
            self._push(d)
        else:
            self._stages.append(d)
        if ev.stage < 2:
            return x0 + (h / 2) * d
        if ev.stage == 2:
            return x0 + h * d
        d1, d2, d3, d4 = self._stages
        return x0 + h * (d1 + 2 * d2 + 2 * d3 + d4) / 6

    # ------------------------------------------------------------------ diffusers utilities

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """Forward process q(x_t | x_0) (DDPM Eq. 4) with per-sample `timesteps`, as `DDPMScheduler.add_noise`;
        on a flow model the interpolation `(1 - σ) x0 + σ ε` with `σ = timesteps / T`."""
        if self._flow:
            shape = (-1,) + (1,) * (original_samples.ndim - 1)
            sig = (timesteps.to(original_samples.device, torch.float32) / self.config.num_train_timesteps)
            sig = sig.flatten().reshape(shape).to(original_samples.dtype)
            return (1 - sig) * original_samples + sig * noise
        acp = self.alphas_cumprod.to(device=original_samples.device, dtype=original_samples.dtype)
        a = acp[timesteps.to(original_samples.device)].flatten()
        shape = (-1,) + (1,) * (original_samples.ndim - 1)
        return a.sqrt().reshape(shape) * original_samples + (1 - a).sqrt().reshape(shape) * noise

    def __len__(self) -> int:
        return self.config.num_train_timesteps
