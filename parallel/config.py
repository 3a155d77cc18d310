"""`PatchParallelConfig`: the one switch board for patch parallelism, and the errors it raises."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..core.errors import DiffaccelError, InputError

MODES = ("sync", "displaced", "pcpp", "naive")
MODE_ALIASES = {"distrifusion": "displaced", "exact": "sync"}
GN_MODES = ("sync", "corrected", "substitute", "stale", "local")
HALO_TRANSPORTS = ("p2p", "allgather")


class PatchParallelError(InputError):
    """A configuration, model or input that patch parallelism cannot run (raised on every rank alike)."""


class CommunicationError(DiffaccelError, RuntimeError):
    """A collective or point-to-point transfer failed or timed out; the message names the unresponsive rank(s)."""


@dataclass
class PatchParallelConfig:
    """How to split one denoiser call over ranks (DistriFusion, Li et al., CVPR 2024; PCPP, Zhang et al. 2024).

    mode: "sync" (exact: fresh halos, global GroupNorm statistics, all K/V every layer), "displaced"
        (DistriFusion: after warm-up every layer uses the other bands' activations from the previous model call,
        sent asynchronously behind computation; alias "distrifusion"), "pcpp" (as displaced, but self-attention
        only sees the `pcpp_fraction` rows of each neighbouring band that touch the border), "naive" (no exchange
        at all after warm-up: zero halos, per-band statistics, own-band attention).
    warmup_steps: model calls with index <= warmup_steps run synchronously (call 0 always does).
    gn_mode: GroupNorm statistics in displaced calls; "corrected" is DistriFusion's choice.
    pcpp_fraction: fraction f of a neighbour band's rows (m = round(f * h) whole rows) attended in PCPP.
    cfg_parallel: run the unconditional and conditional halves of a CFG batch on two rank groups.
    halo_transport: "p2p" (send boundary rows to the two neighbours) or "allgather" (DistriFusion's layout).
    timeout_s: every transfer fails after this many seconds with an error naming the silent rank(s).
    stats_dtype: dtype of the exchanged GroupNorm statistics (never below fp32; fp64 inputs always use fp64).
    skip_transfers / blocking_transfers: benchmark knobs for displaced calls only: the first reuses the previous
        buffers without communicating (compute-only timing), the second waits for every transfer right after
        issuing it (fully exposed communication).
    """

    mode: str = "displaced"
    warmup_steps: int = 4
    gn_mode: str = "corrected"
    pcpp_fraction: float = 0.3
    pcpp_hops: int = 1
    cfg_parallel: bool = False
    halo_transport: str = "p2p"
    timeout_s: float = 300.0
    stats_dtype: torch.dtype = torch.float32
    count_bytes: bool = True
    check_inputs: bool = True
    skip_transfers: bool = False
    blocking_transfers: bool = False

    def __post_init__(self) -> None:
        self.mode = MODE_ALIASES.get(self.mode, self.mode)
        if self.mode not in MODES:
            raise PatchParallelError(f"unknown mode {self.mode!r}; valid: {', '.join(MODES)} (or 'distrifusion')")
        if self.gn_mode not in GN_MODES:
            raise PatchParallelError(f"unknown gn_mode {self.gn_mode!r}; valid: {', '.join(GN_MODES)}")
        if self.halo_transport not in HALO_TRANSPORTS:
            raise PatchParallelError(f"unknown halo_transport {self.halo_transport!r}; valid: {HALO_TRANSPORTS}")
        if int(self.warmup_steps) != self.warmup_steps or self.warmup_steps < 0:
            raise PatchParallelError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if not self.pcpp_fraction >= 0:
            raise PatchParallelError(f"pcpp_fraction must be >= 0, got {self.pcpp_fraction!r}")
        if self.pcpp_hops != 1:
            raise PatchParallelError("pcpp_hops other than 1 is not implemented (the PCPP paper uses 1)")
        if not self.timeout_s > 0:
            raise PatchParallelError(f"timeout_s must be > 0, got {self.timeout_s!r}")
        if self.stats_dtype not in (torch.float32, torch.float64):
            raise PatchParallelError(f"stats_dtype must be torch.float32 or torch.float64, got {self.stats_dtype}")
        if self.skip_transfers and self.blocking_transfers:
            raise PatchParallelError("skip_transfers and blocking_transfers are mutually exclusive")

    def fingerprint(self) -> dict[str, str]:
        """Field -> repr, equal on all ranks iff their configurations agree (checked collectively at set-up)."""
        return {k: repr(v) for k, v in asdict(self).items()}
