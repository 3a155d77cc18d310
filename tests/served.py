"""Serve a demo for real in a test: one thread, private gradio temp folder, a free port on `host`."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextmanager
def serve(build: Callable[[], Any], tmp: Path, host: str = "127.0.0.1") -> Iterator[tuple[Any, str]]:
    """Build the Blocks with `build()`, launch it on `host` without blocking, yield (demo, url); close after."""
    from diffaccel.app import launch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRADIO_TEMP_DIR", str(tmp / "gradio"))
        mp.setenv("GRADIO_ANALYTICS_ENABLED", "False")
        demo = build()
        port = free_port(host)
        launch(demo, host=host, port=port, prevent_thread_lock=True)
        try:
            yield demo, f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}/"
        finally:
            demo.close()
            torch.set_num_threads(threads)


def gradio_client(url: str, tmp: Path) -> Any:
    """A `gradio_client.Client` on a served demo, downloading files under `tmp/client`."""
    from gradio_client import Client

    return Client(url, verbose=False, download_files=str(tmp / "client"))


def predict(client: Any, values: dict[str, Any]) -> Any:
    """Call the demo's `/run` endpoint with every input field given explicitly."""
    from diffaccel.app.ui import INPUT_FIELDS

    return client.predict(*[values[k] for k in INPUT_FIELDS], api_name="/run")
