"""Where the zoo's shipped weights live (inside the package, next to this file)."""

from __future__ import annotations

import os
from pathlib import Path


def weights_dir() -> Path:
    """The folder holding one sub-folder per trained zoo entry; `$DIFFACCEL_ZOO_DIR` overrides it."""
    env = os.environ.get("DIFFACCEL_ZOO_DIR")
    return Path(env) if env else Path(__file__).resolve().parent / "weights"
