"""Command-line options checked when they are parsed, before any work: one-line errors that name the option.

``p.add_argument("--steps", type=int_in(1, 10_000))`` refuses ``--steps 0`` with
``error: argument --steps: must be an integer in [1, 10000], got '0'`` and exit code 2, before a model loads.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line like every other error (`error: argument --steps: ... (see
    diffaccel zoo sample --help)`), exit code 2.

    Sub-command parsers made with `add_subparsers` inherit the class.
    """

    def error(self, message: str):  # type: ignore[override]
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def int_in(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    """An argparse `type` accepting integers in ``[lo, hi]`` (either bound may be None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except (TypeError, ValueError):
            value = None
        if value is None or (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be an integer {_describe(lo, hi)}, got {text!r}")
        return value

    parse.__name__ = "integer"
    parse.bounds = (lo, hi, False, False)  # for tests and docs: the declared range
    return parse


def float_in(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
             hi_open: bool = False) -> Callable[[str], float]:
    """An argparse `type` accepting finite floats in ``[lo, hi]`` (``(lo`` / ``hi)`` when open)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except (TypeError, ValueError):
            value = math.nan
        bad = not math.isfinite(value)
        if not bad and lo is not None:
            bad = value <= lo if lo_open else value < lo
        if not bad and hi is not None:
            bad = value >= hi if hi_open else value > hi
        if bad:
            lb = "(" if lo_open else "["
            rb = ")" if hi_open else "]"
            rng = f"in {lb}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{rb}"
            raise argparse.ArgumentTypeError(f"must be a finite number {rng}, got {text!r}")
        return value

    parse.__name__ = "number"
    parse.bounds = (lo, hi, lo_open, hi_open)
    return parse


def _describe(lo: int | None, hi: int | None) -> str:
    if lo is not None and hi is not None:
        return f"in [{lo}, {hi}]"
    if lo is not None:
        return f">= {lo}"
    if hi is not None:
        return f"<= {hi}"
    return ""


#: shared limits, so every subcommand refuses the same values
MAX_STEPS = 10_000
MAX_IMAGES = 1_000_000
MAX_BATCH = 4096
SEED_MAX = 2**63 - 1

steps_option = int_in(1, MAX_STEPS)
images_option = int_in(1, MAX_IMAGES)
batch_option = int_in(1, MAX_BATCH)
seed_option = int_in(0, SEED_MAX)
threads_option = int_in(1, 1024)
