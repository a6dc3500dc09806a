"""``mode="gradient"`` — the writers' weight gradient is split; the adapter trains live.

Right before each optimizer step the gradient G of every routed parameter is split: the
adapter gets ``Uᵀ G``, the base optimizer gets ``G − U Uᵀ G``. The adapter has its own AdamW
(own state; LR = ``adapter_lr`` or the main optimizer's LR × ``adapter_lr_multiplier``).
After the step the parameter's in-subspace coordinates are set to ``Uᵀ W_0 + A_new``, which
removes the base update's in-subspace residue (Adam's element-wise scaling and weight decay
create one) and applies the adapter's update: the base never moves inside span(U), exactly.

Measured limit: the persona shift is re-created through unrouted paths (readers, the writers'
fixed ``UᵀW`` applied to changed inputs), so discarding does not undo it — see
``mode="activation"``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...errors import RoutingError
from .base import RoutingMode


class GradientMode(RoutingMode):
    name = "gradient"
    supports_sharding = True  # coordinates read from and written into FSDP2 shards (route.py)

    def setup(self) -> None:
        o = self.options
        self.params: dict[str, list[nn.Parameter]] = {
            r.name: [nn.Parameter(b.adapter.clone(), requires_grad=True) for b in r.blocks]
            for r in self.ctx.routes}
        self.optimizer = torch.optim.AdamW([p for ps in self.params.values() for p in ps],
                                           lr=o.get("adapter_lr") or 1e-3, betas=o.get("adapter_betas", (0.9, 0.999)),
                                           weight_decay=o.get("adapter_weight_decay", 0.0))
        self.split_pending = False

    def bind(self, optimizer: torch.optim.Optimizer) -> list[Any]:
        return [optimizer.register_step_pre_hook(lambda o, a, k: self.split_gradients())]

    def update_optimizer(self) -> torch.optim.Optimizer | None:
        return self.optimizer

    @torch.no_grad()
    def split_gradients(self) -> None:
        for r in self.ctx.routes:
            for b, p in zip(r.blocks, self.params[r.name]):
                g = b.param.grad
                p.grad = None if g is None else b.split(g)
        lr = self.options.get("adapter_lr")
        main = self.ctx.optimizer()
        if lr is None and main is not None:
            lr = main.param_groups[0]["lr"]
        for group in self.optimizer.param_groups:
            group["lr"] = float(lr if lr is not None else group["lr"]) * self.options.get("adapter_lr_multiplier", 1.0)
        self.split_pending = True

    def skipped(self) -> None:
        self.split_pending = False

    def _follow_devices(self) -> None:
        for r in self.ctx.routes:
            for b, p in zip(r.blocks, self.params[r.name]):
                if p.device != b.param.device:
                    p.data = p.data.to(b.param.device)
        for p, st in self.optimizer.state.items():
            for k, v in st.items():
                if torch.is_tensor(v) and v.ndim > 0 and v.device != p.device:
                    st[k] = v.to(p.device)

    @torch.no_grad()
    def after_step(self) -> dict[str, list[torch.Tensor]]:
        if not self.split_pending:
            raise RoutingError(
                "gradient mode: no gradient was split before this optimizer step.",
                "pass optimizer=... to GradientRouter (or call router.bind_optimizer(opt)) so the "
                "router can split gradients right before optimizer.step().",
            )
        self._follow_devices()
        prev = {r.name: [b.adapter.clone() for b in r.blocks] for r in self.ctx.routes}
        self.optimizer.step()
        deltas: dict[str, list[torch.Tensor]] = {}
        for r in self.ctx.routes:
            ps = self.params[r.name]
            r.realize([p.data for p in ps])
            for b, p in zip(r.blocks, ps):
                p.data.copy_(b.adapter)
            deltas[r.name] = [b.adapter - a0 for b, a0 in zip(r.blocks, prev[r.name])]
        self.split_pending = False
        return deltas

    @torch.no_grad()
    def adapter_changed(self) -> None:
        for r in self.ctx.routes:
            for b, p in zip(r.blocks, self.params[r.name]):
                p.data = b.adapter.clone()
        self.optimizer.state.clear()

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        sd = self.optimizer.state_dict()
        tensors = {f"opt.{pid}.{key}": (val if torch.is_tensor(val) else torch.tensor(val))
                   for pid, st in sd["state"].items() for key, val in st.items()}
        return tensors, {"adapter_optimizer": {"param_groups": sd["param_groups"]}}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        with torch.no_grad():
            for r in self.ctx.routes:
                for b, p in zip(r.blocks, self.params[r.name]):
                    p.data = b.adapter.clone()
        state: dict[int, dict[str, Any]] = {}
        for key, val in tensors.items():
            if key.startswith("opt."):
                _, pid, name = key.split(".", 2)  # opt.<param index>.<state name>
                state.setdefault(int(pid), {})[name] = val
        groups = (meta.get("adapter_optimizer") or {}).get("param_groups")
        if groups:
            self.optimizer.load_state_dict({"state": state, "param_groups": groups})
