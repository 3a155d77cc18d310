"""GroupNorm over a band with statistics of the whole image.

Each rank computes, per sample and group, its band's mean and biased variance (`torch.var_mean`, fp32 or wider)
and all-gathers them. With equal counts per band the global statistics follow from the parallel-variance
combination of Chan, Golub & LeVeque (1979):  mu = avg_r mu_r,  var = avg_r var_r + avg_r (mu_r - mu)^2,
which avoids the E[x^2] - E[x]^2 cancellation of raw sums. No Bessel factor: `nn.GroupNorm` uses the biased
variance (DistriFusion's code applies n/(n-1), one reason its "sync" mode is not bit-comparable).

Displaced calls use last call's gathered statistics. "corrected" (DistriFusion) assumes every band drifted like
the local one: in raw moments  E = T_prev/N_el + (L_now - L_prev)/n_loc,  which in central form is
mu = M + d_mu,  var = V_prev + d_var + 2 d_mu (mu_own_prev - M)  (M, V_prev: last call's global statistics);
a negative variance falls back to the local one.
"""

from __future__ import annotations

import torch
from diffusers.hooks import ModelHook
from torch import nn

from .comm import Deferred
from .state import PatchState


def combine(stats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Global (mean, biased var) from per-band [mean, var] stacks of equal element counts, in fp64."""
    s = torch.stack([t.double() for t in stats])  # (n, 2, B, G)
    means, variances = s[:, 0], s[:, 1]
    mu = means.mean(0)
    return mu, variances.mean(0) + ((means - mu) ** 2).mean(0)


class GlobalGroupNormHook(ModelHook):
    """`nn.GroupNorm` with global statistics: fresh in sync calls, stale-corrected in displaced calls."""

    def __init__(self, state: PatchState, name: str) -> None:
        super().__init__()
        self.state, self.name = state, name

    def new_forward(self, module: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        st = self.state
        B, C = x.shape[:2]
        G = module.num_groups
        ct = torch.float64 if x.dtype == torch.float64 else torch.float32
        xs = x.reshape(B, G, -1).to(ct)
        var_l, mu_l = torch.var_mean(xs, dim=-1, unbiased=False)
        local = torch.stack([mu_l, var_l]).double()  # (2, B, G), kept at full precision for the correction
        wire_dtype = torch.float64 if x.dtype == torch.float64 else st.config.stats_dtype
        fallback = None
        if st.sync_call or (st.config.mode != "naive" and st.config.gn_mode == "sync"):
            gathered = self._gather(local, wire_dtype, async_op=False).wait()
            mu, var = combine(gathered)
            if st.keep_for_next:
                st.buffers[self.name] = (gathered, local)
        elif st.config.mode == "naive" or st.config.gn_mode == "local":
            mu, var = local[0], local[1]
        else:
            prev, own_prev = st.take_stale(self.name)
            gm = st.config.gn_mode
            if gm == "stale":
                mu, var = combine(prev)
            elif gm == "substitute":
                mu, var = combine([local if i == st.r else t for i, t in enumerate(prev)])
            else:  # corrected
                M, V = combine(prev)
                d_mu, d_var = local[0] - own_prev[0], local[1] - own_prev[1]
                mu = M + d_mu
                var = V + d_var + 2 * d_mu * (own_prev[0] - M)
                fallback = local[1]
            st.start(self.name, lambda: self._launch(local, wire_dtype))
        if fallback is not None:
            var = torch.where(var < 0, fallback, var)
        var = var.clamp_min(0)
        rstd = torch.rsqrt(var + module.eps).to(ct)
        y = ((xs - mu.to(ct)[..., None]) * rstd[..., None]).reshape(x.shape).to(x.dtype)
        if module.affine:
            shape = (1, C) + (1,) * (x.ndim - 2)
            y = y * module.weight.view(shape) + module.bias.view(shape)
        return y

    def _launch(self, local: torch.Tensor, wire_dtype: torch.dtype) -> Deferred:
        pend = self._gather(local, wire_dtype, async_op=True)
        return Deferred(pend, lambda: (pend.wait(), local))

    def _gather(self, local: torch.Tensor, wire_dtype: torch.dtype, async_op: bool):
        group = "async" if async_op else "patch"
        return self.state.comm.all_gather(local.to(wire_dtype), layer=self.name, kind="gn_stats", group=group,
                                          async_op=async_op)
