"""FLOP counting that also sees attention on the CPU.

`torch.utils.flop_counter.FlopCounterMode` counts an op only if a formula is registered for it. On the CPU, torch's
scaled-dot-product attention runs as ``aten._scaled_dot_product_flash_attention_for_cpu``, which has none (torch
2.13), so a CPU count silently leaves every attention out while the same call on ``meta`` or CUDA includes it. This
module registers the standard SDPA formula (2·b·h·s_q·s_k·(d_qk + d_v)) for that op, once, so that FLOP counts and
FLOP ratios are the same whatever device measured them. Use `flop_counter()` instead of `FlopCounterMode(...)`.
"""

from __future__ import annotations

import torch
import torch.utils.flop_counter as _fc

_CPU_SDPA_OPS = ("_scaled_dot_product_flash_attention_for_cpu",)


def _register_cpu_attention() -> None:
    for name in _CPU_SDPA_OPS:
        packet = getattr(torch.ops.aten, name, None)
        if packet is None or packet.default in _fc.flop_registry:
            continue

        @_fc.register_flop_formula(packet)
        def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return _fc.sdpa_flop_count(query_shape, key_shape, value_shape)


_register_cpu_attention()


def flop_counter() -> _fc.FlopCounterMode:
    """A silent `FlopCounterMode` that counts CPU attention too (see the module docstring)."""
    return _fc.FlopCounterMode(display=False)
