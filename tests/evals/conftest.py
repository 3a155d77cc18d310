"""One torch thread per eval test: the machines are shared and small; restores the setting afterwards."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield
