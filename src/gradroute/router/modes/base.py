"""The mode strategy interface. Adding a routing mode = one new file with one subclass.

A mode decides how the in-subspace part of training reaches the adapter; the router calls it
at fixed points of each step:

- ``plan(...)``: which modules are routed, with which bases (default: the plan of
  :func:`gradroute.plan.build_plan` on the persona subspace);
- ``bind(optimizer)``: optimizer hooks the mode needs (e.g. splitting gradients right before
  the step);
- ``after_step()``: after ``optimizer.step()``, bring every route block's ``adapter`` up to
  date and return the step's ΔA per module and block;
- ``effective(block)``: the model's effective parameter (base + U A) in the bookkeeping dtype
  (sharded like the parameter under FSDP2);
- ``rebind()``: re-find the mode's own model parameters after FSDP2 / accelerate replaced them;
- ``set_adapter(route, adapters)``: make the model hold these adapter coordinates (discard);
- ``merge(route)``: accept the adapter into the base;
- ``state_dict`` / ``load_state_dict``: what the mode adds to the router's state file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ...plan import RoutingPlan, build_plan
from ..route import CoordBlock, Route


@dataclass(frozen=True)
class ModeContext:
    """What a mode may see of the router: the model, the persona subspace, the plan, the
    per-module routes, and the optimizer the router is bound to (asked for when needed, since it
    is bound after the mode is built)."""

    model: torch.nn.Module
    subspace: Any
    plan: RoutingPlan
    routes: list[Route]
    optimizer: Callable[[], torch.optim.Optimizer | None]


class RoutingMode:
    name: ClassVar[str] = ""
    #: the model's routed weights hold base + U A (update, gradient); False: the adapter is a
    #: separate path and the weights are the base (activation)
    weights_hold_adapter: ClassVar[bool] = True
    #: the mode feeds attribution itself (its own hooks see the adapter's gradient)
    captures_gradients: ClassVar[bool] = False
    default_lr_multiplier: ClassVar[float] = 1.0
    #: the mode routes FSDP2-sharded (DTensor) parameters correctly; False: the router refuses them
    supports_sharding: ClassVar[bool] = False

    def __init__(self, ctx: ModeContext, options: dict[str, Any]):
        self.ctx = ctx
        self.options = options

    # ------------------------------------------------------------------ setup
    @classmethod
    def plan(cls, model: torch.nn.Module, subspace: Any, **kwargs: Any) -> tuple[RoutingPlan, Any]:
        """(plan, routing subspace): the subspace whose bases the routes use."""
        kwargs.pop("post_norm", None)  # post-norm writes are refused by the plan's tracer in this mode
        return build_plan(model, subspace, **kwargs), subspace

    @classmethod
    def rebuild_options(cls, meta: dict[str, Any]) -> dict[str, Any]:
        """Router options that rebuild the saved plan from a state file's metadata."""
        return {"targets": {m: (L, side) for m, L, side in meta["targets"]}, "route_bias": meta.get("route_bias")}

    def setup(self) -> None:
        """Called once the routes exist."""

    def probe_layers(self) -> dict[Any, torch.Tensor]:
        """Layers (and bases) whose activation projections attribution records per environment."""
        routed = set(self.ctx.plan.layers)
        return {L: self.ctx.subspace.basis(L) for L in self.ctx.subspace.layers if L in routed}

    def attribution_ready(self, attribution: Any) -> None:
        """Called once per-environment attribution is set up."""

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters the mode adds to the model for the user's optimizer to train."""
        return []

    def check_optimizer(self, stepped: set[int]) -> None:
        """Refuse an optimizer that misses what the mode needs it to step (ids of its params)."""

    def rebind(self) -> bool:
        """Find the mode's own model parameters again by name after FSDP2 / accelerate replaced
        them (the routes' parameters are re-found by the router). True if any changed."""
        return False

    def bind(self, optimizer: torch.optim.Optimizer) -> list[Any]:
        return []

    def remove(self) -> None:
        """Remove the mode's model hooks (the adapter state stays)."""

    def export_problem(self) -> str | None:
        """Why this mode's adapter cannot be written as a PEFT LoRA (None: it can)."""
        return None

    def update_optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer whose update the adapter's coordinates follow (for attribution)."""
        return self.ctx.optimizer()

    # ------------------------------------------------------------------ the step
    def skipped(self) -> None:
        """The optimizer skipped its step: forget what was prepared for it."""

    def after_step(self) -> dict[str, list[torch.Tensor]]:
        raise NotImplementedError

    # ------------------------------------------------------------------ the adapter in the model
    def resync(self, route: Route) -> None:
        """The route's parameters were edited outside a routed step: that edit is the base's."""
        route.resync()

    def effective(self, block: CoordBlock) -> torch.Tensor:
        """The parameter the model effectively uses, base + U A (bookkeeping dtype)."""
        return block.effective().to(block.route.dtype)

    def set_adapter(self, route: Route, adapters: list[torch.Tensor]) -> None:
        route.realize(adapters)

    def cleared(self, route: Route) -> None:
        """The whole adapter was discarded: float storage cannot hit Uᵀ W_0 exactly, so what
        the weights realize is the base's."""
        for b in route.blocks:
            b.ref0 = b.ref0 + b.adapter
            b.adapter = torch.zeros_like(b.adapter)

    def merge(self, route: Route) -> None:
        for b in route.blocks:
            b.ref0 = b.ref0 + b.adapter
            b.adapter = torch.zeros_like(b.adapter)

    def adapter_changed(self) -> None:
        """Adapters were set from outside a step (discard, merge, load): sync the mode's copies."""

    # ------------------------------------------------------------------ persistence
    def sync_state(self) -> None:
        """Bring the routes' bookkeeping (``ref0``) up to date before the router state is written
        (for bookkeeping a mode does not keep current every step)."""

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {}, {}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        pass
