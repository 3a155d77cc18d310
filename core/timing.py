"""Timing: warm-up, device synchronisation, and the median of repeats (these machines are noisy)."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import InputError


def log(msg: str, tag: str = "") -> None:
    """One timestamped progress line on stderr (benchmarks and long runs), e.g. ``[tag 12:03:04] msg``."""
    stamp = time.strftime("%H:%M:%S")
    print(f"[{tag + ' ' if tag else ''}{stamp}] {msg}", file=sys.stderr, flush=True)


def synchronize(device: torch.device | str | None = None) -> None:
    """Wait for queued GPU work so a wall-clock reading covers it (a no-op on CPU)."""
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize(device)


@dataclass
class TimingResult:
    """Seconds for each repeat, plus the result of the last call."""

    times: list[float] = field(default_factory=list)
    result: Any = None

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def min(self) -> float:
        return min(self.times)

    def as_dict(self) -> dict[str, float | int]:
        return {"median_s": self.median, "min_s": self.min, "repeats": len(self.times)}


def measure(
    fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 3, device: torch.device | str | None = None
) -> TimingResult:
    """Call `fn` `warmup` times untimed, then `repeats` times timed with synchronisation around each call."""
    if repeats < 1:
        raise InputError(f"repeats must be >= 1, got {repeats}")
    for _ in range(max(0, warmup)):
        fn()
    out = TimingResult()
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        out.result = fn()
        synchronize(device)
        out.times.append(time.perf_counter() - t0)
    return out
