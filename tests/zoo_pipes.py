"""Small helpers shared by test modules (importable: `tests` is on the pytest path)."""

from __future__ import annotations

from typing import Any


def quiet_pipeline(name: str) -> Any:
    """A zoo pipeline with its progress bar off (what every test fixture wants)."""
    from diffaccel import zoo

    pipe = zoo.load(name)
    pipe.set_progress_bar_config(disable=True)
    return pipe
