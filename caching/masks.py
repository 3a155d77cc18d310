"""`StepUnitMask`: the shape of a binary [steps, units] cache plan (True = compute), shared by HarmoniCa's
`CachePlan` and the UNet `BranchReusePlan`."""

from __future__ import annotations

import torch


class StepUnitMask:
    """Mixin for plans that keep their decisions in ``self.mask`` ([steps, units], bool)."""

    mask: torch.Tensor

    @property
    def num_steps(self) -> int:
        return int(self.mask.shape[0])

    @property
    def num_units(self) -> int:
        return int(self.mask.shape[1])
