"""Convolutions with kernel height > 1 on a band of rows: the missing rows come from the neighbours ("halo").

For kernel k, padding p, stride s and a band of h rows (h divisible by s), output row j of the band starts at
padded row j*s, so the band needs p rows above and `below = max(0, (h/s - 1)*s + k - 1 - (p + h - 1))` rows below
(1 for k=3, s=1; 0 for k=3, s=2: DistriFusion sends that unused row, we do not). Edge ranks pad with zeros exactly
like the original zero padding; width padding stays inside the convolution call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.hooks import ModelHook
from torch import nn

from .comm import Deferred
from .config import PatchParallelError
from .state import PatchState, zeros_rows


def halo_rows(conv: nn.Conv2d, h: int) -> tuple[int, int]:
    """(rows above, rows below) a band of h rows needs for `conv`."""
    k, p, s = conv.kernel_size[0], conv.padding[0], conv.stride[0]
    if h % s or (h + 2 * p - k) // s + 1 != h // s:
        raise PatchParallelError(f"a band of {h} rows does not line up with conv k={k}, p={p}, s={s}")
    return p, max(0, (h // s - 1) * s + k - 1 - (p + h - 1))


def check_conv(name: str, conv: nn.Conv2d) -> None:
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros" or conv.dilation[0] != 1:
        raise PatchParallelError(f"unsupported conv {name}: padding={conv.padding!r}, padding_mode="
                                 f"{conv.padding_mode!r}, dilation={conv.dilation} (need zeros padding, dilation 1)")


class HaloConv2dHook(ModelHook):
    """Run `conv` on a band; `entry=True` for the first conv, which slices band + halo from the full input."""

    def __init__(self, state: PatchState, name: str, layer_id: int, entry: bool = False) -> None:
        super().__init__()
        self.state, self.name, self.tag, self.entry = state, name, 2 * layer_id, entry

    def new_forward(self, module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        st = self.state
        if self.entry:
            padded = self._slice_from_full(module, x)
        else:
            above, below = halo_rows(module, x.shape[2])
            if st.sync_call:
                top, bot = self._exchange(x, above, below, async_op=False).wait()
                if st.keep_for_next:
                    st.buffers[self.name] = (top, bot)
            elif st.config.mode == "naive":
                top, bot = zeros_rows(x, above), zeros_rows(x, below)
            else:  # displaced / pcpp: last call's halo, then send this call's boundary rows for the next call
                top, bot = st.take_stale(self.name)
                st.start(self.name, lambda: self._exchange(x, above, below, async_op=True))
            padded = torch.cat([top, x, bot], dim=2)
        return F.conv2d(padded, module.weight, module.bias, module.stride, (0, module.padding[1]), module.dilation,
                        module.groups)

    def _slice_from_full(self, conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        n, r = self.state.n, self.state.r
        H = x.shape[2]
        h = H // n
        above, below = halo_rows(conv, h)
        lo, hi = r * h - above, (r + 1) * h + below
        band = x[:, :, max(lo, 0):min(hi, H)]
        return torch.cat([zeros_rows(x, max(0, -lo)), band, zeros_rows(x, max(0, hi - H))], dim=2)

    def _exchange(self, x: torch.Tensor, above: int, below: int, async_op: bool):
        """Fill (top halo, bottom halo): my first `below` rows go up, my last `above` rows go down."""
        st = self.state
        comm = st.comm
        h = x.shape[2]
        group = "async" if async_op else "patch"
        if st.config.halo_transport == "allgather":
            mine = torch.cat([x[:, :, :below], x[:, :, h - above:]], dim=2)
            used = (above if comm.prev is not None else 0) + (below if comm.next is not None else 0)
            per_row = mine[:, :, :1].numel() * mine.element_size()
            pend = comm.all_gather(mine, layer=self.name, kind="conv_halo", group=group, async_op=async_op,
                                   logical_bytes=used * per_row)

            def pick():
                slices = pend.wait()
                top = slices[st.r - 1][:, :, below:] if comm.prev is not None else zeros_rows(x, above)
                bot = slices[st.r + 1][:, :, :below] if comm.next is not None else zeros_rows(x, below)
                return top, bot

            return Deferred(pend, pick)
        sends, recvs = {}, {}
        if comm.prev is not None:
            if below:
                sends[comm.prev] = x[:, :, :below]
            if above:
                recvs[comm.prev] = zeros_rows(x, above)
        if comm.next is not None:
            if above:
                sends[comm.next] = x[:, :, h - above:]
            if below:
                recvs[comm.next] = zeros_rows(x, below)
        pend = comm.exchange(sends, recvs, layer=self.name, kind="conv_halo", tag=self.tag, group=group,
                             async_op=async_op)

        def unpack():
            got = pend.wait()
            top = got.get(comm.prev, zeros_rows(x, above)) if comm.prev is not None else zeros_rows(x, above)
            bot = got.get(comm.next, zeros_rows(x, below)) if comm.next is not None else zeros_rows(x, below)
            return top, bot

        return Deferred(pend, unpack)
