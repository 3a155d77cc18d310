"""Registers `diffaccel bench --suite pareto` (every method and composition, per family, one table and plot)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def _report(results: Any, out: Path, command: str) -> list[Path]:
    import torch

    from .pareto import write_report

    machine = f"{platform.machine()} CPU ({os.cpu_count()} cores), torch {torch.__version__}, " \
              f"{torch.get_num_threads()} thread(s)"
    return list(write_report(results, out, command, machine))


def add_parser(sub: Any) -> None:
    """No subcommand of its own: the protocol's rows run through `diffaccel bench --suite pareto`."""
    from ..evals import register_suite
    from .pareto import pareto_suite

    register_suite("pareto", pareto_suite, default_steps=25, report=_report)
