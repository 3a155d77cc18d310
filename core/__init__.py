"""Shared machinery used by every diffaccel method: errors, atomic files, seeding, devices, images, timing, NFE
counting."""

from .device import resolve_device, resolve_dtype
from .errors import DiffaccelError, InputError, WeightsError
from .files import atomic_save, atomic_write_bytes, atomic_write_text, check_output_path, sha256_file
from .images import pil_to_tensor, pipeline_output_to_uint8, tensor_to_pil, to_uint8
from .nfe import NFECounter, count_nfe, find_denoiser
from .seeding import make_generator, make_generators, seed_everything
from .timing import TimingResult, measure, synchronize

__all__ = [
    "DiffaccelError",
    "InputError",
    "WeightsError",
    "atomic_save",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_output_path",
    "sha256_file",
    "NFECounter",
    "TimingResult",
    "count_nfe",
    "find_denoiser",
    "make_generator",
    "make_generators",
    "measure",
    "pil_to_tensor",
    "pipeline_output_to_uint8",
    "resolve_device",
    "resolve_dtype",
    "seed_everything",
    "synchronize",
    "tensor_to_pil",
    "to_uint8",
]
