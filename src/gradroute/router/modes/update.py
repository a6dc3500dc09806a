"""``mode="update"`` — watching: training is untouched; each step's in-subspace update is read
off the new weights.

For a routed parameter W with basis U: ``A_t = Uᵀ W_t − Uᵀ W_0``, ``W_base = W_t − U A_t``
(so ``Uᵀ(W_base − W_0) = 0``), and the step's update is ``ΔA_t = A_t − A_{t−1}``. Exact for any
optimizer (momentum, Adam state, weight decay, clipping, accumulation, schedules), because it
acts on the update itself. The model always holds the effective weights ``W_base + U A``.
"""

from __future__ import annotations

import torch

from .base import RoutingMode


class UpdateMode(RoutingMode):
    name = "update"
    supports_sharding = True  # coordinates read from and written into FSDP2 shards (route.py)

    def after_step(self) -> dict[str, list[torch.Tensor]]:
        deltas: dict[str, list[torch.Tensor]] = {}
        for r in self.ctx.routes:
            ds = []
            for b in r.blocks:
                new = b.coords() - b.ref0
                ds.append(new - b.adapter)
                b.adapter = new
            deltas[r.name] = ds
        return deltas
