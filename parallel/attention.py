"""Self-attention on a band of tokens as a diffusers attention processor.

Queries are the band's own tokens; keys/values are, per mode,
* sync: all bands, fresh (all-gather of the local [K|V], concatenated in rank order = the original token order);
* displaced (DistriFusion, Li et al., CVPR 2024, Sec. 4.2): own band fresh, other bands from the previous call;
* pcpp (Zhang et al. 2024, arXiv 2412.02962): own band fresh plus the m = round(f*h) rows of each neighbouring
  band that touch the border, from the previous call; only those rows are sent (the release sends the whole band);
* naive: own band only.
Projections, `norm_q`/`norm_k`, `group_norm`, residual and `rescale_output_factor` follow the stock
`AttnProcessor2_0`; softmax scale is `attn.scale`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .comm import Deferred
from .config import PatchParallelError
from .state import PatchState


def pcpp_rows(fraction: float, h: int) -> int:
    """Whole neighbour rows attended in PCPP: m = min(h, round(f*h)) (row-aligned; the release cuts tokens)."""
    return min(h, int(math.floor(fraction * h + 0.5)))


class PatchAttnProcessor:
    """Band-parallel self-attention; installed on `Attention` modules with `is_cross_attention == False`."""

    def __init__(self, state: PatchState, name: str, layer_id: int, original: object) -> None:
        self.state, self.name, self.tag, self.original = state, name, 2 * layer_id, original

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args,
                 **kwargs) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise PatchParallelError(f"{self.name}: self-attention with encoder states or a mask is not supported")
        residual = hidden_states
        ndim = hidden_states.ndim
        if ndim == 4:
            B, C, h, w = hidden_states.shape
            hidden_states = hidden_states.view(B, C, h * w).transpose(1, 2)
        B, L, _ = hidden_states.shape
        if attn.group_norm is not None:  # a GroupNorm hook makes its statistics global
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        d = k.shape[-1] // attn.heads
        q, k, v = (t.view(B, -1, attn.heads, d).transpose(1, 2) for t in (q, k, v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        kv = self._context(torch.stack([k, v]), L)  # (2, B, heads, tokens, d)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1], dropout_p=0.0, is_causal=False, scale=attn.scale)
        out = out.transpose(1, 2).reshape(B, -1, attn.heads * d).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if ndim == 4:
            out = out.transpose(-1, -2).reshape(B, C, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    # ------------------------------------------------------------------ key/value context per mode
    def _context(self, kv: torch.Tensor, tokens: int) -> torch.Tensor:
        st = self.state
        mode = st.config.mode
        if st.sync_call:
            gathered = st.comm.all_gather(kv, layer=self.name, kind="attn_kv").wait()
            if st.keep_for_next:
                st.buffers[self.name] = self._neighbour_rows(gathered, tokens) if mode == "pcpp" else gathered
            return torch.cat(gathered, dim=3)
        if mode == "naive":
            return kv
        if mode == "displaced":
            stale = st.take_stale(self.name)
            st.start(self.name, lambda: st.comm.all_gather(kv, layer=self.name, kind="attn_kv", group="async",
                                                           async_op=True))
            return torch.cat([kv if i == st.r else t for i, t in enumerate(stale)], dim=3)
        up, down = st.take_stale(self.name)  # pcpp
        st.start(self.name, lambda: self._send_rows(kv, tokens))
        return torch.cat([t for t in (up, kv, down) if t is not None], dim=3)

    def _rows(self, kv: torch.Tensor, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(top m rows, bottom m rows) of a band's K/V, as token slices."""
        h, w = self.state.band_rows(tokens)
        m = pcpp_rows(self.state.config.pcpp_fraction, h)
        return kv[:, :, :, : m * w], kv[:, :, :, (h - m) * w:]

    def _neighbour_rows(self, gathered: list[torch.Tensor], tokens: int):
        comm = self.state.comm
        r = self.state.r
        up = self._rows(gathered[r - 1], tokens)[1] if comm.prev is not None else None
        down = self._rows(gathered[r + 1], tokens)[0] if comm.next is not None else None
        return up, down

    def _send_rows(self, kv: torch.Tensor, tokens: int) -> Deferred:
        comm = self.state.comm
        top, bottom = self._rows(kv, tokens)
        sends, recvs = {}, {}
        if top.shape[3]:
            if comm.prev is not None:
                sends[comm.prev], recvs[comm.prev] = top, torch.empty_like(top)
            if comm.next is not None:
                sends[comm.next], recvs[comm.next] = bottom, torch.empty_like(bottom)
        pend = comm.exchange(sends, recvs, layer=self.name, kind="attn_kv", tag=self.tag, group="async",
                             async_op=True)

        def unpack():
            got = pend.wait()
            return got.get(comm.prev), got.get(comm.next)

        return Deferred(pend, unpack)
