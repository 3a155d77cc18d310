"""Device and dtype selection with clear errors instead of silent fallbacks."""

from __future__ import annotations

import torch

from .errors import InputError

_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp64": torch.float64,
    "float64": torch.float64,
}


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Turn "auto", "cpu", "cuda", "cuda:1", "mps" into a torch.device, refusing devices that are not there."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"unknown device {device!r}: expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {str(device)!r} requested but CUDA is not available on this machine; use 'cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(
                f"device {str(device)!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    elif dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise InputError(f"device {str(device)!r} requested but MPS is not available on this machine")
    elif dev.type != "cpu":
        raise InputError(f"unsupported device type {dev.type!r}: expected cpu, cuda or mps")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device | str = "cpu") -> torch.dtype:
    """Parse a dtype name; fp16 on CPU is refused (most CPU kernels lack it and it would be slower anyway)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        out = dtype
    else:
        key = str(dtype).lower().replace("torch.", "")
        if key not in _DTYPES:
            raise InputError(f"unknown dtype {dtype!r}: expected one of {sorted(set(_DTYPES))}")
        out = _DTYPES[key]
    if torch.device(device).type == "cpu" and out == torch.float16:
        raise InputError("float16 is not supported on CPU here; use float32 or bfloat16 on CPU, float16 on CUDA")
    return out
