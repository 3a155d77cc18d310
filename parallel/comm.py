"""All traffic of patch parallelism goes through one `Communicator`: groups, timeouts, byte meter, diagnosis.

Every operation is issued asynchronously and returns a `Pending`; blocking use is `.wait()` right away.
`wait` enforces `timeout_s`; on failure the communicator holds a roll call through the process group's store
(ranks that also failed check in; a rank that does not within a few seconds is dead or hung) and raises
`CommunicationError` naming those ranks and, for ranks on this host, whether their process still exists.
"""

from __future__ import annotations

import os
import socket
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..core.errors import InputError
from .config import CommunicationError

KINDS = ("attn_kv", "conv_halo", "gn_stats", "output", "other")
_ROLL_CALL_GRACE_S = 3.0
_instances = 0


@dataclass
class CommRecord:
    """One transfer as this rank saw it. `wire_bytes` follows the ring model."""

    call_index: int
    layer: str
    kind: str
    op: str
    group_size: int
    logical_bytes: int
    wire_bytes: int
    async_op: bool
    phase: str  # "sync" (warm-up or exact call) | "displaced"


class ByteMeter:
    """Append-only log of `CommRecord`s with per-call / per-kind / per-layer summaries."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.records: list[CommRecord] = []

    def add(self, rec: CommRecord) -> None:
        if self.enabled:
            self.records.append(rec)

    def clear(self) -> None:
        self.records.clear()

    def per_call(self, field: str = "wire_bytes") -> dict[int, dict[str, int]]:
        out: dict[int, dict[str, int]] = defaultdict(lambda: dict.fromkeys(KINDS, 0))
        for r in self.records:
            out[r.call_index][r.kind] += getattr(r, field)
        return dict(out)

    def per_layer(self, call_index: int, field: str = "wire_bytes") -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for r in self.records:
            if r.call_index == call_index:
                out[r.layer] += getattr(r, field)
        return dict(out)

    def summary(self) -> dict[str, Any]:
        """Bytes per call split into sync (warm-up) and displaced calls, per kind, wire and logical."""
        phases: dict[str, dict[str, Any]] = {}
        for phase in ("sync", "displaced"):
            calls = sorted({r.call_index for r in self.records if r.phase == phase})
            row: dict[str, Any] = {"calls": len(calls)}
            for field in ("wire_bytes", "logical_bytes"):
                tot = dict.fromkeys(KINDS, 0)
                for r in self.records:
                    if r.phase == phase:
                        tot[r.kind] += getattr(r, field)
                row[field + "_per_call"] = {k: (v / len(calls) if calls else 0.0) for k, v in tot.items()}
            phases[phase] = row
        return {"phases": phases, "total_wire_bytes": sum(r.wire_bytes for r in self.records),
                "records": len(self.records)}

    def as_dicts(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self.records]


class Pending:
    """An in-flight transfer; `wait()` returns its result or raises `CommunicationError` naming the rank(s)."""

    def __init__(self, comm: Communicator, works: list[Any], result: Callable[[], Any], desc: str,
                 peers: list[int]) -> None:
        self.comm, self.works, self._result, self.desc, self.peers = comm, works, result, desc, peers
        self.done = False

    def wait(self) -> Any:
        if not self.done:
            t0 = time.monotonic()  # a displaced transfer may legitimately wait a whole model call to be awaited
            for w in self.works:
                remaining = max(0.1, self.comm.timeout_s - (time.monotonic() - t0))
                try:  # NCCL: stream-ordered wait (its watchdog enforces the group timeout); gloo: timed CPU wait
                    ok = w.wait() if self.comm.stream_wait else w.wait(timeout=timedelta(seconds=remaining))
                except Exception as exc:  # backend errors differ between gloo / NCCL / torch versions
                    raise self.comm.diagnose(self.desc, self.peers, exc) from exc
                if ok is False:
                    raise self.comm.diagnose(self.desc, self.peers, TimeoutError("wait returned False"))
            self.done = True
        return self._result()


class _Ready(Pending):
    def __init__(self, value: Any) -> None:
        self.done, self._value = True, value

    def wait(self) -> Any:
        return self._value


class Deferred:
    """A pending transfer plus the post-processing of its result (`wait()` runs `fn` once the transfer is done)."""

    def __init__(self, pending: Pending, fn: Callable[[], Any]) -> None:
        self.pending, self.fn = pending, fn

    def wait(self) -> Any:
        return self.fn()


def ready(value: Any) -> Pending:
    """A `Pending` that is already complete (used when no transfer is needed)."""
    return _Ready(value)


_GROUPS: dict[tuple, tuple] = {}


def _groups(n: int, branches: int, timeout_s: float) -> tuple:
    """(patch group, async patch group, world group) of this rank, created once per layout and process group.

    `new_group` is collective: every rank creates every group, in the same order."""
    key = (id(dist.group.WORLD), n, branches, timeout_s)
    if key not in _GROUPS:
        t = timedelta(seconds=timeout_s)
        branch = dist.get_rank() // n
        mine = (None, None)
        for b in range(branches):
            ranks = list(range(b * n, (b + 1) * n))
            pair = (dist.new_group(ranks, timeout=t), dist.new_group(ranks, timeout=t))
            if b == branch:
                mine = pair
        _GROUPS[key] = (*mine, dist.new_group(list(range(n * branches)), timeout=t))
    return _GROUPS[key]


class Communicator:
    """Groups of one patch-parallel run plus timed, metered transfers.

    `world = G * n` ranks, `G = 2` with cfg_parallel; branch `b = rank // n` owns ranks `[b*n, (b+1)*n)`.
    Displaced (asynchronous) transfers use their own process group so that a blocking operation issued later
    (the output gather) never queues behind them.
    """

    def __init__(self, n: int, branches: int, timeout_s: float, meter: ByteMeter) -> None:
        global _instances
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if self.world != n * branches:
            raise InputError(f"world size {self.world} != {n} ranks per branch x {branches} branches")
        self.n, self.branches, self.timeout_s, self.meter = n, branches, timeout_s, meter
        self.branch, self.r = divmod(self.rank, n)
        self.patch_ranks = list(range(self.branch * n, (self.branch + 1) * n))
        self.patch_group, self.async_group, self.world_group = _groups(n, branches, timeout_s)
        self.stream_wait = dist.get_backend() == "nccl"
        self.call_index, self.phase = -1, "sync"
        _instances += 1
        self._key = f"diffaccel/pp{_instances}"
        self._store = None
        try:
            self._store = dist.distributed_c10d._get_default_store()
            self._store.set(f"{self._key}/proc/{self.rank}", f"{socket.gethostname()} {os.getpid()}")
        except Exception:  # the roll call is a diagnosis aid only
            self._store = None

    # ------------------------------------------------------------------ neighbours
    @property
    def prev(self) -> int | None:
        return self.rank - 1 if self.r > 0 else None

    @property
    def next(self) -> int | None:
        return self.rank + 1 if self.r < self.n - 1 else None

    def _group(self, which: str):
        return {"patch": self.patch_group, "async": self.async_group, "world": self.world_group}[which]

    def _record(self, layer: str, kind: str, op: str, size: int, logical: int, wire: int, async_op: bool) -> None:
        self.meter.add(CommRecord(self.call_index, layer, kind, op, size, int(logical), int(wire), async_op,
                                  self.phase))

    # ------------------------------------------------------------------ operations
    def all_gather(self, t: torch.Tensor, *, layer: str, kind: str, group: str = "patch",
                   async_op: bool = False, logical_bytes: int | None = None) -> Pending:
        """All-gather `t` over a group; the result is the list of slices in group-rank order."""
        t = t.contiguous()
        size = self.world if group == "world" else self.n
        ranks = list(range(self.world)) if group == "world" else self.patch_ranks
        out = [torch.empty_like(t) for _ in range(size)]
        m = t.numel() * t.element_size()
        self._record(layer, kind, "all_gather", size, (size - 1) * m if logical_bytes is None else logical_bytes,
                     (size - 1) * m, async_op)
        if size == 1:
            return ready([t])
        desc, peers = f"all_gather({kind}, {layer})", [p for p in ranks if p != self.rank]
        try:
            work = dist.all_gather(out, t, group=self._group(group), async_op=True)
        except Exception as exc:  # a dead peer can fail the call at issue time
            raise self.diagnose(desc, peers, exc) from exc
        return self._finish(Pending(self, [work], lambda: out, desc, peers), async_op)

    def exchange(self, sends: dict[int, torch.Tensor], recvs: dict[int, torch.Tensor], *, layer: str, kind: str,
                 tag: int, group: str = "patch", async_op: bool = False) -> Pending:
        """Point-to-point: send `sends[peer]` to each peer and fill `recvs[peer]`; result is `recvs`."""
        ops = []
        g = self._group(group)
        for peer, buf in recvs.items():
            ops.append(dist.P2POp(dist.irecv, buf, peer, g, tag + (0 if peer < self.rank else 1)))
        for peer, t in sends.items():
            t = t.contiguous()
            m = t.numel() * t.element_size()
            self._record(layer, kind, "p2p", 2, m, m, async_op)
            ops.append(dist.P2POp(dist.isend, t, peer, g, tag + (0 if peer > self.rank else 1)))
        if not ops:
            return ready(recvs)
        desc, peers = f"p2p({kind}, {layer})", sorted(set(recvs) | set(sends))
        try:
            works = dist.batch_isend_irecv(ops)
        except Exception as exc:
            raise self.diagnose(desc, peers, exc) from exc
        return self._finish(Pending(self, works, lambda: recvs, desc, peers), async_op)

    def _finish(self, p: Pending, async_op: bool) -> Pending:
        if not async_op:
            p.wait()
        return p

    def all_gather_object(self, obj: Any, desc: str) -> list[Any]:
        """Blocking object all-gather over the world (set-up checks only), with timeout diagnosis."""
        out: list[Any] = [None] * self.world
        try:
            dist.all_gather_object(out, obj, group=self.world_group)
        except Exception as exc:
            raise self.diagnose(desc, [p for p in range(self.world) if p != self.rank], exc) from exc
        return out

    # ------------------------------------------------------------------ failure diagnosis
    def diagnose(self, desc: str, peers: list[int], exc: BaseException) -> CommunicationError:
        """Roll call through the store: name the peers that did not report the same failure in time."""
        silent = list(peers)
        notes: dict[int, str] = {}
        if self._store is not None:
            try:
                self._store.set(f"{self._key}/failed/{self.rank}", desc)
                deadline = time.monotonic() + _ROLL_CALL_GRACE_S
                while silent and time.monotonic() < deadline:
                    silent = [p for p in silent if not self._store.check([f"{self._key}/failed/{p}"])]
                    if silent:
                        time.sleep(0.1)
                host = socket.gethostname()
                for p in silent:
                    h, pid = self._store.get(f"{self._key}/proc/{p}").decode().split()
                    if h == host:
                        notes[p] = "process exited" if not _pid_alive(int(pid)) else "process alive but unresponsive"
            except Exception:  # the store itself may have died with the rank that hosted it
                notes[-1] = "rendezvous store unreachable (its host rank is dead)"
        names = ", ".join(f"rank {p}" + (f" ({notes[p]})" if p in notes else "") for p in silent) or "none"
        extra = f"; {notes[-1]}" if -1 in notes else ""
        return CommunicationError(
            f"rank {self.rank}: {desc} in model call {self.call_index} failed or timed out (timeout "
            f"{self.timeout_s:g}s); unresponsive: {names}{extra}. Backend said: {str(exc).splitlines()[0][:300]}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child that was not reaped yet is a zombie: dead for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def init_distributed(backend: str | None = None, timeout_s: float = 300.0) -> bool:
    """Initialise torch.distributed from the environment (torchrun / accelerate launch set RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Returns False (single process) when WORLD_SIZE is absent.

    Backend: `DIFFACCEL_DIST_BACKEND` or `backend`, else NCCL when CUDA is available and gloo otherwise.
    With NCCL the device is `cuda:LOCAL_RANK` (never RANK: that breaks multi-node runs).
    """
    if dist.is_available() and dist.is_initialized():
        return True
    if "WORLD_SIZE" not in os.environ or not dist.is_available():
        return False
    backend = os.environ.get("DIFFACCEL_DIST_BACKEND", backend) or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, init_method="env://", timeout=timedelta(seconds=timeout_s))
    return True


def local_device() -> torch.device:
    """`cuda:LOCAL_RANK` under NCCL, else CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")
