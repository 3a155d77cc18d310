"""Shared fixture: run worker scenarios on real gloo process groups, once per (world size, scenarios)."""

import pytest
import torch.distributed as dist

_CACHE: dict = {}


@pytest.fixture(scope="session")
def run_suite():
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    from diffaccel.parallel import _workers
    from diffaccel.parallel.testing import run_distributed

    def run(world: int, *names: str, timeout_s: float = 300.0) -> list[dict]:
        key = (world, names)
        if key not in _CACHE:
            _CACHE[key] = run_distributed(_workers.suite, world, list(names), timeout_s=timeout_s)
        return _CACHE[key]

    return run
