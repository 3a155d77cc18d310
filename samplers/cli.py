"""CLI hook of the samplers: registers the `samplers` suite of `diffaccel bench` (there `--steps` is the NFE).

`diffaccel bench --suite samplers --steps 10` evaluates every sampler of `diffaccel.samplers.bench.SAMPLERS` that
can run at exactly 10 model calls on digits-ddpm and digits-sd. The full sweep with the table and plot is
`python benchmarks/samplers.py` (see its --help).
"""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Adds no subcommand of its own; makes the `samplers` suite known to `diffaccel bench`."""
    from ..evals import register_suite
    from .bench import samplers_suite

    register_suite("samplers", samplers_suite, default_steps=10)
