"""Calibrating a cache plan for a target speed-up (or a fidelity floor), from measured reuse errors.

(Over 450 lines: recording, error measurement, weighting, the dynamic programme and the report are the steps of
one method for two plan kinds, UNet branch reuse and DiT unit plans, and read best in order.)

`calibrate_unet(pipe, prompts, target_speedup=2.0)` returns a `BranchReusePlan` for a UNet pipeline and a report of
the plan's measured FLOPs ratio and paired fidelity. How (diffaccel's method; the error model is ours):

1. **Record** the plain trajectory on the calibration prompts and seeds: the UNet's inputs at every step.
2. **Measure** the reuse error e(s, k, a): replay step s - a fully (filling the caches), then step s with row kind
   k (recompute skip branches 0..c and reuse the deeper ones, DeepCache-style; or reuse everything), and take the
   mean squared difference of the guided noise prediction from the full one at step s. Teacher forcing on the
   plain trajectory: every row kind at every step and cache age a = 1..max_age costs one UNet call.
3. **Weigh** each step's error by how much an error in the noise prediction at step s moves the final sample
   under DDIM: w_s = |d x_prev / d eps| * sqrt(alpha_bar_final / alpha_bar_prev) (eta = 0 update; the later steps
   treated as a linear map). The plan minimises sum_s w_s^2 e(s, k_s, a_s), errors taken as independent.
4. **Choose** rows by dynamic programming over (step, cache age) with a Lagrange multiplier on FLOPs, bisected
   until the plan's FLOPs ratio (per-row FLOPs counted with `core.flops.flop_counter`) reaches the target.
5. **Check**: sample the calibration prompts with the plan and report the measured whole-call FLOPs ratio and
   paired PSNR / SSIM against the plain images (`evals.paired_fidelity`).

With `min_psnr` instead of a target speed-up, the largest target whose checked PSNR stays above the floor is
found by bisection over targets (each probe runs steps 4-5).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.families import find_denoiser
from ..core.flops import flop_counter
from ..core.hooks import get_hook, reset_caches
from .branch_reuse import (
    STEP_HOOK,
    BranchReusePlan,
    apply_branch_reuse,
    remove_branch_reuse,
    unet_units,
)


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[calibrate] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------------
# row kinds


def cut_row(units, cut: int) -> torch.Tensor:
    """Recompute skip branches 0..cut (both ends), reuse the deeper branches and the mid block; cut = -1 reuses
    every unit (the previous step's prediction is handed out again, only conv_out and the embeddings run)."""
    return torch.tensor([u.side != "mid" and u.branch <= cut for u in units])


def row_kinds(unet) -> dict[str, torch.Tensor]:
    units = unet_units(unet)
    r_total = (len(units) - 1) // 2
    kinds = {"reuse-all": cut_row(units, -1)}
    for c in range(r_total - 1):
        kinds[f"cut{c}"] = cut_row(units, c)
    return kinds


# ----------------------------------------------------------------------------------------------------------------------
# recording and measuring


@dataclass
class Trajectory:
    """The UNet inputs of every step of the plain run (CPU copies), the timesteps and the guidance scale."""

    calls: list[tuple[tuple, dict]]
    timesteps: list[float]
    guidance_scale: float


def _detach(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _detach(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_detach(v) for v in obj)
    return obj


@torch.no_grad()
def record_trajectory(pipe, call_kwargs: dict[str, Any]) -> tuple[Trajectory, Any]:
    """Run the plain pipeline once, recording every UNet call's inputs; returns (trajectory, pipeline output)."""
    unet = find_denoiser(pipe)
    calls: list[tuple[tuple, dict]] = []

    def pre(module, args, kwargs):
        calls.append((_detach(args), _detach(kwargs)))

    handle = unet.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        out = pipe(**call_kwargs)
    finally:
        handle.remove()
    ts = [float(torch.as_tensor(c[0][1] if len(c[0]) > 1 else c[1]["timestep"]).reshape(-1)[0]) for c in calls]
    return Trajectory(calls, ts, float(call_kwargs.get("guidance_scale", 1.0))), out


def _prediction(out: Any) -> torch.Tensor:
    return out.sample if hasattr(out, "sample") else out[0]


def _guided(out: torch.Tensor, scale: float) -> torch.Tensor:
    """The pipeline's classifier-free-guided prediction from a [uncond; cond] batch (unchanged without CFG)."""
    if scale <= 1.0 or out.shape[0] % 2:
        return out
    uncond, cond = out.chunk(2)
    return uncond + scale * (cond - uncond)


@torch.no_grad()
def measure_reuse_errors(pipe, traj: Trajectory, kinds: dict[str, torch.Tensor], max_age: int = 4,
                         progress: bool = False) -> torch.Tensor:
    """e[s, k, a-1]: mean squared error of the guided prediction at step s with row kind k and caches from step
    s - a, against the full prediction (teacher-forced on the plain trajectory). NaN where s - a < 0."""
    unet = find_denoiser(pipe)
    units = unet_units(unet)
    names = list(kinds)
    order = sorted(range(len(names)), key=lambda i: int(kinds[names[i]].sum()))  # fewest recomputed units first
    n = len(traj.calls)
    err = torch.full((n, len(names), max_age), math.nan, dtype=torch.float64)
    full_out = [_guided(_prediction(unet(*args, **kwargs)).double(), traj.guidance_scale) for args, kwargs in
                traj.calls]
    ones = torch.ones(len(units), dtype=torch.bool)
    for a in range(1, max_age + 1):
        for s in range(a, n):
            # the plan: row 0 full (at step s - a), then the kinds in order of increasing recomputation at step s;
            # a kind recomputes a superset of the units of the ones before it, so their refreshes never leak into
            # the units a later kind reuses
            mask = torch.stack([ones] + [kinds[names[i]] for i in order])
            apply_branch_reuse(unet, BranchReusePlan(mask), strict_steps=False)
            try:
                args, kwargs = traj.calls[s - a]
                unet(*args, **kwargs)  # through the step hook: a new generation, row 0 computes and caches all
                step_hook = get_hook(unet, STEP_HOOK)
                args, kwargs = traj.calls[s]
                for row, i in enumerate(order, start=1):
                    # same step, several row kinds: set the row and call past the step hook (no step advance)
                    step_hook.state.row = mask[row].tolist()
                    out = _prediction(step_hook.fn_ref.original_forward(*args, **kwargs)).double()
                    err[s, i, a - 1] = float((_guided(out, traj.guidance_scale) - full_out[s]).pow(2).mean())
            finally:
                remove_branch_reuse(unet)
        _log(progress, f"reuse errors at cache age {a}: done")
    return err


def ddim_weights(scheduler, timesteps: Sequence[float]) -> torch.Tensor:
    """w_s: final-sample sensitivity to the noise prediction at step s under deterministic DDIM (module doc)."""
    ac = scheduler.alphas_cumprod.double()
    final = float(getattr(scheduler, "final_alpha_cumprod", ac[0]))
    ts = [int(round(t)) for t in timesteps]
    w = []
    for i, t in enumerate(ts):
        a_t = float(ac[t])
        a_p = float(ac[ts[i + 1]]) if i + 1 < len(ts) else final
        d = math.sqrt(1 - a_p) - math.sqrt(a_p / a_t) * math.sqrt(1 - a_t)
        w.append(abs(d) * math.sqrt(final / a_p))
    return torch.tensor(w, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------------------------------
# choosing rows


@torch.no_grad()
def row_flops(pipe, traj: Trajectory, kinds: dict[str, torch.Tensor]) -> tuple[float, dict[str, float]]:
    """FLOPs of one full UNet call and of one call with each row kind (second call of a 2-row plan)."""
    unet = find_denoiser(pipe)
    units = unet_units(unet)
    args0, kw0 = traj.calls[0]
    args1, kw1 = traj.calls[1]
    with flop_counter() as c:
        unet(*args0, **kw0)
    full = float(c.get_total_flops())
    out = {}
    for name, row in kinds.items():
        apply_branch_reuse(unet, BranchReusePlan(torch.stack([torch.ones(len(units), dtype=torch.bool), row])),
                           strict_steps=False)
        try:
            unet(*args0, **kw0)
            with flop_counter() as c:
                unet(*args1, **kw1)
            out[name] = float(c.get_total_flops())
        finally:
            remove_branch_reuse(unet)
    return full, out


def dp_rows(err: torch.Tensor, weights: torch.Tensor, costs: torch.Tensor, full_cost: float,
            lam: float) -> list[int]:
    """Rows minimising sum w_s^2 e(s, k_s, age_s) + lam * cost; -1 = full row. State: steps since the last full
    row (the deep caches' age)."""
    n, k, max_age = err.shape
    inf = math.inf
    # best[a] = (objective, rows) with the last full row a steps ago (a = 0: this step was full)
    best: list[tuple[float, list[int]]] = [(lam * full_cost, [-1])] + [(inf, [])] * max_age
    for s in range(1, n):
        nxt: list[tuple[float, list[int]]] = [(inf, [])] * (max_age + 1)
        for a, (obj, rows) in enumerate(best):
            if obj == inf:
                continue
            cand = obj + lam * full_cost
            if cand < nxt[0][0]:
                nxt[0] = (cand, rows + [-1])
            if a + 1 <= max_age:
                for j in range(k):
                    e = float(err[s, j, a])
                    if math.isnan(e):
                        continue
                    cand = obj + float(weights[s]) ** 2 * e + lam * float(costs[j])
                    if cand < nxt[a + 1][0]:
                        nxt[a + 1] = (cand, rows + [j])
        best = nxt
    return min(best, key=lambda b: b[0])[1]


def rows_ratio(rows: list[int], costs: torch.Tensor, full_cost: float) -> float:
    total = sum(full_cost if r < 0 else float(costs[r]) for r in rows)
    return len(rows) * full_cost / total


def plan_for_ratio(err: torch.Tensor, weights: torch.Tensor, costs: torch.Tensor, full_cost: float,
                   target: float, iters: int = 60) -> list[int]:
    """Bisect the FLOPs multiplier until the DP plan's modelled FLOPs ratio is the smallest one >= target."""
    lo, hi = 0.0, 1.0
    while rows_ratio(dp_rows(err, weights, costs, full_cost, hi), costs, full_cost) < target:
        hi *= 4
        if hi > 1e30:
            raise ValueError(f"no plan reaches a FLOPs ratio of {target:.3f} (the cheapest rows do not)")
    for _ in range(iters):
        mid = math.sqrt(lo * hi) if lo > 0 else hi / 1e6 if hi > 1e-300 else 0.0
        if rows_ratio(dp_rows(err, weights, costs, full_cost, mid), costs, full_cost) >= target:
            hi = mid
        else:
            lo = mid
    return dp_rows(err, weights, costs, full_cost, hi)


# ----------------------------------------------------------------------------------------------------------------------
# the entry point


@dataclass
class CalibrationReport:
    """What `calibrate_unet` measured for the plan it returns."""

    target_speedup: float | None
    min_psnr: float | None
    steps: int
    rows: list[str]
    modelled_flops_ratio: float
    measured_flops_ratio: float
    psnr: float
    ssim: float
    calibration_images: int
    seed: int
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, float) and not math.isfinite(v):
                d[k] = None
        return d


def _rows_to_plan(rows: list[int], names: list[str], kinds: dict[str, torch.Tensor], units,
                  meta: dict[str, str]) -> BranchReusePlan:
    ones = torch.ones(len(units), dtype=torch.bool)
    mask = torch.stack([ones if r < 0 else kinds[names[r]] for r in rows])
    row_names = ["full" if r < 0 else names[r] for r in rows]
    return BranchReusePlan(mask, tuple(u.name for u in units), {**meta, "rows": ",".join(row_names)})


@torch.no_grad()
def whole_call_flops(pipe, call_kwargs: dict[str, Any], plan: BranchReusePlan | None) -> float:
    """FLOPs of one pipeline call on one image (first prompt / seed), with the plan attached when given."""
    kw = dict(call_kwargs)
    if "prompt" in kw and isinstance(kw["prompt"], list):
        kw["prompt"] = kw["prompt"][:1]
    if isinstance(kw.get("generator"), list):
        kw["generator"] = kw["generator"][:1]
    if plan is not None:
        apply_branch_reuse(pipe, plan)
    try:
        with flop_counter() as c:
            pipe(**kw)
    finally:
        if plan is not None:
            remove_branch_reuse(pipe)
    return float(c.get_total_flops())


def spread_schedules(steps: int, count: int) -> list[list[int]]:
    """Schedules of `count` full steps out of `steps` (diffaccel's start set for the local search): step 0 full, the
    other full steps spread evenly (rounded) from a first step f to a last step l, for every f from 1 to one spacing
    past it and every l from one spacing before the last step to the last. FORA's schedule is one of them (f = n,
    when its count is `count`); so is diffusers' TaylorSeer schedule with one warm-up step (f = 2, then every n-th:
    a second computation right away gives the order-1 forecast its slope from the start)."""
    if not 1 <= count <= steps:
        raise ValueError(f"count must be in [1, {steps}], got {count}")
    if count == 1:
        return [[0]]
    gap = -(-steps // count)  # the spacing, rounded up
    firsts = range(1, min(gap + 1, steps - 1) + 1)
    if count == 2:
        return [[0, first] for first in firsts]
    out: list[list[int]] = []
    for first in firsts:
        for last in range(max(first + count - 2, steps - 1 - gap), steps):
            full = [0] + [round(first + i * (last - first) / (count - 2)) for i in range(count - 1)]
            if len(set(full)) == count and full not in out:
                out.append(full)
    return out


class Calibrator:
    """Steps 1-3 of the module docstring once (trajectory, reuse errors, weights, row FLOPs); then `check(target)`
    and `for_psnr(floor)` choose and measure plans cheaply for as many targets as wanted. Subclasses bind a
    denoiser family: `UNetCalibrator` (branch reuse plans) and `DiTCalibrator` (HarmoniCa-style cache plans)."""

    cond_key = "prompt"

    @torch.no_grad()
    def __init__(self, pipe, conditions: Sequence[Any], *, num_inference_steps: int = 50,
                 guidance_scale: float = 7.5, num_images: int = 8, seed: int = 10_000, max_age: int = 4,
                 progress: bool = False, measure_errors: bool = True, **call_kwargs: Any) -> None:
        from ..core import make_generators, pipeline_output_to_uint8

        if not conditions:
            raise ValueError("calibration needs at least one prompt or class label")
        if num_images < 1 or num_inference_steps < 2:
            raise ValueError("calibration needs num_images >= 1 and num_inference_steps >= 2")
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)
        self.pipe, self.progress, self.seed, self.num_images = pipe, progress, seed, num_images
        self.steps, self.guidance_scale, self.max_age = num_inference_steps, guidance_scale, max_age
        self.model = find_denoiser(pipe)
        cond = [conditions[i % len(conditions)] for i in range(num_images)]
        self.kw = {**call_kwargs, self.cond_key: cond, "num_inference_steps": num_inference_steps,
                   "guidance_scale": guidance_scale, "output_type": "np"}
        self._gens = lambda: make_generators(seed, num_images)
        _log(progress, f"recording the plain trajectory ({num_images} images, {num_inference_steps} steps)")
        reset_caches(pipe)
        traj, plain = record_trajectory(pipe, {**self.kw, "generator": self._gens()})
        if len(traj.calls) != num_inference_steps:
            raise ValueError(f"expected one denoiser call per step, saw {len(traj.calls)} for {num_inference_steps} "
                             "steps (unbatched classifier-free guidance is not supported by calibration)")
        self.traj = traj
        self.plain_u8 = pipeline_output_to_uint8(plain.images)
        self.kinds = self.row_kinds()
        self.names = list(self.kinds)
        full_cost, kind_costs = self.row_flops()
        # per image: denoiser FLOPs are linear in the batch; the whole call is counted on one image
        self.full_cost = full_cost / num_images
        self.costs = torch.tensor([kind_costs[n] / num_images for n in self.names], dtype=torch.float64)
        _log(progress, "measuring reuse errors (" + ", ".join(
            f"{n}: {kind_costs[n] / full_cost:.2f} of a full call" for n in self.names) + ")")
        # the error model of the DP search (steps 2-3); the greedy search samples instead and does not need it
        self.err = self.measure_errors() if measure_errors else None
        self.weights = ddim_weights(pipe.scheduler, traj.timesteps)
        self.f_plain = self.call_flops(None)
        self.unet_total = num_inference_steps * self.full_cost
        self.other = max(self.f_plain - self.unet_total, 0.0)

    # --------------------------------------------------------------------------------------- family bindings
    def row_kinds(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def make_plan(self, mask: torch.Tensor, meta: dict[str, str]) -> Any:
        raise NotImplementedError

    def attach(self, plan: Any) -> None:
        raise NotImplementedError

    def detach(self) -> None:
        raise NotImplementedError

    def guided(self, out: torch.Tensor) -> torch.Tensor:
        return _guided(out, self.guidance_scale)

    # ----------------------------------------------------------------------------------------------- shared
    @torch.no_grad()
    def row_flops(self) -> tuple[float, dict[str, float]]:
        """FLOPs of one full denoiser call and of one call with each row kind (second row of a 2-row plan)."""
        (args0, kw0), (args1, kw1) = self.traj.calls[0], self.traj.calls[1]
        with flop_counter() as c:
            self.model(*args0, **kw0)
        full = float(c.get_total_flops())
        ones = torch.ones_like(next(iter(self.kinds.values())))
        out = {}
        for name, row in self.kinds.items():
            self.attach(self.make_plan(torch.stack([ones, row]), {}))
            try:
                self.model(*args0, **kw0)
                with flop_counter() as c:
                    self.model(*args1, **kw1)
                out[name] = float(c.get_total_flops())
            finally:
                self.detach()
        return full, out

    @torch.no_grad()
    def measure_errors(self) -> torch.Tensor:
        """e[s, k, a-1] (see `measure_reuse_errors`): the steps of `history` replayed fully, then step s with row
        kind k; 2 denoiser calls per (step, kind, age), 3 with a forecast."""
        calls = self.traj.calls
        full_out = [self.guided(_prediction(self.model(*a, **k)).double()) for a, k in calls]
        ones = torch.ones_like(next(iter(self.kinds.values())))
        err = torch.full((len(calls), len(self.kinds), self.max_age), math.nan, dtype=torch.float64)
        for age in range(1, self.max_age + 1):
            for s in range(age, len(calls)):
                history = self.history(s, age)
                for i, row in enumerate(self.kinds.values()):
                    self.attach(self.make_plan(torch.stack([ones] * len(history) + [row]), {}))
                    try:
                        for h in history:
                            self.model(*calls[h][0], **calls[h][1])
                        out = _prediction(self.model(*calls[s][0], **calls[s][1])).double()
                    finally:
                        self.detach()
                    err[s, i, age - 1] = float((self.guided(out) - full_out[s]).pow(2).mean())
            _log(self.progress, f"reuse errors at cache age {age}: done")
        return err

    def history(self, s: int, age: int) -> list[int]:
        """The full steps replayed before step s to fill the caches at cache age `age` (the last one)."""
        return [s - age]

    @torch.no_grad()
    def call_flops(self, plan: Any | None) -> float:
        """FLOPs of one pipeline call on one image (first condition and seed), with `plan` attached if given."""
        kw = {**self.kw, self.cond_key: self.kw[self.cond_key][:1], "generator": self._gens()[:1]}
        if plan is not None:
            self.attach(plan)
        try:
            with flop_counter() as c:
                self.pipe(**kw)
        finally:
            if plan is not None:
                self.detach()
        return float(c.get_total_flops())

    def max_speedup(self, basis: str = "call") -> float:
        """The FLOPs ratio of the cheapest plan (row 0 full, every other row the cheapest kind): of the whole call,
        or (basis "denoiser") of the denoiser calls only."""
        unet = self.full_cost + (self.steps - 1) * float(self.costs.min())
        return self.unet_total / unet if basis == "denoiser" else self.f_plain / (self.other + unet)

    def _plan_from(self, rows: list[int], meta: dict[str, str]) -> Any:
        ones = torch.ones_like(next(iter(self.kinds.values())))
        mask = torch.stack([ones if r < 0 else self.kinds[self.names[r]] for r in rows])
        names = ["full" if r < 0 else self.names[r] for r in rows]
        return self.make_plan(mask, {**meta, "rows": ",".join(names)})

    @torch.no_grad()
    def fidelity(self, plan: Any) -> Any:
        """Paired fidelity (`evals.paired_fidelity`) of the calibration images sampled with `plan`."""
        from ..core import pipeline_output_to_uint8
        from ..evals.paired import paired_fidelity

        self.attach(plan)
        try:
            out = self.pipe(**{**self.kw, "generator": self._gens()})
        finally:
            self.detach()
        return paired_fidelity(pipeline_output_to_uint8(out.images), self.plain_u8, extractor=None)

    def greedy_rows(self, ratio: float, kinds: Sequence[str] = ("reuse-all",)) -> list[int]:
        """Backward elimination on the final images (diffaccel's search, not from a paper): start from full rows;
        each round try every still-full step after step 0 as each of `kinds`, sample the calibration images, and
        keep the change that keeps the paired PSNR highest; stop once the modelled denoiser FLOPs ratio reaches
        `ratio`. The path is remembered, so smaller targets later cost nothing."""
        ids = [self.names.index(k) for k in kinds]
        path = self.__dict__.setdefault("_greedy_paths", {}).setdefault(tuple(kinds), [[-1] * self.steps])
        for rows in path:
            if rows_ratio(rows, self.costs, self.full_cost) >= ratio:
                return rows
        rows = path[-1]
        while rows_ratio(rows, self.costs, self.full_cost) < ratio:
            best: tuple[float, list[int]] | None = None
            for s in range(1, self.steps):
                for j in ids if rows[s] == -1 else ():
                    cand = rows[:s] + [j] + rows[s + 1:]
                    psnr = self.fidelity(self._plan_from(cand, {})).psnr
                    if best is None or psnr > best[0]:
                        best = (psnr, cand)
            if best is None:
                raise ValueError(f"no plan of {', '.join(kinds)} rows reaches a FLOPs ratio of {ratio:.3f}")
            rows = best[1]
            path.append(rows)
            _log(self.progress, f"greedy: ratio {rows_ratio(rows, self.costs, self.full_cost):.3f}, "
                                f"calibration PSNR {best[0]:.2f} dB")
        return rows

    def spaced_rows(self, ratio: float, kind: str = "reuse-all") -> list[int]:
        """The evenly spaced plan (FORA's schedule, Selvaraju et al. 2024, when the count divides the steps) with
        the most full steps whose modelled FLOPs ratio still reaches `ratio`; step 0 is always full."""
        j = self.names.index(kind)
        for full in range(self.steps, 0, -1):
            keep = {round(i * self.steps / full) for i in range(full)}
            rows = [-1 if s in keep else j for s in range(self.steps)]
            if rows_ratio(rows, self.costs, self.full_cost) >= ratio:
                return rows
        raise ValueError(f"no plan of {kind} rows reaches a FLOPs ratio of {ratio:.3f}")

    def spread_starts(self, ratio: float, kind: str = "reuse-all") -> list[list[int]]:
        """Start plans for `local_rows`: `spaced_rows` first, then every `spread_schedules` schedule with its number
        of full steps (the other steps reuse with `kind`)."""
        j = self.names.index(kind)
        spaced = self.spaced_rows(ratio, kind)
        starts = [spaced]
        for full in spread_schedules(self.steps, spaced.count(-1)):
            rows = [-1 if s in full else j for s in range(self.steps)]
            if rows not in starts:
                starts.append(rows)
        return starts

    def local_rows(self, ratio: float, kind: str = "reuse-all", max_evals: int = 120) -> list[int]:
        """Shift search on the final images (diffaccel's search, not from a paper): sample every start of
        `spread_starts` (FORA's even spacing, moved at both ends), keep the best, then move one full step (not step 0)
        one step earlier or later onto a reused one while the paired PSNR of the calibration images improves (best
        move per round, at most `max_evals` samplings in all). Every candidate has the same number of full steps, so
        the modelled FLOPs ratio is unchanged; the evenly spaced plan is one of the candidates, so the result is
        never worse than it on the calibration images."""
        best, rows = -float("inf"), []
        evals = 0
        for start in self.spread_starts(ratio, kind):
            psnr = self.fidelity(self._plan_from(start, {})).psnr
            evals += 1
            if psnr > best:
                best, rows = psnr, start
        _log(self.progress, f"local: best of {evals} spread starts, calibration PSNR {best:.2f} dB")
        while evals < max_evals:
            found: tuple[float, list[int]] | None = None
            for s in range(1, self.steps):
                for t in (s - 1, s + 1):
                    if rows[s] != -1 or not 1 <= t < self.steps or rows[t] == -1 or evals >= max_evals:
                        continue
                    cand = list(rows)
                    cand[s], cand[t] = rows[t], -1
                    psnr = self.fidelity(self._plan_from(cand, {})).psnr
                    evals += 1
                    if psnr > (found[0] if found else best):
                        found = (psnr, cand)
            if found is None:
                break
            best, rows = found
            _log(self.progress, f"local: calibration PSNR {best:.2f} dB after {evals} samplings")
        return rows

    def check(self, target: float, *, basis: str = "call", search: str = "dp") -> tuple[Any, CalibrationReport]:
        """The plan for a FLOPs ratio >= `target`, sampled on the calibration images and measured. `basis`:
        "call" — the whole pipeline call (text encoder, VAE included: what a user sees); "denoiser" — the denoiser
        calls only (how cache papers compare, e.g. FORA's or HarmoniCa's compute ratios). `search`: "dp" (the
        error model of the module docstring, cheap), "greedy" (`greedy_rows`: samples every candidate) or "local"
        (`local_rows`: FORA's evenly spaced schedule, refined by moving full steps)."""
        if target < 1.0:
            raise ValueError(f"target speed-up must be >= 1, got {target}")
        cheapest = self.max_speedup(basis)
        if target > cheapest * (1 + 1e-9):
            raise ValueError(f"target speed-up {target:.3f} is beyond the cheapest plan's {cheapest:.3f}")
        if basis == "denoiser":
            ratio = target
        elif basis == "call":
            denoiser_budget = self.f_plain / target - self.other  # the denoiser FLOPs the plan may spend
            ratio = self.unet_total / denoiser_budget if target > 1 else 1.0
        else:
            raise ValueError(f"basis must be 'call' or 'denoiser', got {basis!r}")
        if search == "dp":
            if self.err is None:
                raise ValueError("the DP search needs the reuse errors: build the calibrator with measure_errors=True")
            rows = plan_for_ratio(self.err, self.weights, self.costs, self.full_cost, ratio)
        elif search == "greedy":
            rows = self.greedy_rows(ratio)
        elif search == "local":
            rows = self.local_rows(ratio)
        else:
            raise ValueError(f"search must be 'dp', 'greedy' or 'local', got {search!r}")
        plan = self._plan_from(rows, {
            "kind": "calibrated", "search": search, "target_speedup": f"{target:.4f}", "basis": basis,
            "steps": str(self.steps), "guidance_scale": str(self.guidance_scale), "calibration_seed": str(self.seed),
            "calibration_images": str(self.num_images)})
        fid = self.fidelity(plan)
        measured = self.f_plain / self.call_flops(plan)
        rep = CalibrationReport(target_speedup=target, min_psnr=None, steps=self.steps,
                                rows=plan.metadata["rows"].split(","),
                                modelled_flops_ratio=rows_ratio(rows, self.costs, self.full_cost),
                                measured_flops_ratio=measured, psnr=fid.psnr, ssim=fid.ssim,
                                calibration_images=self.num_images, seed=self.seed)
        _log(self.progress, f"target {target:.3f}: measured FLOPs ratio {measured:.3f}, PSNR {fid.psnr:.2f} dB, "
                            f"SSIM {fid.ssim:.4f}")
        return plan, rep

    def for_psnr(self, min_psnr: float, probes: int = 7) -> tuple[Any, CalibrationReport]:
        """The fastest plan found (bisection over targets) whose calibration PSNR is >= `min_psnr`."""
        lo, hi = 1.0, self.max_speedup()
        best = None
        for _ in range(probes):
            mid = math.sqrt(lo * hi)
            plan, rep = self.check(mid)
            if rep.psnr >= min_psnr:
                best, lo = (plan, rep), mid
            else:
                hi = mid
        if best is None:
            plan = self._plan_from([-1] * self.steps, {"kind": "no-reuse"})
            rep = CalibrationReport(None, min_psnr, self.steps, ["full"] * self.steps, 1.0, 1.0, math.inf, 1.0,
                                    self.num_images, self.seed, ["no plan with reuse met the PSNR floor"])
            return plan, rep
        best[1].min_psnr = min_psnr
        return best


class UNetCalibrator(Calibrator):
    """Branch reuse plans for UNet text-to-image pipelines (rows: full, cut<c>, reuse-all)."""

    def row_kinds(self) -> dict[str, torch.Tensor]:
        return row_kinds(self.model)

    def make_plan(self, mask: torch.Tensor, meta: dict[str, str]) -> BranchReusePlan:
        return BranchReusePlan(mask, tuple(u.name for u in unet_units(self.model)), meta)

    def attach(self, plan: BranchReusePlan) -> None:
        apply_branch_reuse(self.pipe, plan, strict_steps=plan.num_steps == self.steps)

    def detach(self) -> None:
        remove_branch_reuse(self.pipe)

    def measure_errors(self) -> torch.Tensor:
        # one full call per (step, age), then every kind from the same caches (fewer calls than the generic way)
        kinds = {k: v for k, v in self.kinds.items()}
        return measure_reuse_errors(self.pipe, self.traj, kinds, max_age=self.max_age, progress=self.progress)


class DiTCalibrator(Calibrator):
    """Cache plans (`caching.CachePlan`, HarmoniCa's format) for DiT pipelines. Row kinds per step: reuse every
    unit (FORA's row), only the attention units, only the feed-forward units; and by depth, `shallow<d>` (compute
    blocks 0..d-1, reuse the deeper ones) and `deep<d>` (reuse blocks 0..d-1, compute the deeper ones) — how much
    a block's output changes between steps depends on its depth (Ma et al., *Learning-to-Cache*, NeurIPS 2024,
    Fig. 2), so the choice is left to the measured errors."""

    cond_key = "class_labels"

    def __init__(self, pipe, conditions: Sequence[Any], *, forecast: int = 0, **kwargs: Any) -> None:
        """`forecast=1` (2): plans hand out the order-1 (order-2) forecast of reused outputs (`CachePlan.forecast`);
        the reuse error at cache age a is then measured with the two (three) previous computations a steps apart."""
        self.forecast = forecast
        super().__init__(pipe, conditions, **kwargs)

    def history(self, s: int, age: int) -> list[int]:
        """With the forecast, the `forecast + 1` previous computations `age` steps apart (as many as exist)."""
        n = 1 + min(self.forecast, s // age - 1)
        return [s - k * age for k in range(n, 0, -1)]

    def row_kinds(self) -> dict[str, torch.Tensor]:
        from .harmonica import unit_modules

        names = [n for n, _ in unit_modules(self.model)]
        block = [int(n.split(".")[1]) for n in names]
        depth = max(block) + 1
        kinds = {"reuse-all": torch.zeros(len(names), dtype=torch.bool),
                 "reuse-attn": torch.tensor([not n.endswith((".attn1", ".attn2")) for n in names]),
                 "reuse-ff": torch.tensor([not n.endswith(".ff") for n in names])}
        for d in range(1, depth):
            kinds[f"shallow{d}"] = torch.tensor([b < d for b in block])
            kinds[f"deep{d}"] = torch.tensor([b >= d for b in block])
        return kinds

    def make_plan(self, mask: torch.Tensor, meta: dict[str, str]):
        from .harmonica import CachePlan

        return CachePlan(mask, metadata=meta, forecast=self.forecast)

    def attach(self, plan) -> None:
        from .harmonica import apply_cache_plan

        apply_cache_plan(self.pipe, plan, force=True)

    def detach(self) -> None:
        from .harmonica import remove_cache_plan

        remove_cache_plan(self.pipe)

    def guided(self, out: torch.Tensor) -> torch.Tensor:
        """DiTPipeline's guidance: [cond; uncond] halves, on the first `in_channels` channels (learned sigma)."""
        eps = out[:, :self.model.config.in_channels]
        if self.guidance_scale <= 1.0 or eps.shape[0] % 2:
            return eps
        cond, uncond = eps.chunk(2)
        return uncond + self.guidance_scale * (cond - uncond)


def calibrator_for(pipe, conditions: Sequence[Any], **kwargs: Any) -> Calibrator:
    """The calibrator of a pipeline's family: UNet text-to-image or DiT class-conditional."""
    model = find_denoiser(pipe)
    if type(model).__name__ == "DiTTransformer2DModel":
        return DiTCalibrator(pipe, conditions, **kwargs)
    if getattr(pipe, "unet", None) is not None:
        return UNetCalibrator(pipe, conditions, **kwargs)
    raise ValueError(f"calibration supports UNet text-to-image and DiT pipelines, not {type(pipe).__name__}")


def calibrate_unet(pipe, prompts: Sequence[str], *, target_speedup: float | None = None,
                   min_psnr: float | None = None, **kwargs: Any) -> tuple[BranchReusePlan, CalibrationReport]:
    """A branch reuse plan for `pipe` (a UNet text-to-image pipeline) at `target_speedup` (whole-call FLOPs
    ratio) or, with `min_psnr`, the fastest plan found whose paired PSNR on the calibration images stays above the
    floor; plus the measured report. `kwargs` go to `UNetCalibrator` (num_inference_steps, guidance_scale,
    num_images, seed = first calibration seed — keep them apart from evaluation seeds —, max_age, progress)."""
    if (target_speedup is None) == (min_psnr is None):
        raise ValueError("give exactly one of target_speedup and min_psnr")
    if target_speedup is not None and target_speedup < 1.0:
        raise ValueError(f"target_speedup must be >= 1, got {target_speedup}")
    cal = UNetCalibrator(pipe, prompts, **kwargs)
    return cal.check(target_speedup) if target_speedup is not None else cal.for_psnr(min_psnr)


def plan_from_rows(rows: Sequence[str], unet, metadata: dict[str, str] | None = None) -> BranchReusePlan:
    """Rebuild a calibrated plan from its row names ("full", "reuse-all", "cut<c>"; a plan's `rows` metadata) on
    any UNet: the same per-step pattern mapped onto that UNet's branches (cuts beyond its depth are clamped)."""
    units = unet_units(unet)
    r_total = (len(units) - 1) // 2
    ones = torch.ones(len(units), dtype=torch.bool)
    mask = []
    for name in rows:
        if name == "full":
            mask.append(ones)
        elif name == "reuse-all":
            mask.append(cut_row(units, -1))
        elif name.startswith("cut") and name[3:].isdigit():
            mask.append(cut_row(units, min(int(name[3:]), r_total - 2)))
        else:
            raise ValueError(f"unknown row kind {name!r} (expected full, reuse-all or cut<c>)")
    return BranchReusePlan(torch.stack(mask), tuple(u.name for u in units), {**(metadata or {}),
                                                                               "rows": ",".join(rows)})
