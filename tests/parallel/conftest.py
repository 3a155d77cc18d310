"""Shared fixture: run worker scenarios on real gloo process groups, once per (world size, scenarios)."""

import sys
from pathlib import Path

import pytest
import torch.distributed as dist

# the rank workers (`workers.py`, here) and the gloo launcher (`benchmarks/distributed.py`) are plain modules that
# spawned ranks import by name: both folders go on sys.path, which the ranks inherit
_HERE = Path(__file__).resolve().parent
for _path in (_HERE, _HERE.parents[1] / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

_CACHE: dict = {}


@pytest.fixture(scope="session")
def run_suite():
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    import workers as _workers
    from distributed import run_distributed

    def run(world: int, *names: str, timeout_s: float = 300.0) -> list[dict]:
        key = (world, names)
        if key not in _CACHE:
            _CACHE[key] = run_distributed(_workers.suite, world, list(names), timeout_s=timeout_s)
        return _CACHE[key]

    return run
