"""Patch parallelism across devices: synchronous (exact), DistriFusion-style displaced patches (Li et al., CVPR 2024)
and PCPP partial conditioning (Zhang et al. 2024). See `parallelize`."""

from .comm import ByteMeter, CommRecord, Communicator, init_distributed, local_device
from .config import CommunicationError, PatchParallelConfig, PatchParallelError
from .parallelize import PatchParallelHandle, find_denoiser, parallel_handle, parallelize, unparallelize

__all__ = [
    "ByteMeter",
    "CommRecord",
    "CommunicationError",
    "Communicator",
    "PatchParallelConfig",
    "PatchParallelError",
    "PatchParallelHandle",
    "find_denoiser",
    "init_distributed",
    "local_device",
    "parallel_handle",
    "parallelize",
    "unparallelize",
]
