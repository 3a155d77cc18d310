"""Spawn real gloo process groups on the loopback interface for tests and CPU benchmarks.

`run_distributed(fn, world)` starts `world` fresh processes (start method "forkserver", else "spawn"),
initialises gloo on 127.0.0.1 with a free port and `torch.set_num_threads(1)`, calls `fn(rank, world, *args)`
in each and returns the per-rank results. A deadline bounds the whole run: processes still alive then are killed
and `TimeoutError` is raised, so a broken collective can never hang CI. `fn` must be importable (module level).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any


@dataclass
class RankError:
    """An exception raised on one rank: its type name, message and traceback text."""

    rank: int
    type: str
    message: str
    traceback: str


_PRELOAD = ["torch", "torch.distributed", "diffusers", "diffaccel.parallel"]


def _context(fn: Callable):
    """"forkserver" with the heavy imports preloaded once: each later process forks from a clean, single-threaded
    server instead of re-importing torch and diffusers (seconds per rank on a 2-core machine). Falls back to
    "spawn" where forkserver does not exist."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([*_PRELOAD, fn.__module__])  # the worker's own module too
    return ctx


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn: Callable, rank: int, world: int, port: int, q, args: tuple, pg_timeout_s: float) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=pg_timeout_s))
        q.put((rank, "ok", fn(rank, world, *args)))
    except BaseException as exc:  # report every failure to the parent, which decides what it means
        q.put((rank, "error", RankError(rank, type(exc).__name__, str(exc), traceback.format_exc())))
    try:  # rank 0 hosts the store: nobody leaves before everyone is done with it
        dist.barrier()
    except BaseException:
        pass
    q.close()
    q.join_thread()
    os._exit(0)  # skip destroy_process_group: peers may be dead on purpose (failure tests)


def run_distributed(fn: Callable, world: int, *args: Any, timeout_s: float = 150.0, pg_timeout_s: float = 60.0,
                    allow_errors: bool = False, allow_missing: bool = False,
                    ranks_needed: list[int] | None = None) -> list[Any]:
    """Run `fn(rank, world, *args)` on `world` gloo ranks; per-rank results (or `RankError`s if `allow_errors`).

    Raises `TimeoutError` if not every rank reported within `timeout_s` (unless `allow_missing`: their result
    is then None; `ranks_needed` stops waiting once those ranks reported), and `RuntimeError` with the rank's
    traceback if a rank failed and `allow_errors` is False.
    """
    ctx = _context(fn)
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, q, args, pg_timeout_s), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        needed = set(range(world) if ranks_needed is None else ranks_needed)
        while not needed <= set(results):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                rank, status, value = q.get(timeout=min(left, 1.0))
            except queue.Empty:
                if all(not p.is_alive() for p in procs) and q.empty():
                    break
                continue
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=2)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    missing = [r for r in range(world) if r not in results]
    if missing and not allow_missing:
        raise TimeoutError(f"rank(s) {missing} did not report within {timeout_s:g}s (killed)")
    errors = [v for v in results.values() if isinstance(v, RankError)]
    if errors and not allow_errors:
        raise RuntimeError("\n".join(f"rank {e.rank}: {e.type}: {e.message}\n{e.traceback}" for e in errors))
    return [results.get(r) for r in range(world)]
