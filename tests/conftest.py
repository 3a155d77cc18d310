import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Two threads unless the caller pins fewer: `make test` reruns the numerically sensitive tests with
# OMP_NUM_THREADS=1, and that run must really use one thread.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 2))


@pytest.fixture
def one_thread():
    """Run the test on one torch thread (float results are then the same as a one-thread reference run)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def classifier():
    from diffaccel import zoo

    return zoo.load("digits-features")


@pytest.fixture(autouse=True)
def _keep_thread_count():
    """A command run in-process may set torch's thread count (`--threads`); restore it after each test, so
    results never depend on which test ran before (float sums are blocked by thread count)."""
    n = torch.get_num_threads()
    yield
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
