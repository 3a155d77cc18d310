"""core.flops: CPU attention is counted, and counts as on the meta device."""

import torch
import torch.nn.functional as F
from diffaccel.core.flops import flop_counter


def test_cpu_attention_is_counted_like_meta():
    counts = {}
    for device in ("cpu", "meta"):
        q = torch.randn(2, 3, 16, 8, device=device)
        k = torch.randn(2, 3, 24, 8, device=device)
        v = torch.randn(2, 3, 24, 4, device=device)
        with flop_counter() as counter:
            F.scaled_dot_product_attention(q, k, v)
        counts[device] = counter.get_total_flops()
    # Q·Kᵀ: 2·b·h·s_q·s_k·d_qk and P·V: 2·b·h·s_q·s_k·d_v multiply-adds, counted as 2 FLOPs each.
    expected = 2 * 2 * 3 * 16 * 24 * 8 + 2 * 2 * 3 * 16 * 24 * 4
    assert counts["cpu"] == counts["meta"] == expected
