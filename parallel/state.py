"""Per-run state shared by every wrapped layer: call counter, band geometry, stale buffers, pending transfers."""

from __future__ import annotations

from typing import Any

import torch

from .comm import ByteMeter, Communicator, Pending
from .config import PatchParallelConfig


class PatchState:
    """What every hook of one parallelised denoiser reads: which call this is and what each layer kept.

    Call index i counts model calls (not scheduler steps) since the last `reset()`; calls with
    `i <= warmup_steps` (and every call in sync mode) are synchronous.
    """

    def __init__(self, config: PatchParallelConfig, comm: Communicator | None, n: int) -> None:
        self.config, self.comm, self.n = config, comm, n
        self.r = comm.r if comm is not None else 0
        self.meter = comm.meter if comm is not None else ByteMeter(False)
        self.call_index = -1
        self.full_hw: tuple[int, int] | None = None  # latent height, width of the whole image
        self.text_tokens = 0  # text tokens in front of the image tokens (MMDiT single-stream blocks)
        self.buffers: dict[str, Any] = {}  # stale data received for the next call, per layer
        self.pending: dict[str, Pending] = {}  # in-flight displaced transfers, per layer

    # ------------------------------------------------------------------ schedule
    @property
    def sync_call(self) -> bool:
        return self.config.mode == "sync" or self.call_index <= self.config.warmup_steps

    @property
    def keep_for_next(self) -> bool:
        """A synchronous call whose successor is displaced must leave stale buffers behind."""
        return self.config.mode in ("displaced", "pcpp") and self.call_index + 1 > self.config.warmup_steps

    def begin_call(self) -> None:
        self.call_index += 1
        if self.comm is not None:
            self.comm.call_index = self.call_index
            self.comm.phase = "sync" if self.sync_call else "displaced"

    def reset(self) -> None:
        """Drain in-flight transfers and forget all per-call state (start of every pipeline call)."""
        self.drain()
        self.buffers.clear()
        self.call_index = -1
        self.full_hw = None

    def buffer_bytes(self) -> int:
        """Bytes held in stale buffers (what a displaced run keeps per rank between calls)."""

        def size(obj: Any) -> int:
            if torch.is_tensor(obj):
                return obj.numel() * obj.element_size()
            if isinstance(obj, (list, tuple)):
                return sum(size(o) for o in obj)
            return 0

        return sum(size(v) for v in self.buffers.values())

    def drain(self) -> None:
        pend, self.pending = self.pending, {}
        for p in pend.values():
            p.wait()

    # ------------------------------------------------------------------ displaced helpers
    def take_stale(self, name: str) -> Any:
        """Finish the transfer started by the previous call for layer `name` and return its data."""
        p = self.pending.pop(name, None)
        if p is not None:
            self.buffers[name] = p.wait()
        if name not in self.buffers:
            raise RuntimeError(f"no stale data for layer {name} in call {self.call_index}: was call 0 synchronous?")
        return self.buffers[name]

    def start(self, name: str, launch) -> None:
        """Start this call's transfer for `name` (consumed by the next call), honouring the benchmark knobs."""
        if self.config.skip_transfers:
            return
        p = launch()
        if self.config.blocking_transfers:
            self.buffers[name] = p.wait()
        else:
            self.pending[name] = p

    def band_rows(self, tokens: int) -> tuple[int, int]:
        """(rows, width) of this rank's band at a layer that holds `tokens` = rows * width tokens."""
        if self.full_hw is None:
            raise RuntimeError("band geometry unknown: the denoiser entry hook did not run")
        H, W = self.full_hw
        # tokens = (H / (n * d)) * (W / d) for a down-sampling factor d of the layer
        d2 = H * W / (self.n * tokens)
        d = round(d2 ** 0.5)
        if d < 1 or d * d * self.n * tokens != H * W or W % d:
            raise RuntimeError(f"cannot place {tokens} tokens on a band of a {H}x{W} latent split {self.n} ways")
        return tokens // (W // d), W // d


def zeros_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """`rows` rows of zeros shaped like x's rows (dim 2)."""
    shape = list(x.shape)
    shape[2] = rows
    return x.new_zeros(shape)
