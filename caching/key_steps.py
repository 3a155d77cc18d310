"""Key-step schedules for encoder propagation (Faster Diffusion, Li et al. NeurIPS 2024), and a schedule
chosen by measurement.

A schedule says at which execution-order steps `s` (0 = noisiest) the UNet encoder runs. Named schedules follow
the Faster Diffusion reference (Li et al., NeurIPS 2024, §3.3 and the released code); `sd50-scaled` and
`schedule_from_drift` are diffaccel heuristics, not from the paper.

`schedule_from_drift` picks the K key steps that minimise the summed relative change of the encoder outputs that
the non-key steps reuse, by dynamic programming over a drift matrix measured on the model at hand
(`measure_encoder_drift`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..core.errors import InputError

# The reference default for Stable Diffusion with 50 DDIM steps, in execution order. In the paper's countdown
# numbering (50 ... 1) these are steps {50, 49, 48, 47, 45, 40, 35, 25, 15}.
SD50_KEY_STEPS: tuple[int, ...] = (0, 1, 2, 3, 5, 10, 15, 25, 35)


@dataclass(frozen=True)
class KeyStepSchedule:
    """A rule `(s, N) -> bool` naming the key steps of an N-step generation; step 0 is always a key step.

    `num_steps` fixes N where the rule only makes sense for one step count (`sd50`); `needs_num_steps` marks rules
    that cannot be evaluated without N (`sd50-scaled`); `explicit` holds an explicit list (validated against N).
    """

    name: str
    rule: Callable[[int, int | None], bool]
    num_steps: int | None = None
    needs_num_steps: bool = False
    explicit: tuple[int, ...] | None = None

    def validate(self, num_steps: int | None) -> None:
        """Raise `ValueError` when the schedule cannot serve an N-step generation."""
        if num_steps is None:
            if self.needs_num_steps:
                raise InputError(
                    f"key-step schedule {self.name!r} depends on the number of steps, which is unknown: apply encoder "
                    "propagation to a pipeline (or pass timesteps_callback) so the hook can read the scheduler"
                )
            return
        if num_steps < 1:
            raise InputError(f"number of steps must be >= 1, got {num_steps}")
        if self.num_steps is not None and num_steps != self.num_steps:
            raise InputError(
                f"key-step schedule {self.name!r} is defined for {self.num_steps} steps only, got {num_steps}; use "
                f"'sd50-scaled' (diffaccel heuristic) or 'uniform-k' for other step counts"
            )
        if self.explicit is not None and self.explicit[-1] >= num_steps:
            raise InputError(
                f"key steps {list(self.explicit)} are out of range for a {num_steps}-step generation "
                f"(valid indices 0..{num_steps - 1})"
            )

    def is_key(self, step: int, num_steps: int | None) -> bool:
        """Whether execution-order step `step` is a key step (step 0 always is)."""
        return step == 0 or bool(self.rule(step, num_steps))

    def key_steps(self, num_steps: int) -> list[int]:
        """The sorted key steps of an N-step generation."""
        self.validate(num_steps)
        return [s for s in range(num_steps) if self.is_key(s, num_steps)]

    def groups(self, num_steps: int) -> list[list[int]]:
        """Partition of 0..N-1 into groups, each a key step followed by the non-key steps that reuse it."""
        out: list[list[int]] = []
        for s in range(num_steps):
            if self.is_key(s, num_steps):
                out.append([s])
            else:
                out[-1].append(s)
        return out


def explicit(steps: Iterable[int], name: str | None = None) -> KeyStepSchedule:
    """A schedule from an explicit list of key steps; it must contain step 0 and no negative or repeated entries."""
    values = list(steps)
    if not values:
        raise InputError("key-step list is empty; it must contain step 0")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"key steps must be ints (execution-order indices), got {v!r}")
    if min(values) < 0:
        raise InputError(f"key steps must be >= 0, got {sorted(values)}")
    if len(set(values)) != len(values):
        raise InputError(f"key steps contain duplicates: {sorted(values)}")
    ordered = tuple(sorted(values))
    if ordered[0] != 0:
        raise InputError(
            f"key-step list must start at step 0 (the first step has nothing cached), got {list(ordered)}"
        )
    members = frozenset(ordered)
    return KeyStepSchedule(name or f"explicit{list(ordered)}", lambda s, n: s in members, explicit=ordered)


def sd50() -> KeyStepSchedule:
    """The reference's SD / 50-step DDIM schedule: 9 key steps (0, 1, 2, 3, 5, 10, 15, 25, 35)."""
    return replace(explicit(SD50_KEY_STEPS, "sd50"), num_steps=50)


def sd50_scaled() -> KeyStepSchedule:
    """`sd50` rescaled to N steps: key steps `floor(s * N / 50 + 0.5)` for s in `sd50`, deduplicated.

    diffaccel heuristic (not from the paper, whose code ships only the 50-step list and the uniform rule).
    For N = 25 this gives (0, 1, 2, 3, 5, 8, 13, 18); for N = 50 it equals `sd50`.
    """

    def keys(n: int) -> frozenset[int]:
        return frozenset(min(n - 1, math.floor(s * n / 50 + 0.5)) for s in SD50_KEY_STEPS)

    return KeyStepSchedule("sd50-scaled", lambda s, n: s in keys(n), needs_num_steps=True)


def uniform(k: int) -> KeyStepSchedule:
    """Every k-th step is a key step (`s % k == 0`); the reference suggests k = 4 for fine-tuned SD checkpoints."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InputError(f"uniform(k) needs an int k >= 1, got {k!r}")
    return KeyStepSchedule(f"uniform-{k}", lambda s, n: s % k == 0)


def every_step() -> KeyStepSchedule:
    """Every step is a key step: encoder propagation then reuses nothing (equals the plain model, R1)."""
    return KeyStepSchedule("all", lambda s, n: True)


def pyramid() -> KeyStepSchedule:
    """Reference schedule of the IF x4 upscaler stage: `9 + 8s` a perfect square -> s in {0, 2, 5, 9, 14, ...}."""

    def rule(s: int, n: int | None) -> bool:
        r = math.isqrt(9 + 8 * s)
        return r * r == 9 + 8 * s

    return KeyStepSchedule("pyramid", rule)


def if100() -> KeyStepSchedule:
    """Reference schedule for DeepFloyd-IF stage I (100 steps): `s < 10 or s > 85 or s % 5 == 0`."""
    return KeyStepSchedule("if100", lambda s, n: s < 10 or s > 85 or s % 5 == 0)


def if_stage2() -> KeyStepSchedule:
    """Reference schedule for DeepFloyd-IF stage II: `s < 20 or s > 40 or s % 2 == 0`."""
    return KeyStepSchedule("if-stage2", lambda s, n: s < 20 or s > 40 or s % 2 == 0)


def ls75() -> KeyStepSchedule:
    """Reference 75-step variant: `s < 10 or s > 65 or s % 5 == 0`."""
    return KeyStepSchedule("75ls", lambda s, n: s < 10 or s > 65 or s % 5 == 0)


def custom(rule: Callable[[int, int | None], bool], name: str = "custom") -> KeyStepSchedule:
    """A user rule `(s, N) -> bool`; step 0 is forced to be a key step."""
    return KeyStepSchedule(name, rule)


NAMED: dict[str, Callable[[], KeyStepSchedule]] = {
    "sd50": sd50,
    "sd50-scaled": sd50_scaled,
    "all": every_step,
    "pyramid": pyramid,
    "if100": if100,
    "if-stage2": if_stage2,
    "75ls": ls75,
}


def get_schedule(spec: KeyStepSchedule | str | Sequence[int] | Callable[[int, int | None], bool]) -> KeyStepSchedule:
    """Coerce a schedule spec: a `KeyStepSchedule`, a name (`sd50`, `sd50-scaled`, `uniform-4`, `all`, `pyramid`,
    `if100`, `if-stage2`, `75ls`), an explicit list of key steps, or a callable `(s, N) -> bool`."""
    if isinstance(spec, KeyStepSchedule):
        return spec
    if isinstance(spec, str):
        if spec in NAMED:
            return NAMED[spec]()
        if spec.startswith("uniform-") and spec[len("uniform-"):].isdigit():
            return uniform(int(spec[len("uniform-"):]))
        raise InputError(f"unknown key-step schedule {spec!r}; valid: {', '.join(NAMED)}, uniform-<k>")
    if callable(spec):
        return custom(spec)
    if isinstance(spec, (list, tuple, set, frozenset, range)):
        return explicit(spec)
    raise TypeError(f"cannot make a key-step schedule from {type(spec).__name__}")


def flops_ratio_limit(encoder_fraction: float, num_key_steps: int, num_steps: int) -> float:
    """Upper bound of the FLOPs speed-up: full cost over cost with the encoder (share `e`) on K of N steps,
    `1 / (1 - e (1 - K/N))`."""
    return 1.0 / (1.0 - encoder_fraction * (1.0 - num_key_steps / num_steps))


# ----------------------------------------------------------------------------------------------------------------------
# schedule chosen by measurement (diffaccel, beyond the paper)


def _encoder_modules(unet: torch.nn.Module, propagate_up_blocks: int = 0) -> list[torch.nn.Module]:
    mods = [unet.conv_in, *unet.down_blocks]
    if getattr(unet, "mid_block", None) is not None:
        mods.append(unet.mid_block)
    return mods + list(unet.up_blocks[:propagate_up_blocks])


@torch.no_grad()
def measure_encoder_drift(pipe: Any, propagate_up_blocks: int = 0, **call_kwargs: Any) -> torch.Tensor:
    """Run one plain generation and return `D[k, s] = ||F_s - F_k|| / ||F_s||` for k <= s (NaN elsewhere), where
    `F_s` concatenates every propagated output (conv_in, down-block skips, mid block, and the first
    `propagate_up_blocks` up blocks) at step s over the whole batch.

    `D[k, s]` is the relative error of the features that step s would reuse if k were its key step. Pass the
    pipeline's call arguments (prompt, num_inference_steps, generator, ...); keep the batch small.
    """
    unet = pipe.unet
    per_step: list[list[torch.Tensor]] = []

    def record(module: torch.nn.Module, args: Any, output: Any) -> None:
        from ..core.hooks import tree_leaves

        flat = [x.detach().float().reshape(-1) for x in tree_leaves(output) if isinstance(x, torch.Tensor)]
        if module is unet.conv_in:
            per_step.append([])
        per_step[-1].extend(flat)

    handles = [m.register_forward_hook(record) for m in _encoder_modules(unet, propagate_up_blocks)]
    try:
        pipe(**call_kwargs)
    finally:
        for h in handles:
            h.remove()
    feats = torch.stack([torch.cat(f) for f in per_step])  # (N, F)
    n = feats.shape[0]
    dist = torch.cdist(feats[None].double(), feats[None].double())[0]
    norms = feats.double().norm(dim=1)
    drift = torch.full((n, n), float("nan"), dtype=torch.float64)
    for k in range(n):
        drift[k, k:] = dist[k, k:] / norms[k:].clamp_min(1e-12)
    return drift


def schedule_from_drift(drift: torch.Tensor, num_key_steps: int, name: str | None = None) -> KeyStepSchedule:
    """The K key steps (step 0 included) minimising `sum over non-key s of D[key(s), s]`, with key(s) the last key
    step at or before s; exact by dynamic programming, O(K N^2)."""
    n = drift.shape[0]
    if not 1 <= num_key_steps <= n:
        raise InputError(f"num_key_steps must be in 1..{n}, got {num_key_steps}")
    d = torch.nan_to_num(drift.double(), nan=0.0)
    # seg[k][e]: cost of the non-key steps k+1 .. e-1 reusing key step k (e = next key step or N)
    csum = torch.cumsum(d, dim=1)
    seg = [[0.0] * (n + 1) for _ in range(n)]
    for k in range(n):
        for e in range(k + 1, n + 1):
            seg[k][e] = float(csum[k, e - 1] - csum[k, k])
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(num_key_steps + 1)]
    back = [[-1] * (n + 1) for _ in range(num_key_steps + 1)]
    for e in range(1, n + 1):
        best[1][e] = seg[0][e]
        back[1][e] = 0
    for j in range(2, num_key_steps + 1):
        for e in range(j, n + 1):
            for k in range(j - 1, e):
                c = best[j - 1][k] + seg[k][e]
                if c < best[j][e]:
                    best[j][e], back[j][e] = c, k
    keys, e = [], n
    for j in range(num_key_steps, 0, -1):
        k = back[j][e]
        keys.append(k)
        e = k
    keys = sorted(keys)
    sched = explicit(keys, name or f"drift-{num_key_steps}of{n}")
    return replace(sched, num_steps=n)
